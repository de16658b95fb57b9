//! deploy/: Prometheus configuration and rules (promtool), a real Prometheus
//! server scraping the lab while connects run, the Grafana dashboard's
//! queries against it, the systemd unit, DPDK telemetry, the Wireshark
//! dissector, and the lab walk-through of the guide. Needs root and the
//! packages scripts/setup.sh installs.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const DSANCTL: &str = env!("CARGO_BIN_EXE_dsanctl");
const DSAND: &str = env!("CARGO_BIN_EXE_dsand");
static LOCK: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bindir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn dsanctl(args: &[&str]) -> Output {
    Command::new(DSANCTL)
        .args(args)
        .env("DSAN_DSAND", DSAND)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Lab<'a> {
    _g: MutexGuard<'a, ()>,
}

impl Lab<'_> {
    fn up() -> Lab<'static> {
        let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ok(&dsanctl(&["lab", "down"]));
        ok(&dsanctl(&["lab", "up"]));
        Lab { _g: g }
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-9", "-f", "dsan-sw-probe"])
            .status();
        let _ = dsanctl(&["lab", "down"]);
    }
}

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
        let dir = std::env::temp_dir().join(format!("dsan-prom-{}", std::process::id()));
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

fn probe() -> PathBuf {
    bindir().join("dsan-sw-probe")
}

fn in_host(host: &str, prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("dsan-{host}")])
        .arg(prog)
        .args(args);
    c.env("DSAN_SOCKET", format!("/run/dsan/lab/{host}/dsand.sock"))
        .env("LD_LIBRARY_PATH", bindir());
    c
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
    let _lab = Lab::up();
    let prom = Prom::start();
    let n = 20;
    let lat = run_connects(7700, n);
    // Let two scrapes pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = prom
            .value(
                "dsan_san_connect_attempts_total{result=\"connected\"}",
                "h0",
            )
            .unwrap_or(0.0);
        if got as usize == n {
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
    std::thread::sleep(Duration::from_secs(3));
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dsan-dashboard.json")).unwrap(),
    )
    .unwrap();
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
