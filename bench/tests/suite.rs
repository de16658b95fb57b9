//! A smoke run of every scenario of `dsan-bench suite` in the lab (both idle
//! policies, seconds), checked for well-formed output and consistent numbers,
//! and its .hlog read back by an independent reader (the `hdrhistogram`
//! Python package). Needs root.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_dsan-bench");

/// The lab is one per machine: tests that bring it up take turns.
static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab_turn() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: scripts/setup.sh creates it (hdrhistogram, matplotlib)",
        venv.display()
    );
    venv
}

/// An independent reader, HdrHistogram's Python package, decodes `dir`'s
/// .hlog and finds the counts and percentiles its summary.json states.
fn check_hlog(dir: &std::path::Path) {
    let check = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("check_hlog.py");
    let o = Command::new(python()).arg(check).arg(dir).output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn smoke_run_of_every_scenario() {
    let _turn = lab_turn();
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-bench-smoke-{}", std::process::id()));
    let o = Command::new(BENCH)
        .args(["suite", "--smoke", "--out"])
        .arg(&out)
        .env("DSAN_PYTHON", python())
        .output()
        .unwrap();
    let _ = Command::new(BENCH.replace("dsan-bench", "dsanctl"))
        .args(["lab", "down"])
        .status();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("ratio"), "{table}");
    assert!(table.contains("kernel TCP did not refuse"), "{table}");

    let png = std::fs::read(out.join("bench.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let hlog = std::fs::read_to_string(out.join("bench.hlog")).unwrap();
    assert!(hlog.contains("HISTFAAA"), "V2 compressed histograms");
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(s["machine"]["cpus"].as_u64().unwrap() >= 1);
    let rows = s["results"].as_array().unwrap();
    let scenarios: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios.into_iter().collect::<Vec<_>>(),
        vec![
            "connect",
            "crr",
            "no-listener",
            "overload",
            "pingpong-16k",
            "pingpong-1k",
            "pingpong-64",
            "rate-closed",
            "rate-open",
            "reject",
            "stream"
        ]
    );
    for policy in ["adaptive", "poll"] {
        assert!(
            rows.iter().any(|r| r["policy"] == policy),
            "no rows for {policy}"
        );
    }
    for r in rows {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let tag = r["tag"].as_str().unwrap();
        let hgrm = out.join(format!("{}.hgrm", tag.replace('/', "-")));
        assert!(hgrm.exists(), "{}", hgrm.display());
        match (
            r["scenario"].as_str().unwrap(),
            r["transport"].as_str().unwrap(),
            r["measure"].as_str().unwrap(),
        ) {
            (_, _, "connected") => assert_eq!(
                n("count") + n("errors") + n("refused"),
                n("attempts"),
                "{tag}: counts add up"
            ),
            ("reject", "dsan", _) => {
                assert_eq!(
                    n("refused"),
                    n("attempts"),
                    "{tag}: every connect into the full backlog refused"
                );
                assert_eq!(n("count"), n("refused"));
            }
            ("reject", "tcp", _) => assert_eq!(
                n("refused"),
                0,
                "{tag}: kernel TCP does not refuse a full backlog"
            ),
            ("no-listener", _, _) => assert_eq!(n("refused"), n("attempts"), "{tag}: refused"),
            _ => {}
        }
        if r["count"].as_u64().unwrap() > 0 {
            let p = |k: &str| r[k].as_u64().unwrap();
            assert!(
                p("p50_ns") <= p("p90_ns")
                    && p("p90_ns") <= p("p99_ns")
                    && p("p99_ns") <= p("p999_ns")
                    && p("p999_ns") <= p("max_ns"),
                "{tag}"
            );
        }
        if r["scenario"].as_str().unwrap().starts_with("rate") {
            assert!(r["rate_per_s"].as_f64().unwrap() > 0.0, "{tag}");
            // CPU per setup: both daemons and the clients and servers.
            assert!(r["cpu_us_per_setup"].as_f64().unwrap() > 0.0, "{tag}");
            // ... by class: the daemons and both sides of the harness used
            // some; the machine's idle and steal are reported beside them.
            let c = &r["cpu_per_op"];
            for k in ["daemons_us", "server_us", "client_us"] {
                assert!(c[k].as_f64().unwrap() > 0.0, "{tag}: {k} in {c}");
            }
            for k in [
                "system_us",
                "softirq_us",
                "idle_us",
                "steal_us",
                "steal_pct",
            ] {
                assert!(c[k].as_f64().is_some(), "{tag}: {k} in {c}");
            }
            // The servers wait for connections (blocking), not spin.
            assert_eq!(r["accept"], "waiting", "{tag}");
        }
        // Two runs (the smoke run's), each row keeping both; every dsan row
        // with its ratio to each TCP row of the same scenario, per run, with
        // the median and the range.
        assert_eq!(r["runs"].as_array().unwrap().len(), 2, "{tag}");
        if r["transport"] == "dsan" && r["scenario"] != "reject" {
            let vs = r["vs"]["tcp"]["rate"].clone();
            if r["rate_per_s"].as_f64().is_some() {
                let runs = vs["runs"].as_array().expect("per-run ratios");
                assert_eq!(runs.len(), 2, "{tag}: {vs}");
                let (lo, m, hi) = (
                    vs["min"].as_f64().unwrap(),
                    vs["median"].as_f64().unwrap(),
                    vs["max"].as_f64().unwrap(),
                );
                assert!(lo <= m && m <= hi, "{tag}: {vs}");
            }
        }
    }
    // Kernel TCP twice in the rate and overload scenarios: defaults, and
    // tuned as its users tune it.
    for sc in ["rate-closed", "rate-open", "overload"] {
        for t in ["dsan", "tcp", "tcp-tuned"] {
            assert!(
                rows.iter()
                    .any(|r| r["scenario"] == sc && r["transport"] == t),
                "no {sc} / {t} row"
            );
        }
    }
    // The latency breakdown: for each policy, the traced connects (the
    // accepting thread spinning and waiting) and refusals, every hop
    // measured, the hops adding up to the total (each connect's hops are
    // consecutive stamps of one clock), and the table's kernel TCP total
    // beside it.
    let bs = s["breakdown"].as_array().expect("breakdown");
    assert_eq!(bs.len(), 6, "3 per policy: {bs:?}");
    for b in bs {
        let traced = b["traced"].as_u64().unwrap();
        // (With the poll policy two daemons take both of this machine's
        // two cores, and many connects time out: some must still line up.)
        assert!(traced > 0, "{b}");
        let hops = b["hops"].as_array().unwrap();
        assert_eq!(
            hops.len(),
            if b["scenario"] == "connect" { 10 } else { 7 },
            "{b}"
        );
        assert!(hops.iter().all(|h| h["p50_ns"].as_u64().is_some()), "{b}");
        let total = b["total"]["p50_ns"].as_u64().unwrap();
        assert!(
            total > 0 && b["tcp_total"]["p50_ns"].as_u64().is_some(),
            "{b}"
        );
    }
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("breakdown: connect"), "{table}");
    assert!(table.contains("wire: request frame h0 -> h1"), "{table}");
    // The paths of each comparison alternate: the second run went tcp first.
    let err = String::from_utf8_lossy(&o.stderr);
    let first = |run: &str| {
        err.lines()
            .find(|l| l.contains("rate-closed /") && l.contains(run))
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert!(first("[run 1/2]").contains("/ dsan"), "{err}");
    assert!(first("[run 2/2]").contains("/ tcp"), "{err}");
    assert!(s["config"]["machine_during_run"]["steal_pct"]
        .as_f64()
        .is_some());
    // Where and when the figures were made.
    assert!(s["provenance"]["commit"]
        .as_str()
        .is_some_and(|c| c.len() == 40 || c == "unknown"));
    assert!(s["provenance"]["date"]
        .as_str()
        .is_some_and(|d| d.starts_with("20")));
    assert!(s["provenance"]["command"]
        .as_str()
        .is_some_and(|c| c.contains("suite")));

    // An independent reader: HdrHistogram's Python package decodes the log.
    check_hlog(&out);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn help_documents_every_flag_and_bad_flags_fail_in_one_line() {
    let o = Command::new(BENCH)
        .args(["suite", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--count",
        "--concurrency",
        "--rate",
        "--duration-ms",
        "--overload-accept",
        "--reject-wait-ms",
        "--idle",
        "--out",
        "--smoke",
    ] {
        assert!(help.contains(flag), "{flag} undocumented:\n{help}");
    }
    let o = Command::new(BENCH)
        .args(["suite", "--bogus"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--bogus"));
    let o = Command::new(BENCH)
        .args(["suite", "--count", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

/// The figures published in docs/benchmarks.md: their interval log, read
/// back by an independent reader, gives the counts and percentiles their
/// summary.json states, and they say where they come from.
#[test]
fn published_figures_match_their_hlog() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/bench/suite");
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let p = &s["provenance"];
    assert_eq!(p["commit"].as_str().map(str::len), Some(40), "{p}");
    assert!(
        p["command"]
            .as_str()
            .unwrap()
            .contains("--out docs/bench/suite"),
        "{p}"
    );
    assert!(p["date"].as_str().unwrap().starts_with("20"), "{p}");
    check_hlog(&dir);
}

/// Takes the lab down when dropped (also when the test fails).
struct LabDown;
impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Command::new(BENCH.replace("dsan-bench", "dsanctl"))
            .args(["lab", "down"])
            .status();
    }
}

/// Two-host mode, exercised between the lab's two namespaces: `serve` in
/// h1 (attached to h1's dsand), `run --peer` in h0 (attached to h0's).
#[test]
fn two_host_mode_runs_between_two_namespaces() {
    let _turn = lab_turn();
    let dsanctl = BENCH.replace("dsan-bench", "dsanctl");
    let _ = Command::new(&dsanctl).args(["lab", "down"]).status();
    let up = Command::new(&dsanctl).args(["lab", "up"]).output().unwrap();
    let _down = LabDown;
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let mut serve = Command::new("ip")
        .args([
            "netns", "exec", "dsan-h1", BENCH, "serve", "--port", "31000",
        ])
        .args(["--socket", "/run/dsan/lab/h1/dsand.sock"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let out = serve.stdout.take().unwrap();
    let serve = Kill(serve);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("serve printed nothing within 20 s");
    assert!(first.starts_with("serving port 31000"), "{first}");

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-bench-peer-{}", std::process::id()));
    let mut run = Command::new("ip")
        .args([
            "netns",
            "exec",
            "dsan-h0",
            BENCH,
            "run",
            "--peer",
            "198.18.0.2",
        ])
        .args(["--port", "31000", "--count", "50", "--duration-ms", "300"])
        .args(["--socket", "/run/dsan/lab/h0/dsand.sock", "--out"])
        .arg(&dir)
        .env("DSAN_PYTHON", python())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = run.kill();
            panic!("dsan-bench run still running after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let o = run.wait_with_output().unwrap();
    assert!(
        status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    drop(serve);
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["config"]["mode"], "two-host");
    assert!(s["provenance"]["commit"].as_str().is_some());
    let rows = s["results"].as_array().unwrap();
    let get = |sc: &str, t: &str| {
        rows.iter()
            .find(|r| r["scenario"] == sc && r["transport"] == t)
            .unwrap_or_else(|| panic!("no {sc} / {t} row: {s}"))
    };
    for t in ["dsan", "tcp"] {
        assert_eq!(get("connect", t)["count"], 50, "{s}");
        assert_eq!(get("no-listener", t)["refused"], 50, "{s}");
        assert!(
            get("rate-closed", t)["rate_per_s"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
    // The SAN connects went over the SAN: h0's daemon counted them.
    let st = Command::new(&dsanctl)
        .args(["--json", "--socket", "/run/dsan/lab/h0/dsand.sock", "stats"])
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        st["connect_attempts"]["connected"].as_u64().unwrap_or(0) >= 50,
        "h0's daemon counted too few SAN connects: {st}"
    );
    check_hlog(&dir);
    let _ = std::fs::remove_dir_all(dir);
}
