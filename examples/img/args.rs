//! Shared command-line pieces: the options every subcommand takes, image
//! formats, `-o` creation options, and the parsers of sizes, counts and
//! durations (each failure says which option it was about).

use std::time::Duration;

use blockgraph::drivers::qcow2::{CreateOptions, Preallocation};

use crate::output::human;

/// The options every subcommand accepts.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The image format: raw or qcow2 (default: probed; create: raw)
    #[arg(short = 'f', long = "format", value_name = "FMT", allow_hyphen_values = true,
          value_parser = format_parser("format"))]
    pub format: Option<Format>,
    /// Open images others are writing (no write lock conflict)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Let backing file names be absolute or leave the image's directory
    #[arg(long)]
    pub allow_absolute: bool,
}

/// An image format the tool reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Parses a format; `what` names it in the error ("output format").
pub fn format_parser(what: &'static str) -> impl Fn(&str) -> Result<Format, String> + Clone {
    move |s| match s {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        _ => Err(format!("unknown {what} '{s}' (raw or qcow2)")),
    }
}

/// `-o cluster_size=SIZE,compat=0.10|1.1,preallocation=MODE`: how a new
/// image is laid out (only `preallocation` applies to raw images).
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageOptions {
    pub cluster_size: Option<u64>,
    /// The qcow2 version: 2 (compat=0.10) or 3 (compat=1.1, the default).
    pub version: Option<u32>,
    /// QEMU's `preallocation=off|metadata|falloc|full` (default off).
    pub preallocation: Option<Preallocation>,
}

impl ImageOptions {
    pub fn parse(s: &str) -> Result<ImageOptions, String> {
        let mut o = ImageOptions::default();
        for (k, v) in parse_kv(s) {
            match k.as_str() {
                "cluster_size" => o.cluster_size = Some(parse_size("-o cluster_size", &v)?),
                "compat" => {
                    o.version = Some(match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(format!("-o compat must be 0.10 or 1.1, not '{v}'")),
                    })
                }
                "preallocation" => {
                    o.preallocation = Some(v.parse().map_err(|_| {
                        format!("-o preallocation must be off, metadata, falloc or full, not '{v}'")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "unknown -o option '{k}' (cluster_size, compat, preallocation)"
                    ))
                }
            }
        }
        Ok(o)
    }

    /// Whether any option was given.
    pub fn is_empty(&self) -> bool {
        self.qcow2_only_empty() && self.preallocation.is_none()
    }

    /// Whether no qcow2-only option was given (a raw image takes only
    /// `preallocation`).
    pub fn qcow2_only_empty(&self) -> bool {
        self.cluster_size.is_none() && self.version.is_none()
    }

    /// The preallocation mode asked for (off when none was).
    pub fn prealloc(&self) -> Preallocation {
        self.preallocation.unwrap_or_default()
    }

    /// The library's options for a new qcow2 image of `size` bytes.
    pub fn qcow2(&self, size: u64) -> CreateOptions {
        let mut opts = CreateOptions::new(size)
            .version(self.version.unwrap_or(3))
            .preallocation(self.prealloc());
        if let Some(cs) = self.cluster_size {
            opts = opts.cluster_size(cs);
        }
        opts
    }
}

/// A byte count: digits with an optional k/M/G/T/P suffix (powers of 1024).
pub fn parse_size(what: &str, s: &str) -> Result<u64, String> {
    let bad =
        || format!("{what}: '{s}' is not a size (a number with an optional k, M, G or T suffix)");
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                _ => return Err(bad()),
            };
            (&s[..s.len() - 1], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A size option's parser: more than 0 and at most `max` bytes.
pub fn size_parser(what: &'static str, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| {
        let n = parse_size(what, s)?;
        if n == 0 && max == u64::MAX {
            Err(format!("{what} must be positive"))
        } else if n == 0 || n > max {
            Err(format!("{what} must be 1 byte to {}", human(max)))
        } else {
            Ok(n)
        }
    }
}

/// A whole number from `min` to `max`.
pub fn parse_count(what: &str, s: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{what}: '{s}' is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{what} must be {min} to {max}, not {n}"));
    }
    Ok(n)
}

/// [`parse_count`] as an option's parser.
pub fn count_parser(
    what: &'static str,
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| parse_count(what, s, min, max)
}

/// A number of seconds, more than 0 and at most a day.
pub fn seconds_parser(what: &'static str) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |s| {
        let v: f64 = s
            .parse()
            .map_err(|_| format!("{what}: '{s}' is not a number of seconds"))?;
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return Err(format!(
                "{what} must be more than 0 and at most 86400 seconds"
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// `key=value,key=value` (a bare `key` means `key=on`).
pub fn parse_kv(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => (p.trim().to_owned(), "on".to_owned()),
        })
        .collect()
}

/// `on`/`off` and their synonyms.
pub fn parse_bool(what: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{what}: '{v}' is not on or off")),
    }
}
