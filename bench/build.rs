//! Records which source the benchmark was built from (the commit, and
//! whether the tree had uncommitted changes), for the provenance of every
//! figure it writes. Outside a git checkout both read "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    // Rebuilt when HEAD moves or the index changes (a commit, an add), and
    // when any source of the workspace changes (an edit changes neither:
    // without these, a benchmark built after an uncommitted change to
    // another crate claimed the clean commit). Cargo looks at every file
    // under a directory it is given.
    for f in [
        "../.git/HEAD",
        "../.git/index",
        "../.git/refs/heads",
        "../Cargo.toml",
        "../Cargo.lock",
        "../bench/src",
        "../bench/Cargo.toml",
        "../channel",
        "../control",
        "../dataplane",
        "../dpdk-sys",
        "../preload",
        "../provider-shim",
        "../scripts",
        "../deploy",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Benchmark output under docs/bench is what a run writes, not source.
    let dirty = match git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ":(top)",
        ":(top,exclude)docs/bench",
    ]) {
        Some(s) => (!s.is_empty()).to_string(),
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=DSAN_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=DSAN_BUILD_DIRTY={dirty}");
}
