//! Statistics and report helpers shared by the benches (`mod common;`).
//!
//! Every bench reports medians over many short rounds, and compares two
//! things by the median of their *per-round* ratios: the two sides of a
//! ratio run in the same round (alternately, or back to back), so load on
//! the machine hits both alike and a disturbed round spoils one ratio
//! rather than skewing a side. Tables print as Markdown, so a run can be
//! pasted into `benches/README.md` as it is.

// Each bench uses a subset of these helpers.
#![allow(dead_code)]

use std::fmt::Display;

// ------------------------------------------------------------- statistics

/// The `p`-th percentile (0 to 100) of `v`, nearest rank; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

/// The median of `v` (for an even count, the upper of the two middle values).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// The smallest value: the least disturbed round.
pub fn best(v: &[f64]) -> f64 {
    percentile(v, 0.0)
}

/// `a[i] / b[i]` for every round `i`.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// The median of the per-round ratios `a[i] / b[i]`.
pub fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&ratios(a, b))
}

/// Two measurements taken alternately, one of each per round.
pub struct Alternated {
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

impl Alternated {
    /// The median of the per-round ratios `b / a`.
    pub fn ratio(&self) -> f64 {
        median_ratio(&self.b, &self.a)
    }
}

/// Runs `a` then `b`, `rounds` times; each returns its figure for one batch
/// (time per request, say).
pub fn alternate(
    rounds: usize,
    mut a: impl FnMut() -> f64,
    mut b: impl FnMut() -> f64,
) -> Alternated {
    let mut out = Alternated {
        a: Vec::with_capacity(rounds),
        b: Vec::with_capacity(rounds),
    };
    for _ in 0..rounds {
        out.a.push(a());
        out.b.push(b());
    }
    out
}

// ------------------------------------------------------------------ tables

/// A Markdown table, padded so it also reads well in a terminal. The first
/// `left` columns are left-aligned (names), the rest right-aligned
/// (figures).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    left: usize,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            left: 1,
        }
    }

    /// How many leading columns are left-aligned (default 1).
    pub fn left_aligned(mut self, columns: usize) -> Table {
        self.left = columns;
        self
    }

    /// Adds a row; it must have as many cells as the header.
    pub fn row<I>(&mut self, cells: I)
    where
        I: IntoIterator,
        I::Item: Display,
    {
        let row: Vec<String> = cells.into_iter().map(|c| c.to_string()).collect();
        assert_eq!(row.len(), self.header.len(), "table row width");
        self.rows.push(row);
    }

    pub fn print(&self) {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.header[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, &w))| {
                    if i < self.left {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            println!("| {} |", cells.join(" | "));
        };
        line(&self.header);
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                if i < self.left {
                    format!(":{}", "-".repeat(w - 1))
                } else {
                    format!("{}:", "-".repeat(w - 1))
                }
            })
            .collect();
        println!("| {} |", rule.join(" | "));
        for r in &self.rows {
            line(r);
        }
    }
}

/// Prints every round's figure of one series (`--raw`).
pub fn print_raw(name: &str, v: &[f64]) {
    let r: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    println!("raw {name:<22} {}", r.join(" "));
}

// ----------------------------------------------------------------- machine

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The CPU model, from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The kernel release (or the OS name where there is none to read).
pub fn kernel() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| std::env::consts::OS.into())
}

/// Whether cpu0 and cpu1 are hyperthreads of one core.
pub fn ht_siblings() -> String {
    match read_trimmed("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") {
        Some(list) => {
            let siblings: Vec<usize> = list
                .split(',')
                .flat_map(|part| {
                    let mut ends = part.split('-').filter_map(|x| x.trim().parse().ok());
                    let a: usize = ends.next().unwrap_or(0);
                    let b = ends.next().unwrap_or(a);
                    a..=b
                })
                .collect();
            if siblings.contains(&1) {
                format!("yes (cpu0 siblings: {list})")
            } else {
                format!("no (cpu0 siblings: {list})")
            }
        }
        None => "unknown".into(),
    }
}

/// One line naming the machine, for the head of a report.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{}, {cpus} cpus, kernel {}", cpu_model(), kernel())
}

/// The version a QEMU tool prints (`qemu-img --version`'s "10.0.2"), or
/// "?" when it cannot be run or read.
pub fn qemu_tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let first = text.lines().next()?.to_owned();
            let v = first.split("version ").nth(1)?;
            Some(v.split_whitespace().next().unwrap_or(v).to_owned())
        })
        .unwrap_or_else(|| "?".into())
}
