//! Child processes for the tests (and the bench) that run the examples:
//! finding or building an example binary, probing for and running tools,
//! and running a command within a time limit.
//!
//! `tests/img_tool.rs` and `tests/storage_daemon.rs` use it as
//! `common::process`; `benches/storage_daemon.rs` includes this file with
//! `#[path]` (it has no other dependency), hence the allowance below.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// `target/<profile>`, from the running test or bench binary
/// (`target/<profile>/deps/<name>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// `cargo build --example name` into this binary's target directory, in
/// its profile (`--release` for `target/release`); fails if cargo does.
pub fn build_example(name: &str) {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target dir");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args(["build", "--example", name, "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the {name} example failed");
}

/// The example `name`'s binary: the one `cargo test` built with the
/// examples, or, when it is missing or older than its sources
/// (`examples/<name>`, the library, the manifest; `cargo test --test x`
/// builds no examples), built here.
pub fn example_binary(name: &str) -> PathBuf {
    let bin = profile_dir().join("examples").join(name);
    let why = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
        Err(_) => "missing",
        Ok(built) if newest_source(name) > built => "older than its sources",
        Ok(_) => return bin,
    };
    // Straight to stderr: `eprintln!` would be captured by the harness.
    let _ = writeln!(
        std::io::stderr(),
        "{name}: {} is {why}; building it (cargo build --example {name})",
        bin.display()
    );
    build_example(name);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// When the example's sources (the example, the library, the manifest)
/// last changed.
fn newest_source(example: &str) -> SystemTime {
    fn newest(path: &Path) -> SystemTime {
        let Ok(meta) = std::fs::metadata(path) else {
            return SystemTime::UNIX_EPOCH;
        };
        let own = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        match std::fs::read_dir(path) {
            Ok(entries) => entries
                .flatten()
                .map(|e| newest(&e.path()))
                .fold(own, std::cmp::max),
            Err(_) => own,
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = format!("examples/{example}");
    [dir.as_str(), "src", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|p| newest(&root.join(p)))
        .max()
        .expect("some sources")
}

/// Whether `tool --version` can be run (the tool is installed).
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Says loudly, past the test harness's capture, that a check is skipped.
pub fn skip(what: &str) {
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {what} ***\n");
}

/// A command's stdout and stderr, one after the other, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion, failing with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    out
}

/// Runs `cmd`, failing with its output if it fails; its output as text.
pub fn run(cmd: &mut Command) -> String {
    text(&run_ok(cmd))
}

/// Runs the tool `name` with `args`, failing with its output if it fails;
/// its output as text.
pub fn tool(name: &str, args: &[&str]) -> String {
    run(Command::new(name).args(args))
}

/// Runs `cmd` to completion within `limit`, killing it past that.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

/// Waits until `holder` (a QEMU tool opening `path`) holds its locks on the
/// file, looking at `/proc/locks` only, so the wait itself takes no lock
/// that could make the holder's open fail. Panics if the holder exits or
/// no lock shows within `limit`.
pub fn wait_until_locked(path: &Path, holder: &mut std::process::Child, limit: Duration) {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(path)
        .expect("the locked file exists")
        .ino();
    let needle = format!(":{ino} ");
    let deadline = Instant::now() + limit;
    let count = || {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        locks.lines().filter(|l| l.contains(&needle)).count()
    };
    loop {
        // QEMU takes its lock bytes in more than one step: wait until
        // their number has held still for 100 ms.
        let seen = count();
        if seen > 0 {
            std::thread::sleep(Duration::from_millis(100));
            if count() == seen {
                return;
            }
            continue;
        }
        if let Ok(Some(status)) = holder.try_wait() {
            panic!(
                "the process that was to hold {} exited: {status}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "watchdog: no lock on {} within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
