//! Helpers shared by the lab tests (each test file includes this module).
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

pub const DSANCTL: &str = env!("CARGO_BIN_EXE_dsanctl");
pub const DSAND: &str = env!("CARGO_BIN_EXE_dsand");

/// One lab at a time within a test binary (cargo runs the binaries one after another).
pub static LOCK: Mutex<()> = Mutex::new(());

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/<profile>, where the workspace's binaries and libraries are.
pub fn bindir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The switch's command-line probe.
pub fn probe() -> PathBuf {
    let p = bindir().join("dsan-sw-probe");
    assert!(p.exists(), "{} missing: build the workspace", p.display());
    p
}

pub fn dsanctl(args: &[&str]) -> Output {
    Command::new(DSANCTL)
        .args(args)
        .env("DSAN_DSAND", DSAND)
        .output()
        .expect("running dsanctl")
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    assert_eq!(
        uid, "0",
        "the lab tests need root (network namespaces, raw sockets); run them as root"
    );
}

/// A command run inside a lab host's namespace, attached to its daemon.
pub fn in_host(host: &str, prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("dsan-{host}")])
        .arg(prog)
        .args(args);
    c.env("DSAN_SOCKET", format!("/run/dsan/lab/{host}/dsand.sock"))
        .env("LD_LIBRARY_PATH", bindir());
    c
}

/// Holds the lab for one test; on drop (also when the test fails) stops what
/// the tests start in it and takes it down; after a passing test it also
/// checks that nothing is left.
pub struct Lab<'a> {
    _g: MutexGuard<'a, ()>,
}

impl Lab<'_> {
    pub fn up(args: &[&str]) -> Lab<'static> {
        require_root();
        let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ok(&dsanctl(&["lab", "down"]));
        let lab = Lab { _g: g };
        let mut a = vec!["lab", "up"];
        a.extend_from_slice(args);
        let out = ok(&dsanctl(&a));
        assert!(
            out.contains("dsan-h0") && out.contains("198.18.0.1/24"),
            "{out}"
        );
        lab
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        for p in [
            "dsan-sw-probe",
            "dsan-harness-",
            "dsan-deploy-harness",
            "dumpcap -q -i san0 -w",
        ] {
            let _ = Command::new("pkill").args(["-9", "-f", p]).status();
        }
        let o = dsanctl(&["lab", "down"]);
        if !std::thread::panicking() {
            ok(&o);
            assert_clean();
        }
    }
}

/// No namespaces, veths, state, DPDK runtime files or daemons of the lab left.
pub fn assert_clean() {
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!ns.contains("dsan-"), "namespaces left: {ns}");
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !links.contains("san0"),
        "veth left in the root namespace: {links}"
    );
    assert!(
        !Path::new("/run/dsan/lab").exists(),
        "lab state directory left"
    );
    for d in ["/var/run/dpdk", "/run/dpdk"] {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                assert!(
                    !e.file_name().to_string_lossy().starts_with("dsan-h"),
                    "DPDK runtime files left: {:?}",
                    e.path()
                );
            }
        }
    }
    let ps = String::from_utf8_lossy(
        &Command::new("pgrep")
            .args(["-a", "-x", "dsand"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !ps.contains("--file-prefix=dsan-h"),
        "lab daemons left: {ps}"
    );
}

/// Scrapes a daemon's metrics from the root namespace (a scrape has the lcore
/// publish its counters first, so they are current).
pub fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .expect("metrics endpoint reachable from the root namespace");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of a metric line (`name` with its labels, exactly).
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{body}")) as u64
}

/// The sum of every series of a metric, whatever its labels.
pub fn metric_sum(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A child's stdout as a channel of lines (a reader thread), so that each
/// line can be awaited with a deadline (`recv_timeout`).
pub fn lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Spawns `c` with stdin and stdout piped (stdin stays open until the child
/// is dropped) and waits up to 10 s for its first line, which must be
/// `first` ("listening", "ready"): the child, reaped on drop, and its
/// further lines.
pub fn started(mut c: Command, first: &str) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {c:?}: {e}"));
    let out = lines(&mut child);
    let child = Reaped(child);
    let l = out
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no {first:?} line from {c:?}"));
    assert_eq!(l, first, "{c:?}");
    (child, out)
}

/// Kills and reaps a child when dropped (also when the test fails).
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
