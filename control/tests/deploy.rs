//! deploy/: Prometheus configuration and rules (promtool), a real Prometheus
//! server scraping the lab while connects run, the Grafana dashboard's
//! queries against it, the systemd unit, DPDK telemetry, the Wireshark
//! dissector, and the lab walk-through of the guide. Needs root and the
//! packages scripts/setup.sh installs.

mod common;
use common::*;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool (scripts/setup.sh installs prometheus)")
}

#[test]
fn prometheus_configuration_and_rules_pass_promtool() {
    ok(&promtool(&["check", "config", "prometheus.yml"]));
    ok(&promtool(&[
        "check",
        "rules",
        "dsan-recording.rules.yml",
        "dsan-alerts.rules.yml",
    ]));
    let out = ok(&promtool(&["test", "rules", "dsan-rules.test.yml"]));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// A Prometheus server on loopback, killed on drop.
struct Prom {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prom {
    fn start() -> Prom {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("dsan-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = root().join("deploy/prometheus");
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {r}/dsan-recording.rules.yml\n  - {r}/dsan-alerts.rules.yml\nscrape_configs:\n  - job_name: dsand\n    scrape_interval: 1s\n    static_configs:\n      - targets: ['127.0.0.1:19450']\n        labels: {{host: h0}}\n      - targets: ['127.0.0.1:19451']\n        labels: {{host: h1}}\n",
            r = rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
        let port = 19490;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (scripts/setup.sh installs it)");
        let p = Prom { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(port, "/-/ready")
            .map(|(c, _)| c != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn query(&self, q: &str) -> Value {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let (code, body) = http_get(self.port, &path).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(code, 200, "query {q}: {body}");
        assert_eq!(v["status"], "success", "query {q}: {body}");
        v["data"]["result"].clone()
    }

    fn value(&self, q: &str, host: &str) -> Option<f64> {
        self.query(q)
            .as_array()?
            .iter()
            .find(|r| r["metric"]["host"] == host)?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = r
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Runs `n` SAN connects h0 -> h1:port through the switch (h1 accepts them);
/// returns the latencies the connecting side measured, in seconds.
fn run_connects(port: u16, n: usize) -> Vec<f64> {
    let mut l = in_host(
        "h1",
        &probe(),
        &["listen", "0.0.0.0", &port.to_string(), "64", &n.to_string()],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(l.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "listening san=true");
    let mut lat = Vec::new();
    for _ in 0..n {
        let o = in_host(
            "h0",
            &probe(),
            &["connect", "198.18.0.2", &port.to_string()],
        )
        .output()
        .unwrap();
        let line = String::from_utf8_lossy(&o.stdout).to_string();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&f[..2], ["connected", "san"], "{line}");
        lat.push(f[2].parse::<f64>().unwrap() / 1e3);
    }
    let _ = l.wait();
    lat
}

#[test]
fn a_real_prometheus_scrapes_the_lab_and_agrees_with_the_bench() {
    let _lab = Lab::up(&[]);
    let prom = Prom::start();
    let n = 20;
    let lat = run_connects(7700, n);
    // Wait until Prometheus has scraped the connects and both targets.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = prom
            .value(
                "dsan_san_connect_attempts_total{result=\"connected\"}",
                "h0",
            )
            .unwrap_or(0.0);
        // Both targets scraped at least once since (each on its own clock).
        let up = ["h0", "h1"].iter().all(|h| prom.value("up", h).is_some());
        if got as usize == n && up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connected attempts in Prometheus: {got}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for host in ["h0", "h1"] {
        assert_eq!(prom.value("up", host), Some(1.0), "up for {host}");
    }
    assert_eq!(
        prom.value("dsan_san_connects_accepted_total", "h1"),
        Some(n as f64)
    );
    assert_eq!(
        prom.value("dsan_san_connect_duration_seconds_count", "h0"),
        Some(n as f64)
    );
    // The histogram's median agrees with the client-measured median within the
    // width of the bucket it falls in (buckets 5 us .. 2.5 s, at most 2.5x apart).
    let q = prom
        .value(
            "histogram_quantile(0.5, dsan_san_connect_duration_seconds_bucket)",
            "h0",
        )
        .unwrap();
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[n / 2];
    assert!(
        q > 0.0 && q < 2.5 && median < q * 40.0,
        "histogram p50 {q} s, measured median {median} s"
    );
    // (The client's figure includes process start-up of the probe; the
    // histogram measures the SAN connect itself, so it is the smaller.)
    assert!(
        q <= median * 1.5,
        "histogram p50 {q} s above the measured median {median} s"
    );
    // Every query of the Grafana dashboard runs against the real server, and
    // the main panels have data (a rate needs two scrapes in its window; a
    // listener is up for the backlog panel).
    let mut listener = in_host("h1", &probe(), &["listen", "0.0.0.0", "7701", "8", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dsan-dashboard.json")).unwrap(),
    )
    .unwrap();
    // Wait (with a deadline) until the server has what the checks below
    // need: two scrapes of every main panel's series since the listener
    // came up, and the recording rules evaluated on them.
    let needs_data = |expr: &str| {
        expr.contains("connects_accepted")
            || expr.contains("lcore_polls")
            || expr.contains("backlog_capacity")
            || expr.contains("port_rx_packets")
            || expr == "dsan_san_connections"
    };
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
        })
        .filter(|e| needs_data(e))
        .chain([
            "instance:dsan_lcore_busy:ratio_rate1m".to_string(),
            "listener:dsan_backlog_fill:ratio".to_string(),
        ])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(e) = exprs
        .iter()
        .find(|e| prom.query(e).as_array().is_none_or(|a| a.is_empty()))
    {
        assert!(Instant::now() < deadline, "no data for {e}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut checked = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            let r = prom.query(&expr);
            if expr.contains("connects_accepted")
                || expr.contains("lcore_polls")
                || expr.contains("backlog_capacity")
                || expr.contains("port_rx_packets")
                || expr == "dsan_san_connections"
            {
                assert!(!r.as_array().unwrap().is_empty(), "no data for {expr}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 10);
    // The recording rules evaluate on the live data.
    let r = prom.query("instance:dsan_lcore_busy:ratio_rate1m");
    assert!(!r.as_array().unwrap().is_empty());
    let r = prom.query("listener:dsan_backlog_fill:ratio");
    assert!(!r.as_array().unwrap().is_empty());
    let _ = listener.kill();
    let _ = listener.wait();
}

/// The provider's C test harness (provider-shim/tests/c/harness.c), compiled once.
fn harness() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("dsan-deploy-harness-{}", std::process::id()));
        let st = Command::new("cc")
            .args(["-O2", "-I"])
            .arg(root().join("provider-shim/include"))
            .arg(root().join("provider-shim/tests/c/harness.c"))
            .arg("-L")
            .arg(bindir())
            .args(["-ldsan_provider", "-o"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        out
    })
    .clone()
}

/// Drives a harness in a lab host through a script of commands.
fn harness_run(host: &str, script: &str) -> String {
    let mut c = in_host(host, &harness(), &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits (at most 20 s) until `host`'s SAN listener on `port` exists and
/// holds at least `depth` requests not yet answered.
fn wait_depth(host: &str, port: u16, depth: u64) {
    let sock = format!("/run/dsan/lab/{host}/dsand.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = dsanctl(&["--json", "--socket", &sock, "listeners"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let have = v["listeners"].as_array().and_then(|ls| {
            ls.iter()
                .find(|l| l["port"].as_u64() == Some(u64::from(port)))
                .and_then(|l| l["backlog_depth"].as_u64())
        });
        if have.is_some_and(|d| d >= depth) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}:{port}: backlog depth {have:?}, waited for {depth}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The SAN frames arriving on `san0` in a lab host's namespace, written as
/// a pcap file by a thread of this test (a packet socket bound to the SAN
/// EtherType): capturing as soon as `start` returns, and every frame the
/// socket received written out when `stop` returns. (The daemons send with
/// `qdisc_bypass`, so each frame is seen by the host that receives it.)
struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    kinds: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Capture {
    fn start(host: &'static str, file: PathBuf) -> Capture {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kinds = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, kd) = (stop.clone(), kinds.clone());
        let thread = std::thread::spawn(move || {
            control::os::enter_netns(&format!("dsan-{host}")).expect("entering the namespace");
            let sock = dataplane::sys::PacketSocket::open("san0", 0x88b5, 8 << 20)
                .expect("packet socket on san0");
            ready_tx.send(()).unwrap();
            let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
            // pcap: magic, version 2.4, zone, accuracy, snap length, Ethernet.
            for w in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
                f.write_all(&w.to_le_bytes()).unwrap();
            }
            let mut buf = vec![0u8; 65536];
            loop {
                match sock.recv(&mut buf, Duration::from_millis(20)) {
                    Some(n) => {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap();
                        for w in [t.as_secs() as u32, t.subsec_micros(), n as u32, n as u32] {
                            f.write_all(&w.to_le_bytes()).unwrap();
                        }
                        f.write_all(&buf[..n]).unwrap();
                        if n > 15 {
                            kd.lock().unwrap().insert(buf[15]);
                        }
                    }
                    // Stopped, and nothing more queued: done.
                    None if st.load(Ordering::Acquire) => break,
                    None => {}
                }
            }
            f.flush().unwrap();
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the capture did not start");
        Capture {
            stop,
            kinds,
            thread,
        }
    }

    /// The message kinds captured so far.
    fn kinds(&self) -> Vec<u8> {
        self.kinds.lock().unwrap().iter().copied().collect()
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().expect("capture thread");
    }
}

#[test]
fn tshark_decodes_a_lab_capture_field_by_field() {
    let _lab = Lab::up(&[]);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Our own captures: live once started, complete once stopped.
    let caps: Vec<Capture> = ["h0", "h1"]
        .into_iter()
        .map(|h| Capture::start(h, dir.join(format!("{h}.pcap"))))
        .collect();
    // A no-resources refusal first: restart h1's daemon with room for one
    // queued request in all, fill it, and connect to a second listener.
    {
        ok(&dsanctl(&["lab", "stop", "h1"]));
        let spec: Value =
            serde_json::from_str(&std::fs::read_to_string("/run/dsan/lab/h1/spec.json").unwrap())
                .unwrap();
        let mut args: Vec<String> = spec["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        args.push("--max-half-open=1".into());
        let mut d = Command::new(DSAND)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dsanctl(&["--socket", "/run/dsan/lab/h1/dsand.sock", "status"])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "restarted h1 daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut s = in_host("h1", &harness(), &[])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep its stdin open: the harness exits at end of input.
        let mut keep = s.stdin.take().unwrap();
        keep.write_all(b"startup\nsocket\nbind 0 0.0.0.0 6005\nlisten 0 4\nsocket\nbind 1 0.0.0.0 6006\nlisten 1 4\n").unwrap();
        wait_depth("h1", 6006, 0);
        let out = harness_run("h0", "startup\nconnectn 1 198.18.0.2 6005\nresults 200\nconnectn 1 198.18.0.2 6006\nresults 1000\nquit\n");
        assert!(out.contains("-111"), "no-resources refusal: {out}");
        drop(keep);
        let _ = s.kill();
        let _ = s.wait();
        let _ = d.kill();
        let _ = d.wait();
        ok(&dsanctl(&["lab", "start", "h1"]));
    }
    // Listeners on h1: 6000 accepts, 6001 has a backlog of 1 and never
    // accepts, 6003 rejects, 6004 is closed with a request queued.
    let mut srv = in_host("h1", &harness(), &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tx = srv.stdin.take().unwrap();
    let mut rx = BufReader::new(srv.stdout.take().unwrap());
    let mut cmd = |c: &str| -> String {
        writeln!(tx, "{c}").unwrap();
        let mut l = String::new();
        rx.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(cmd("startup"), "0");
    for (s, port, backlog) in [(0, 6000, 4), (1, 6001, 1), (2, 6003, 4), (3, 6004, 4)] {
        assert_eq!(cmd("socket"), s.to_string());
        assert_eq!(cmd(&format!("bind {s} 0.0.0.0 {port}")), "0");
        assert_eq!(cmd(&format!("listen {s} {backlog}")), "0");
        assert_eq!(cmd(&format!("evsel {s} 8")), "0");
    }
    // From h0: connects to each.
    let cli = std::thread::spawn(|| {
        harness_run(
            "h0",
            "startup\nconnectn 1 198.18.0.2 6000\nresults 1500\nconnectn 2 198.18.0.2 6001\nresults 300\nconnectn 1 198.18.0.2 6002\nresults 300\nconnectn 1 198.18.0.2 6003\nresults 1500\nconnectn 1 198.18.0.2 6004\nresults 1500\nquit\n",
        )
    });
    wait_depth("h1", 6000, 1);
    let a = cmd("accept 0 accept");
    let accepted = a.split_whitespace().next().unwrap().parse::<i64>().unwrap();
    assert!(accepted >= 0, "{a}");
    // A connection that carried bytes, closed while its client still runs:
    // Data, its Ack, the FIN (a Data frame), then Close and CloseAck.
    assert_eq!(cmd(&format!("send {accepted} 64")), "64");
    assert_eq!(cmd(&format!("close {accepted}")), "0");
    // The client goes on to 6001, 6002, then 6003: its request queued there.
    wait_depth("h1", 6003, 1);
    assert_eq!(
        cmd("accept 2 reject").split_whitespace().next(),
        Some("-111")
    );
    wait_depth("h1", 6004, 1);
    assert_eq!(
        cmd("close 3"),
        "0",
        "closing a listener with a request queued"
    );
    let out = cli.join().unwrap();
    assert!(out.contains("-111"), "{out}");
    let _ = srv.kill();
    let _ = srv.wait();
    // Every kind of frame has crossed the wire (each is captured where it
    // arrives): stop and drain the captures.
    let want = [0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x11];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen: std::collections::BTreeSet<u8> = caps.iter().flat_map(Capture::kinds).collect();
        if want.iter().all(|k| seen.contains(k)) {
            break;
        }
        assert!(Instant::now() < deadline, "captured kinds {seen:x?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in caps {
        c.stop();
    }
    let lua = root().join("deploy/wireshark/dsan.lua");
    let mut seen_kinds = std::collections::BTreeSet::new();
    let mut seen_reasons = std::collections::BTreeSet::new();
    let mut macs = 0;
    for h in ["h0", "h1"] {
        let o = Command::new("tshark")
            .arg("-X")
            .arg(format!("lua_script:{}", lua.display()))
            .arg("-r")
            .arg(dir.join(format!("{h}.pcap")))
            .args([
                "-Y",
                "dsan",
                "-T",
                "fields",
                "-E",
                "separator=|",
                "-e",
                "dsan.version",
                "-e",
                "dsan.kind",
                "-e",
                "dsan.reason",
                "-e",
                "dsan.mac",
                "-e",
                "dsan.src_ip",
                "-e",
                "dsan.dst_ip",
                "-e",
                "dsan.conn_id",
                "-e",
                "dsan.dst_port",
            ])
            .output()
            .expect("tshark");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for line in text.lines() {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f[0], "1", "version field: {line}");
            assert!(
                f[4].starts_with("198.18.0.") && f[5].starts_with("198.18.0."),
                "addresses: {line}"
            );
            seen_kinds.insert(f[1].to_string());
            if !f[2].is_empty() {
                seen_reasons.insert(f[2].to_string());
            }
            if f[1] == "0x11" {
                assert!(f[3].starts_with("02:d5:a0:00:00:0"), "resolved MAC: {line}");
                macs += 1;
            }
            if f[1] == "0x01" {
                assert!(
                    f[6].starts_with("0x") && f[7].starts_with("600"),
                    "connect request fields: {line}"
                );
            }
        }
    }
    for k in [
        "0x01", "0x02", "0x03", "0x04", "0x05", "0x06", "0x07", "0x08", "0x10", "0x11",
    ] {
        assert!(
            seen_kinds.contains(k),
            "kind {k} not decoded; saw {seen_kinds:?}"
        );
    }
    for r in ["0x01", "0x02", "0x03", "0x04", "0x05"] {
        assert!(
            seen_reasons.contains(r),
            "reason {r} not decoded; saw {seen_reasons:?}"
        );
    }
    assert!(macs >= 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dsand_telemetry_answers_dpdk_telemetry_py() {
    let _lab = Lab::up(&[]);
    let mut l = in_host("h1", &probe(), &["listen", "0.0.0.0", "7800", "4", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(l.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let q = |cmd: &str| -> Value {
        let mut c = Command::new("dpdk-telemetry.py")
            .args(["-f", "dsan-h1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(c.stdin.take().unwrap(), "{cmd}").unwrap();
        let o = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{text}"))
            .to_string();
        serde_json::from_str(&line).unwrap()
    };
    // DPDK's own commands keep working.
    assert_eq!(q("/ethdev/list")["/ethdev/list"], serde_json::json!([0]));
    let ls = q("/dsan/listeners");
    let entry = ls["/dsan/listeners"]["port_7800_0_0_0_0"]
        .as_str()
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(
        entry.contains("backlog_capacity 4") && entry.contains("backlog_depth 0"),
        "{entry}"
    );
    let c = in_host("h0", &probe(), &["connect", "198.18.0.2", "7800"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&c.stdout).starts_with("connected san"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = q("/dsan/stats");
        if st["/dsan/stats"]["connects_accepted"] == 1 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st["/dsan/stats"]["connects_accepted"], 1, "{st}");
    assert!(q("/dsan/connections")["/dsan/connections"].is_object());
    let _ = l.kill();
    let _ = l.wait();
}

#[test]
fn the_systemd_unit_verifies() {
    // The unit names /usr/local/bin/dsand; verify a copy pointing at the build.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = std::fs::read_to_string(root().join("deploy/systemd/dsand.service"))
        .unwrap()
        .replace("/usr/local/bin/dsand", DSAND);
    let path = dir.join("dsand.service");
    std::fs::write(&path, unit).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("dsand.service"))
        .collect();
    assert!(
        o.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_guide_lab_walk_through_runs() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let o = Command::new(root().join("deploy/lab-walkthrough.sh"))
        .current_dir(root())
        .env("B", bindir())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("walk-through done"), "{out}");
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!ns.contains("dsan-walk"), "{ns}");
}
