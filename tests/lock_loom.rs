//! Runs the loom models of the graph lock (`src/sync/tests/loom_lock.rs`)
//! through cargo's test runner:
//!
//! ```sh
//! cargo test --test lock_loom -- --ignored
//! ```
//!
//! The models need the whole crate built with `--cfg loom` (loom's atomics,
//! mutexes and threads replace std's in `src/sync/primitives.rs`), which a
//! normal test build cannot be, so this test runs a nested
//! `cargo test --lib sync::tests::loom` with `RUSTFLAGS="--cfg loom"` in a
//! target directory of its own (under this build's `CARGO_TARGET_TMPDIR`),
//! the way `trybuild` runs its nested builds. The first run builds the
//! crate and its dependencies again (a couple of minutes on 2 cores); the
//! models then take 15-60 s unoptimised (loom itself is built with
//! `opt-level = 3`). That second build is why the test is `#[ignore]`d: a
//! plain `cargo test` does not start it, and `.ci/run` runs it explicitly
//! after `cargo test`.
//!
//! Bounds: 3 preemptions, 2 for the three-thread queue model, unless
//! `LOOM_MAX_PREEMPTIONS` is set, which is passed through. The deeper runs
//! (optimised; about 45 s, and about 25 min with `=4`, on 2 cores):
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release --lib sync::tests::loom
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=4 cargo test --release --lib sync::tests::loom
//! ```

use std::path::Path;
use std::process::Command;

/// How many `loom_*` models `src/sync/tests/loom_lock.rs` defines; the
/// nested run must report at least this many passing (a filter that
/// matched nothing would pass vacuously).
const MODELS: usize = 8;

#[test]
#[ignore = "builds the crate a second time with --cfg loom (minutes); run it with `cargo test --test lock_loom -- --ignored` (.ci/run does)"]
fn loom_models_of_the_graph_lock_pass() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("loom");
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(" --cfg loom");

    let output = Command::new(cargo)
        .arg("test")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--lib", "--config", "profile.dev.package.loom.opt-level=3"])
        .args(["sync::tests::loom", "--", "--test-threads=2"])
        .env("RUSTFLAGS", rustflags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .expect("could not run the nested cargo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loom models failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(
        passed >= MODELS,
        "expected at least {MODELS} loom models to pass, saw {passed}\n{stdout}"
    );
    println!("{stdout}");
}
