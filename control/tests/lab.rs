//! Lab tests: real dsand daemons with real DPDK (net_af_packet, net_memif) in
//! network namespaces that the tests create and remove. They need root and the
//! DPDK packages (scripts/setup.sh installs them); they run one at a time.

mod common;
use common::*;

use serde_json::Value;
use std::process::{Command, Output};

/// `dsand --check` accepted the configuration.
fn assert_check_ok(o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("ok:"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).expect("JSON output")
}

/// The daemon's status (the lcore publishes its counters for it).
fn status(host: &str) -> Value {
    json_of(&dsanctl(&[
        "--json",
        "--socket",
        &format!("/run/dsan/lab/{host}/dsand.sock"),
        "status",
    ]))
}

fn ping(from: &str, dst: &str, count: u32) -> (Output, Option<Value>) {
    let c = count.to_string();
    let o = dsanctl(&[
        "lab",
        "exec",
        from,
        "--",
        DSANCTL,
        "--json",
        "ping",
        dst,
        "--count",
        &c,
        "--timeout-ms",
        "200",
    ]);
    let v = serde_json::from_slice(&o.stdout).ok();
    (o, v)
}

fn exchange_and_count(policy: &str) {
    let (o, v) = ping("h0", "198.18.0.2", 300);
    let v = v.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    assert!(o.status.success(), "{v}");
    assert_eq!(
        (v["sent"].as_u64(), v["received"].as_u64()),
        (Some(300), Some(300))
    );
    assert_eq!(v["rtt_ns"].as_array().unwrap().len(), 300);

    let h0 = status("h0");
    let h1 = status("h1");
    assert_eq!(h0["idle"], policy);
    assert_eq!(h1["idle"], policy);
    assert_eq!(
        h1["frames_received"]["echo_request"].as_u64(),
        Some(300),
        "{h1}"
    );
    assert_eq!(h1["frames_sent"]["echo_reply"].as_u64(), Some(300), "{h1}");
    assert_eq!(
        h0["frames_sent"]["echo_request"].as_u64(),
        Some(300),
        "{h0}"
    );
    assert_eq!(
        h0["frames_received"]["echo_reply"].as_u64(),
        Some(300),
        "{h0}"
    );
    assert!(
        h1["port_stats"]["ipackets"].as_u64().unwrap() >= 301,
        "{h1}"
    );
    assert!(
        h0["port_stats"]["opackets"].as_u64().unwrap() >= 301,
        "{h0}"
    );
    if policy == "poll" {
        assert_eq!(h0["lcore_stats"]["sleeps"].as_u64(), Some(0));
    } else {
        assert!(h0["lcore_stats"]["sleeps"].as_u64().unwrap() > 0);
    }
    // The same counts over HTTP, from the root namespace.
    let body = scrape(19451);
    assert_eq!(
        metric(
            &body,
            "dsan_san_frames_received_total{kind=\"echo_request\"}"
        ),
        300
    );
    assert!(metric(&body, "dsan_port_rx_packets_total") >= 301);
    assert!(metric(&body, "dsan_lcore_polls_total{state=\"busy\"}") > 0);
    assert!(body.contains(&format!("idle_policy=\"{policy}\"")));
    if policy == "adaptive" && h1["pmd"] == "net_af_packet" {
        // A sleeping lcore is woken by a frame (a packet socket on its
        // interface), so an idle one sleeps until work instead of waking
        // every 50 us: over a measurement window of one second (not a
        // synchronisation) it goes to sleep a handful of times, not 20,000.
        assert_eq!(h1["rx_wake"], "packet-socket", "{h1}");
        let before = status("h1")["lcore_stats"]["sleeps"].as_u64().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let after = status("h1")["lcore_stats"].clone();
        let slept = after["sleeps"].as_u64().unwrap() - before;
        assert!(slept < 100, "{slept} sleeps in one idle second: {after}");
        assert!(after["wake_sleeps"].as_u64().unwrap() > 0, "{after}");
        // And a frame still wakes it at once: every probe answered.
        let (o, v) = ping("h0", "198.18.0.2", 20);
        let v = v.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&o.stderr)));
        assert_eq!(v["received"].as_u64(), Some(20), "{v}");
    }
}

#[test]
fn af_packet_frames_both_ways_adaptive() {
    let _lab = Lab::up(&["--idle", "adaptive"]);
    exchange_and_count("adaptive");
}

/// The CPUs in a `Cpus_allowed_list` line ("0-3,6").
fn cpus(list: &str) -> usize {
    list.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn only_the_lcore_is_pinned() {
    // The lcore has its core; every other thread of the daemon (control,
    // per-connection, metrics, signals, address and TCP-listener
    // watchers, notifiers) may run on any CPU, so none of them takes the
    // lcore's core from it (DPDK's own service threads are EAL's to place).
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) } as usize;
    if n < 2 {
        eprintln!("one CPU: nothing to tell apart");
        return;
    }
    let _lab = Lab::up(&[]);
    // An attached process with an event descriptor starts a notifier.
    let (o, _) = ping("h0", "198.18.0.2", 1);
    assert!(o.status.success());
    for host in ["h0", "h1"] {
        let pid = status(host)["pid"].as_u64().unwrap();
        let mut ours = 0;
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let t = t.unwrap().path();
            let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
            let comm = comm.trim();
            let st = std::fs::read_to_string(t.join("status")).unwrap_or_default();
            let Some(list) = st
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            else {
                continue; // the thread ended meanwhile
            };
            let allowed = cpus(list.trim());
            if comm == "dsand" {
                assert_eq!(allowed, 1, "{host}'s lcore: {list}");
            } else if [
                "tcp-listeners",
                "signals",
                "metrics",
                "control",
                "addrs",
                "control-conn",
            ]
            .contains(&comm)
                || comm.starts_with("notify-")
            {
                ours += 1;
                assert_eq!(allowed, n, "{host}'s thread {comm}: {list}");
            }
        }
        assert!(ours >= 5, "{host}: {ours} threads of ours");
    }
}

#[test]
fn af_packet_frames_both_ways_poll() {
    let _lab = Lab::up(&["--idle", "poll"]);
    exchange_and_count("poll");
}

#[test]
fn memif_frames_both_ways() {
    let _lab = Lab::up(&["--mode", "memif"]);
    exchange_and_count("adaptive");
    assert_eq!(status("h0")["pmd"], "net_memif");
}

#[test]
fn three_hosts_through_a_bridge() {
    let _lab = Lab::up(&["--hosts", "3"]);
    for (from, dst) in [("h0", "198.18.0.3"), ("h2", "198.18.0.2")] {
        let (o, v) = ping(from, dst, 20);
        assert!(o.status.success(), "{v:?}");
    }
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(ns.contains("dsan-fabric") && ns.contains("dsan-h2"), "{ns}");
}

#[test]
fn exec_stop_and_start() {
    let _lab = Lab::up(&[]);
    let o = dsanctl(&[
        "lab",
        "exec",
        "h1",
        "--",
        "sh",
        "-c",
        "echo $DSAN_SOCKET; ip -o -4 addr show san0",
    ]);
    let out = ok(&o);
    assert!(out.contains("/run/dsan/lab/h1/dsand.sock"), "{out}");
    assert!(out.contains("198.18.0.2/24"), "{out}");
    // The deploy example configuration passes --check inside a lab host.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/lab-af_packet.toml"
    );
    let o = dsanctl(&[
        "lab",
        "exec",
        "h0",
        "--",
        DSAND,
        "--check",
        "--config",
        example,
        "--control-socket",
        "/run/dsan/lab/h0/check.sock",
    ]);
    assert_check_ok(&o);
    // Exit codes of the command come through.
    assert_eq!(
        dsanctl(&["lab", "exec", "h0", "--", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );

    ok(&dsanctl(&["lab", "stop", "h1"]));
    let (o, v) = ping("h0", "198.18.0.2", 1);
    assert!(!o.status.success());
    assert_eq!(
        v.unwrap()["mac"],
        Value::Null,
        "nobody answers resolution for a stopped host"
    );
    ok(&dsanctl(&["lab", "start", "h1"]));
    let (o, _) = ping("h0", "198.18.0.2", 10);
    assert!(o.status.success());
    // Starting a running daemon is refused with one line.
    let o = dsanctl(&["lab", "start", "h1"]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

#[test]
fn down_cleans_up_after_a_crash_and_is_idempotent() {
    require_root();
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ok(&dsanctl(&["lab", "down"]));
    ok(&dsanctl(&["lab", "up"]));
    // Crash: the daemons die without cleaning up, and the state directory is lost.
    let _ = Command::new("pkill")
        .args(["-9", "-f", "--", "--file-prefix=dsan-h"])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Command::new("pgrep")
        .args(["-f", "--", "--file-prefix=dsan-h"])
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemons did not die"
        );
        std::thread::yield_now();
    }
    std::fs::remove_dir_all("/run/dsan/lab").unwrap();
    // A second lab cannot come up over the leftovers...
    let o = dsanctl(&["lab", "up"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lab down"));
    // ...and down removes them, twice without complaint.
    ok(&dsanctl(&["lab", "down"]));
    assert_clean();
    ok(&dsanctl(&["lab", "down"]));
    assert_clean();
    drop(g);
}

fn one_error_line(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "expected one line, got:\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(!err.contains("panicked"));
}

fn dsand(args: &[&str]) -> Output {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsand-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let mut a = vec![
        "--no-huge".to_string(),
        "--file-prefix=dsan-badcfg".into(),
        format!("--control-socket={}", sock.display()),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    Command::new(DSAND).args(&a).output().unwrap()
}

#[test]
fn bad_configuration_gives_one_clear_line() {
    require_root();
    one_error_line(
        &dsand(&["--san-addr=198.18.0.1/24", "--vdev=net_bogus0,x=1"]),
        "unknown vdev driver \"net_bogus\"",
    );
    one_error_line(
        &dsand(&["--iface=nosuch0", "--san-addr=198.18.0.1/24"]),
        "interface \"nosuch0\" does not exist",
    );
    one_error_line(
        &dsand(&["--iface=lo", "--san-addr=198.18.0.1/24", "--lcores=999"]),
        "lcore 999 does not exist",
    );
    one_error_line(
        &dsand(&["--iface=lo", "--san-addr=198.18.0.1/24", "--idle=spin"]),
        "unknown idle policy",
    );
    one_error_line(&dsand(&["--bogus-flag"]), "--bogus-flag");
    one_error_line(
        &dsand(&["--iface=lo", "--netns=dsan-nosuch"]),
        "dsan-nosuch",
    );
    let cfg = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsand-badcfg-{}.toml", std::process::id()));
    std::fs::write(&cfg, "hots = 1\n").unwrap();
    one_error_line(
        &dsand(&[&format!("--config={}", cfg.display())]),
        "unknown field `hots`",
    );
    // Not root: the same binary run as nobody.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            DSAND,
            "--iface=lo",
            "--san-addr=198.18.0.1/24",
            "--control-socket=/tmp/dsand-nobody.sock",
        ])
        .output()
        .unwrap();
    one_error_line(&o, "must run as root");
    // A PCI device that does not exist (checked before EAL sees it).
    let o = dsand(&[
        "--check",
        "--san-addr=198.18.0.1/24",
        "--no-pci",
        "--iface=lo",
    ]);
    assert!(o.status.success());
    let cfg2 = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsand-pci-{}.toml", std::process::id()));
    std::fs::write(
        &cfg2,
        "san_addrs = [\"198.18.0.1/24\"]\n[eal]\nallow = [\"0000:ff:1f.7\"]\n",
    )
    .unwrap();
    one_error_line(
        &dsand(&[&format!("--config={}", cfg2.display())]),
        "PCI device 0000:ff:1f.7 does not exist",
    );
    let _ = std::fs::remove_file(cfg2);
    // --check reports every problem and starts nothing.
    let o = dsand(&["--check", "--iface=nosuch0", "--lcores=999"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("lcore 999") && out.contains("nosuch0"),
        "{out}"
    );
    let o = dsand(&[
        "--check",
        "--iface=lo",
        "--san-addr=198.18.0.1/24",
        "--no-pci",
    ]);
    assert_check_ok(&o);
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn bad_dsanctl_input_gives_one_clear_line() {
    one_error_line(&dsanctl(&["lab", "up", "--hosts", "1"]), "at least 2 hosts");
    one_error_line(
        &dsanctl(&["lab", "up", "--mode", "carrier-pigeon"]),
        "carrier-pigeon",
    );
    one_error_line(
        &dsanctl(&["lab", "exec", "hx", "--", "true"]),
        "not a lab host name",
    );
    one_error_line(
        &dsanctl(&["--socket", "/nonexistent/dsand.sock", "status"]),
        "cannot reach dsand",
    );
    one_error_line(&dsanctl(&["frobnicate"]), "frobnicate");
}
