//! Every byte reaches only its own connection (issue #26). A fresh SAN
//! connection opened right after another one closed, in the same process and
//! most likely in the same socket slot, must never read the earlier one's
//! bytes, and must always end: the end of the stream or a reset, never
//! neither. Checked through each face of the application side:
//! `provider-shim/tests/c/reuse.c` against `dsan_provider.h` and against
//! `dsan_switch.h`, and `control/tests/py/reuse_pair.py` unmodified under
//! `libdsan_preload.so` (and, as the reference, on plain kernel TCP).
//! Then churn: 100,000 connections from 16 threads of one process, each
//! echo compared byte for byte with what that connection sent, on a clean
//! link and at 1 % loss. Needs root.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const METRICS_BASE: u16 = 19450;

/// Compiles reuse.c once per test process, against the provider or the switch.
fn reuse_bin(switch: bool) -> PathBuf {
    static PROVIDER: OnceLock<PathBuf> = OnceLock::new();
    static SWITCH: OnceLock<PathBuf> = OnceLock::new();
    let cell = if switch { &SWITCH } else { &PROVIDER };
    cell.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "dsan-harness-reuse-{}-{}",
            if switch { "sw" } else { "prov" },
            std::process::id()
        ));
        let mut c = Command::new("cc");
        c.args(["-Wall", "-Wextra", "-Werror", "-O2", "-I"])
            .arg(root().join("provider-shim/include"))
            .arg("-I")
            .arg(root().join("control/include"));
        if switch {
            c.arg("-DVIA_SWITCH");
        }
        let st = c
            .arg(root().join("provider-shim/tests/c/reuse.c"))
            .arg("-L")
            .arg(bindir())
            .arg(if switch {
                "-ldsan_switch"
            } else {
                "-ldsan_provider"
            })
            .args(["-lpthread", "-o"])
            .arg(&out)
            .status()
            .expect("cc");
        assert!(st.success(), "compiling reuse.c failed");
        out
    })
    .clone()
}

/// A server in h1: started, "listening" awaited.
fn server(c: Command) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    started(c, "listening")
}

/// Runs a client to completion within `secs`; its stdout.
fn client(mut c: Command, secs: u64) -> String {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn client");
    let out = lines(&mut child);
    let mut child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut text = String::new();
    loop {
        match out.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                text.push_str(&l);
                text.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "client still running after {secs} s:\n{text}"
        );
    }
    let st = child.0.wait().expect("wait");
    assert!(st.success(), "client failed ({st}):\n{text}");
    text
}

/// The numbers after each word of the last line that starts with `first`.
fn fields(text: &str, first: &str) -> std::collections::HashMap<String, u64> {
    let l = text
        .lines()
        .rev()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("no {first:?} line in:\n{text}"));
    let w: Vec<&str> = l.split_whitespace().collect();
    w.chunks(2)
        .map(|p| (p[0].to_string(), p[1].parse().expect("a number")))
        .collect()
}

/// Asserts a reuse client's summary: no foreign byte, no hang, every A's
/// reply its own, every B ended (EOF or reset). Returns (eof, reset).
fn assert_clean_rounds(text: &str, rounds: u64) -> (u64, u64) {
    let f = fields(text, "rounds");
    assert_eq!(f["rounds"], rounds, "{text}");
    assert_eq!(
        f["foreign"], 0,
        "fresh connections read foreign bytes:\n{text}"
    );
    assert_eq!(
        f["hung"], 0,
        "fresh connections neither ended nor reset:\n{text}"
    );
    assert_eq!(f["badreply"], 0, "replies went astray:\n{text}");
    assert_eq!(f["eof"] + f["reset"], rounds, "{text}");
    (f["eof"], f["reset"])
}

/// h1's accepted SAN connections (its metrics, scraped from the root namespace).
fn san_accepted() -> u64 {
    metric(
        &scrape(METRICS_BASE + 1),
        "dsan_san_connects_accepted_total",
    )
}

const ROUNDS: u64 = 1000;

fn reuse_rounds(switch: bool, abort: bool, port: u16) -> (u64, u64) {
    let bin = reuse_bin(switch);
    let p = port.to_string();
    let r = ROUNDS.to_string();
    let mut args = vec!["server", p.as_str(), r.as_str()];
    if abort {
        args.push("abort");
    }
    let before = san_accepted();
    let (_srv, out) = server(in_host("h1", &bin, &args));
    let text = client(in_host("h0", &bin, &["client", "198.18.0.2", &p, &r]), 120);
    let served = out
        .recv_timeout(Duration::from_secs(10))
        .expect("the server finishes");
    assert_eq!(served, format!("served {ROUNDS}"));
    let got = assert_clean_rounds(&text, ROUNDS);
    // Two connections a round, every one over the SAN.
    assert_eq!(san_accepted() - before, 2 * ROUNDS);
    got
}

#[test]
fn provider_fresh_connections_read_only_their_own_bytes() {
    let _lab = Lab::up(&[]);
    // B closed normally: its reader sees the end of the stream.
    let (eof, _) = reuse_rounds(false, false, 7300);
    assert_eq!(eof, ROUNDS);
    // B closed with SO_LINGER {1, 0}: a reset, every time.
    let (_, reset) = reuse_rounds(false, true, 7301);
    assert_eq!(reset, ROUNDS);
}

#[test]
fn switch_fresh_connections_read_only_their_own_bytes() {
    let _lab = Lab::up(&[]);
    let (eof, _) = reuse_rounds(true, false, 7302);
    assert_eq!(eof, ROUNDS);
}

fn python_pair(preload: bool, port: u16) -> String {
    let script = root().join("control/tests/py/reuse_pair.py");
    let s = script.display().to_string();
    let p = port.to_string();
    let r = ROUNDS.to_string();
    let cmd = |host: &str, args: &[&str]| -> Command {
        let mut c = in_host(host, Path::new("python3"), args);
        if preload {
            c.env("LD_PRELOAD", bindir().join("libdsan_preload.so"));
        }
        c
    };
    let (_srv, out) = server(cmd("h1", &[&s, "server", &p, &r]));
    let text = client(cmd("h0", &[&s, "client", "198.18.0.2", &p, &r]), 180);
    let served = out
        .recv_timeout(Duration::from_secs(10))
        .expect("the server finishes");
    assert_eq!(served, format!("served {ROUNDS}"));
    text
}

#[test]
fn preloaded_programs_fresh_connections_read_only_their_own_bytes() {
    let _lab = Lab::up(&[]);
    // The reference: the same pair on kernel TCP.
    let tcp = python_pair(false, 7303);
    assert_clean_rounds(&tcp, ROUNDS);
    let before = san_accepted();
    let san = python_pair(true, 7304);
    let (_, reset) = assert_clean_rounds(&san, ROUNDS);
    // SO_LINGER {1, 0} on the server's B resets it over the SAN too.
    assert_eq!(reset, ROUNDS, "{san}");
    assert_eq!(san_accepted() - before, 2 * ROUNDS, "the SAN carried both");
}

/// 100,000 connections from 16 threads of one process, each echo checked.
fn churn(lab_args: &[&str], port: u16) {
    let _lab = Lab::up(lab_args);
    let bin = reuse_bin(false);
    let p = port.to_string();
    let before = san_accepted();
    let (_srv, _out) = server(in_host("h1", &bin, &["churn-server", &p]));
    let text = client(
        in_host(
            "h0",
            &bin,
            &["churn-client", "198.18.0.2", &p, "16", "6250"],
        ),
        300,
    );
    let f = fields(&text, "conns");
    assert_eq!(f["conns"], 100_000, "{text}");
    assert_eq!(
        f["bad"], 0,
        "echoes that were not their connection's bytes:\n{text}"
    );
    assert_eq!(f["errors"], 0, "{text}");
    // Every 64th connection closes before its echo: the rest were compared.
    assert!(f["bytes"] > 60_000_000, "{text}");
    assert!(san_accepted() - before >= 100_000);
}

#[test]
fn churn_one_hundred_thousand_connections_every_byte_its_own() {
    churn(&[], 7305);
}

#[test]
fn churn_one_hundred_thousand_connections_at_one_percent_loss() {
    churn(&["--loss", "0.01"], 7306);
}
