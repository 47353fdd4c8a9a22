//! What the tool prints: one-line errors (clap's usage errors included),
//! sizes as qemu-img writes them, the snapshot table, JSON in QEMU's
//! layout, and `-p`'s progress bars.

use std::fmt::Write as _;
use std::io::{self, Write as _};

use blockgraph::drivers::qcow2::SnapshotInfo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A subcommand's result; a failure is its one-line message.
pub type Res<T> = Result<T, String>;

/// An error as the message the tool prints.
pub fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Prints a failure as one line on stderr.
pub fn fail(msg: &str) {
    eprintln!("img: {}", msg.replace('\n', " "));
}

/// A clap error as one line, in the tool's words: "unknown option",
/// "expected FILE", "needs a value"; a value parser's own message as it is.
pub fn usage_error(e: &clap::Error, subcommand: Option<&clap::Command>) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let get = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => Some(v.join(", ")),
        _ => None,
    };
    let did_you_mean = |kind| {
        get(kind)
            .map(|s| format!("; did you mean '{s}'?"))
            .unwrap_or_default()
    };
    let name = subcommand.map(clap::Command::get_name);
    let help = match name {
        Some(n) => format!(" (try 'img help {n}')"),
        None => " (try 'img help')".to_owned(),
    };
    let expected = subcommand.map(synopsis).unwrap_or_default();
    // "-f <FMT>" -> "-f".
    let option = || {
        get(ContextKind::InvalidArg)
            .and_then(|a| a.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default()
    };
    let msg = match e.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            format!("missing command{help}")
        }
        ErrorKind::InvalidSubcommand => format!(
            "unknown command '{}'{}{help}",
            get(ContextKind::InvalidSubcommand).unwrap_or_default(),
            did_you_mean(ContextKind::SuggestedSubcommand)
        ),
        ErrorKind::UnknownArgument => match get(ContextKind::InvalidArg) {
            Some(arg) if arg.starts_with('-') => format!(
                "unknown option '{arg}'{}{help}",
                did_you_mean(ContextKind::SuggestedArg)
            ),
            arg => format!(
                "unexpected argument '{}'; expected {expected}{help}",
                arg.unwrap_or_default()
            ),
        },
        ErrorKind::MissingRequiredArgument => format!("expected {expected}{help}"),
        ErrorKind::InvalidValue => match (
            get(ContextKind::InvalidValue),
            e.get(ContextKind::ValidValue),
        ) {
            (Some(v), Some(ContextValue::Strings(valid))) if !v.is_empty() => {
                format!("{} must be {}, not '{v}'", option(), one_of(valid))
            }
            _ => format!("option '{}' needs a value", option()),
        },
        // Our value parsers' messages say what was wrong on their own.
        ErrorKind::ValueValidation => match std::error::Error::source(e) {
            Some(source) => source.to_string(),
            None => first_line(e),
        },
        _ => first_line(e),
    };
    match name {
        Some(n) => format!("{n}: {msg}"),
        None => msg,
    }
}

/// The first line of clap's own message, without its "error: ".
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// A subcommand's positional arguments: "FILE [SIZE]", "SRC DST".
fn synopsis(cmd: &clap::Command) -> String {
    cmd.get_positionals()
        .map(|a| {
            let names = match a.get_value_names() {
                Some(names) => names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                None => a.get_id().as_str().to_uppercase(),
            };
            if a.is_required_set() {
                names
            } else {
                format!("[{names}]")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// "a, b or c".
fn one_of(values: &[String]) -> String {
    match values.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// A byte count for people: "1 MiB", "1.500 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

/// QEMU's `size_to_str`: three significant digits and a binary unit.
pub fn qemu_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit keeps the number below 1000 (so 1000 B is 0.977 KiB).
    let mut i = 0;
    while i + 1 < UNITS.len() && bytes as f64 >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}B", g3(v), UNITS[i])
}

/// C's `%0.3g` for 0 <= v < 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = v.abs().log10().floor() as i32;
    let decimals = (2 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// The snapshot table as `qemu-img snapshot -l` and `qemu-img info` print
/// it (dates in local time).
pub fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut out = String::from("Snapshot list:\n");
    let _ = writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            qemu_size(s.vm_state_size),
            local_time(s.date_sec),
            clock,
            icount
        );
    }
    out
}

/// `%Y-%m-%d %H:%M:%S` in the local time zone, as QEMU prints dates.
fn local_time(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: `localtime_r` writes only into `tm`, which lives here.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Prints `value` as JSON the way QEMU's JSON writer pretty-prints it.
pub fn print_json<T: serde::Serialize>(value: &T) -> Res<()> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter::default());
    value.serialize(&mut ser).map_err(err)?;
    out.push(b'\n');
    io::stdout().write_all(&out).map_err(err)
}

/// serde_json's output in QEMU's layout: four spaces per level, and empty
/// arrays and objects on two lines (`[` and `]` each on its own), as
/// `qemu-img info --output=json` prints them.
#[derive(Default)]
struct QemuFormatter {
    level: usize,
}

impl QemuFormatter {
    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        w.write_all(b"\n")?;
        self.indent(w)?;
        w.write_all(bracket)
    }

    /// Starts a line for the next element or key.
    fn next<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        w.write_all(if first { b"\n" } else { b",\n" })?;
        self.indent(w)
    }

    fn indent<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        for _ in 0..self.level {
            w.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.next(w, first)
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.next(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// `-p`'s progress bar of `len` steps, drawn on stderr (indicatif draws
/// only when stderr is a terminal); without `-p` a hidden one, so that
/// scripted output stays clean.
pub fn progress_bar(shown: bool, len: u64, template: &str) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(style)
}
