//! The SAN provider from C, in the two-host lab: the C test harness
//! (`provider-shim/tests/c/harness.c`) is compiled against the committed
//! header and `libdsan_provider.so`, and run inside the lab's namespaces.
//! Needs root; the lab tests and these share one lock (one lab at a time).

mod common;
use common::*;

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

fn libdir() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        dir.join("libdsan_provider.so").exists(),
        "{} has no libdsan_provider.so: build the workspace (cargo test --workspace builds it)",
        dir.display()
    );
    dir
}

/// Compiles the harness once per test process.
fn harness_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("dsan-harness-{}", std::process::id()));
        let lib = libdir();
        for (src, dst) in [
            ("provider-shim/tests/c/harness.c", out.clone()),
            (
                "provider-shim/examples/listener.c",
                out.with_extension("listener"),
            ),
            (
                "provider-shim/examples/connector.c",
                out.with_extension("connector"),
            ),
            ("provider-shim/tests/c/storm.c", out.with_extension("storm")),
        ] {
            let st = Command::new("cc")
                .args(["-Wall", "-Wextra", "-Werror", "-O2", "-I"])
                .arg(root.join("provider-shim/include"))
                .arg(root.join(src))
                .arg("-L")
                .arg(&lib)
                .args(["-ldsan_provider", "-o"])
                .arg(&dst)
                .status()
                .expect("cc");
            assert!(st.success(), "compiling {src} failed");
        }
        out
    })
    .clone()
}

/// A harness process in a lab host.
struct H {
    child: Child,
    tx: ChildStdin,
    rx: BufReader<ChildStdout>,
}

impl H {
    fn spawn(host: &str) -> H {
        Self::spawn_bin(host, &harness_bin())
    }

    fn spawn_bin(host: &str, bin: &std::path::Path) -> H {
        let i: usize = host[1..].parse().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &format!("dsan-h{i}")])
            .arg(bin)
            .env("DSAN_SOCKET", format!("/run/dsan/lab/{host}/dsand.sock"))
            .env("LD_LIBRARY_PATH", libdir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let tx = child.stdin.take().unwrap();
        let rx = BufReader::new(child.stdout.take().unwrap());
        H { child, tx, rx }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.tx, "{c}").unwrap();
        let mut l = String::new();
        self.rx.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "harness exited during {c:?}");
        l.trim().to_string()
    }

    fn rc(&mut self, c: &str) -> i64 {
        self.cmd(c)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for H {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ECONNREFUSED: i64 = 111;
const ECONNRESET: i64 = 104;
const ETIMEDOUT: i64 = 110;

fn results(line: &str) -> Vec<i64> {
    line.split('|')
        .next()
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// Waits (at most 10 s) until `host`'s listener on `port` holds `depth`
/// requests.
fn wait_depth(host: &str, port: u16, depth: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let l = listeners_on(host);
        let found = l["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["port"] == port)
            .map(|x| x["backlog_depth"].as_u64().unwrap_or(0));
        if found == Some(depth) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{host}:{port} never held {depth} requests: {l}"
        );
        std::thread::yield_now();
    }
}

fn listeners_on(host: &str) -> Value {
    let o = dsanctl(&[
        "--json",
        "--socket",
        &format!("/run/dsan/lab/{host}/dsand.sock"),
        "listeners",
    ]);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn full_backlog_refuses_at_once_and_raises_no_event() {
    let _lab = Lab::up(&[]);
    let mut srv = H::spawn("h1");
    assert_eq!(srv.rc("startup"), 0);
    let s = srv.rc("socket");
    assert_eq!(srv.rc(&format!("bind {s} 0.0.0.0 5000")), 0);
    assert_eq!(srv.rc(&format!("listen {s} 4")), 0);
    assert_eq!(srv.rc(&format!("evsel {s} 8")), 0);

    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    assert_eq!(cli.cmd("connectn 10 198.18.0.2 5000"), "started 10");
    // The 6 that find the backlog full are refused quickly.
    let w = cli.cmd("waitdone 6 1000");
    let (done, ms): (i64, f64) = {
        let mut it = w.split_whitespace();
        (
            it.next().unwrap().parse().unwrap(),
            it.next().unwrap().parse().unwrap(),
        )
    };
    assert_eq!(done, 6, "{w}");
    assert!(ms < 500.0, "refusals took {ms} ms");
    let r = results(&cli.cmd("results 0"));
    assert_eq!(
        r.iter().filter(|&&x| x == -ECONNREFUSED).count(),
        6,
        "{r:?}"
    );
    assert_eq!(
        r.iter().filter(|&&x| x == 1).count(),
        4,
        "4 still pending: {r:?}"
    );

    // The listener's eventfd was signalled once per queued request: 4, not 10.
    assert_eq!(srv.rc(&format!("evcount {s}")), 4);
    assert_eq!(
        srv.cmd(&format!("enum {s}")),
        "0 8 0 0",
        "FD_ACCEPT recorded"
    );
    let l = listeners_on("h1");
    assert_eq!(l["listeners"][0]["backlog_depth"], 4, "{l}");
    assert_eq!(l["listeners"][0]["backlog_capacity"], 4, "{l}");

    // 2 accepted, 2 rejected.
    for _ in 0..2 {
        let a = srv.cmd(&format!("accept {s} accept"));
        assert!(
            a.split_whitespace().next().unwrap().parse::<i64>().unwrap() >= 0,
            "{a}"
        );
        assert!(a.contains("198.18.0.1:"), "{a}");
    }
    for _ in 0..2 {
        assert_eq!(srv.rc(&format!("accept {s} reject")), -ECONNREFUSED);
    }
    assert_eq!(
        srv.rc(&format!("accept {s} accept")),
        -11,
        "nothing left: EAGAIN"
    );
    let r = results(&cli.cmd("results 1000"));
    assert_eq!(r.iter().filter(|&&x| x == 0).count(), 2, "{r:?}");
    assert_eq!(
        r.iter().filter(|&&x| x == -ECONNREFUSED).count(),
        8,
        "{r:?}"
    );
}

#[test]
fn reset_timeout_and_defer() {
    let _lab = Lab::up(&[]);
    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    let c = cli.rc("socket");
    assert_eq!(
        cli.rc(&format!("connect {c} 198.18.0.2 6000")),
        -ECONNRESET,
        "no listener"
    );
    // A SAN address where no daemon answers: ETIMEDOUT within the budget (2 s).
    let c = cli.rc("socket");
    let line = cli.cmd(&format!("connect {c} 198.18.0.99 6000"));
    let mut it = line.split_whitespace();
    assert_eq!(it.next().unwrap().parse::<i64>().unwrap(), -ETIMEDOUT);
    assert!(
        it.next().unwrap().parse::<f64>().unwrap() < 2500.0,
        "{line}"
    );

    // Nonblocking: FD_CONNECT carries the error once; the next enumeration
    // reports neither the event nor the error again.
    let c = cli.rc("socket");
    assert_eq!(cli.rc(&format!("evsel {c} 16")), 0);
    assert_eq!(cli.rc(&format!("connect {c} 198.18.0.99 6000")), -115);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let e = cli.cmd(&format!("enum {c}"));
        if e == "0 16 0 -110" {
            break;
        }
        assert_eq!(e, "0 0 0 0", "before the outcome");
        assert!(std::time::Instant::now() < deadline, "no FD_CONNECT");
        std::thread::yield_now();
    }
    assert_eq!(
        cli.cmd(&format!("enum {c}")),
        "0 0 0 0",
        "errors are cleared"
    );

    // Defer leaves the request at the head; a later accept takes it.
    let mut srv = H::spawn("h1");
    assert_eq!(srv.rc("startup"), 0);
    let s = srv.rc("socket");
    assert_eq!(srv.rc(&format!("bind {s} 198.18.0.2 6001")), 0);
    assert_eq!(srv.rc(&format!("listen {s} 2")), 0);
    assert_eq!(cli.cmd("connectn 1 198.18.0.2 6001"), "started 1");
    wait_depth("h1", 6001, 1);
    assert_eq!(srv.rc(&format!("accept {s} defer")), -11);
    let n = srv.rc(&format!("accept {s} null"));
    assert!(n >= 0, "NULL condition accepts");
    assert_eq!(
        srv.rc(&format!("listen {n} 2")),
        -106,
        "listen on a connected socket: EISCONN"
    );
    assert_eq!(results(&cli.cmd("results 1000")), vec![0]);
}

#[test]
fn bad_input_from_c_leaves_the_daemon_serving() {
    let _lab = Lab::up(&[]);
    let mut h = H::spawn("h1");
    // Before startup: -ENETDOWN everywhere.
    assert_eq!(h.rc("socket"), -100);
    assert_eq!(h.rc("listen 0 1"), -100);
    assert_eq!(h.rc("cleanup"), -100);
    assert_eq!(h.rc("startup /nonexistent/dsand.sock"), -100);
    assert_eq!(h.rc("startup"), 0);
    let out = h.cmd("bad");
    let got: std::collections::HashMap<&str, i64> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0], c[1].parse().unwrap()))
        .collect();
    let expect = [
        ("close_unknown", -88),
        ("close_negative", -88),
        ("bind_null", -14),
        ("bind_short", -22),
        ("bind_inet6", -22),
        ("listen_unbound", -22),
        ("listen_unknown", -88),
        ("enum_null", -14),
        ("accept_not_listening", -22),
        ("connect_null", -14),
        ("evsel_bad_fd", -22),
        ("evsel_bad_mask", -22),
        ("connect_no_san_subnet", -113),
        ("accept_peer_len_null", -14),
        ("accept_peer_len_small", -22),
        ("listen_in_use", -98),
        ("use_after_close", -88),
        ("connect_nonblocking", -115),
        ("connect_again", -114),
    ];
    for (k, v) in expect {
        assert_eq!(got.get(k), Some(&v), "{k}: {out}");
    }
    // Another process cannot listen on a port this one holds, and cannot touch its sockets.
    let s = h.rc("socket");
    assert_eq!(h.rc(&format!("bind {s} 0.0.0.0 7100")), 0);
    assert_eq!(h.rc(&format!("listen {s} 2")), 0);
    let mut other = H::spawn("h1");
    assert_eq!(other.rc("startup"), 0);
    let o = other.rc("socket");
    assert_eq!(other.rc(&format!("bind {o} 198.18.0.2 7100")), 0);
    assert_eq!(
        other.rc(&format!("listen {o} 2")),
        -98,
        "EADDRINUSE across processes"
    );
    assert_eq!(
        other.rc(&format!("close {s}")),
        if s == o { 0 } else { -88 }
    );
    assert_eq!(h.rc(&format!("evsel {s} 8")), 0, "nonblocking from here on");
    assert_eq!(
        h.rc(&format!("accept {s} accept")),
        -11,
        "still listening after the other's close"
    );
    // The daemon still serves: a connect from h0 is accepted.
    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    assert_eq!(cli.cmd("connectn 1 198.18.0.2 7100"), "started 1");
    wait_depth("h1", 7100, 1);
    assert!(h.rc(&format!("accept {s} accept")) >= 0);
    assert_eq!(results(&cli.cmd("results 1000")), vec![0]);
    let st = dsanctl(&[
        "--json",
        "--socket",
        "/run/dsan/lab/h1/dsand.sock",
        "status",
    ]);
    assert!(st.status.success());
}

#[test]
fn a_killed_listener_refuses_its_queue_and_frees_the_port() {
    let _lab = Lab::up(&[]);
    let mut srv = H::spawn("h1");
    assert_eq!(srv.rc("startup"), 0);
    let s = srv.rc("socket");
    assert_eq!(srv.rc(&format!("bind {s} 0.0.0.0 8000")), 0);
    assert_eq!(srv.rc(&format!("listen {s} 8")), 0);
    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    assert_eq!(cli.cmd("connectn 3 198.18.0.2 8000"), "started 3");
    wait_depth("h1", 8000, 3);
    assert_eq!(
        results(&cli.cmd("results 0")),
        vec![1, 1, 1],
        "queued, pending"
    );
    // kill -9 the listening process.
    let pid = srv.child.id();
    let _ = Command::new("pkill")
        .args(["-9", "-P", &pid.to_string()])
        .status();
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let w = cli.cmd("waitdone 3 1000");
    assert!(w.starts_with("3 "), "refused promptly: {w}");
    assert_eq!(results(&cli.cmd("results 0")), vec![-ECONNREFUSED; 3]);
    // The port is free again at once.
    let mut again = H::spawn("h1");
    assert_eq!(again.rc("startup"), 0);
    let s = again.rc("socket");
    assert_eq!(again.rc(&format!("bind {s} 0.0.0.0 8000")), 0);
    assert_eq!(again.rc(&format!("listen {s} 8")), 0);
    assert_eq!(listeners_on("h1")["listeners"].as_array().unwrap().len(), 1);
}

#[test]
fn a_stopped_daemon_gives_enetdown_not_a_hang() {
    let _lab = Lab::up(&[]);
    let mut h = H::spawn("h1");
    assert_eq!(h.rc("startup"), 0);
    let s = h.rc("socket");
    assert_eq!(h.rc(&format!("bind {s} 0.0.0.0 9000")), 0);
    assert!(dsanctl(&["lab", "stop", "h1"]).status.success());
    let t0 = std::time::Instant::now();
    assert_eq!(h.rc(&format!("listen {s} 4")), -100);
    assert_eq!(h.rc("socket"), -100);
    assert!(t0.elapsed() < std::time::Duration::from_secs(2));
    // After a restart the process attaches again.
    assert!(dsanctl(&["lab", "start", "h1"]).status.success());
    assert_eq!(h.rc("startup"), 0);
    let s = h.rc("socket");
    assert!(s >= 0);
}

#[test]
fn the_c_examples_connect_and_refuse() {
    let _lab = Lab::up(&[]);
    let bin = harness_bin();
    let lst = bin.with_extension("listener");
    let con = bin.with_extension("connector");
    let mut listener = Command::new("ip")
        .args(["netns", "exec", "dsan-h1"])
        .arg(&lst)
        .args(["5500", "4", "reject"])
        .env("DSAN_SOCKET", "/run/dsan/lab/h1/dsand.sock")
        .env("LD_LIBRARY_PATH", libdir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(listener.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "{first}");
    let run = |port: &str| {
        Command::new("ip")
            .args(["netns", "exec", "dsan-h0"])
            .arg(&con)
            .args(["198.18.0.2", port])
            .env("DSAN_SOCKET", "/run/dsan/lab/h0/dsand.sock")
            .env("LD_LIBRARY_PATH", libdir())
            .output()
            .unwrap()
    };
    let o = run("5500");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Connection refused"),
        "{o:?}"
    );
    let o = run("5501");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Connection reset"),
        "{o:?}"
    );
    let _ = listener.kill();
    let _ = listener.wait();
}

#[test]
fn a_daemon_stopping_refuses_what_its_listeners_queued() {
    let _lab = Lab::up(&[]);
    let mut srv = H::spawn("h1");
    assert_eq!(srv.rc("startup"), 0);
    let s = srv.rc("socket");
    assert_eq!(srv.rc(&format!("bind {s} 0.0.0.0 8100")), 0);
    assert_eq!(srv.rc(&format!("listen {s} 8")), 0);
    assert_eq!(srv.rc(&format!("evsel {s} 8")), 0);
    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    assert_eq!(cli.cmd("connectn 2 198.18.0.2 8100"), "started 2");
    wait_depth("h1", 8100, 2);
    assert_eq!(results(&cli.cmd("results 0")), vec![1, 1]);
    // The two requests' FD_ACCEPT, taken now.
    srv.cmd(&format!("evcount {s}"));
    assert_eq!(srv.cmd(&format!("enum {s}")), "0 8 0 0");
    // SIGTERM to h1's daemon: its queued requests are refused before it stops.
    assert!(dsanctl(&["lab", "stop", "h1"]).status.success());
    let w = cli.cmd("waitdone 2 1000");
    assert!(w.starts_with("2 "), "{w}");
    assert_eq!(results(&cli.cmd("results 0")), vec![-ECONNREFUSED; 2]);
    // The listener posts FD_ACCEPT with ENETDOWN as the daemon stops (its
    // eventfd is written), and the next call fails with ENETDOWN.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while srv.cmd(&format!("evcount {s}")) == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "no FD_ACCEPT at shutdown"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(srv.cmd(&format!("enum {s}")), "0 8 -100 0");
    assert_eq!(srv.rc("socket"), -100);
}

/// A child's stdout as lines, each read with a deadline.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut Child) -> Lines {
        Lines(lines(child))
    }

    fn next(&self, within: std::time::Duration, what: &str) -> String {
        self.0
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
    }
}

fn numbers(line: &str) -> Vec<i64> {
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The jam the old design allowed (a request arriving while the application
/// held a decision in flight and the ring was full desynchronised the queues
/// for good) cannot happen: a listener with backlog 2 whose application
/// decides slowly, under four processes connecting as fast as they can.
#[test]
fn a_slow_listener_under_a_connect_storm_never_jams() {
    use std::time::{Duration, Instant};
    let _lab = Lab::up(&[]);
    let storm = harness_bin().with_extension("storm");
    let spawn = |host: &str, args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("dsan-{host}")])
            .arg(&storm)
            .args(args)
            .env("DSAN_SOCKET", format!("/run/dsan/lab/{host}/dsand.sock"))
            .env("LD_LIBRARY_PATH", libdir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    let mut srv = Reaped(spawn("h1", &["server", "6000", "2", "300"]));
    let srv_out = Lines::of(&mut srv.0);
    let mut srv_in = srv.0.stdin.take().unwrap();
    assert_eq!(srv_out.next(Duration::from_secs(10), "ready"), "ready");

    let mut clients: Vec<Reaped> = (0..4)
        .map(|_| Reaped(spawn("h0", &["client", "198.18.0.2", "6000", "4000"])))
        .collect();
    let outs: Vec<Lines> = clients.iter_mut().map(|c| Lines::of(&mut c.0)).collect();
    let (mut attempts, mut connected, mut refused) = (0, 0, 0);
    for o in &outs {
        let l = o.next(Duration::from_secs(60), "client result");
        let v = numbers(&l);
        assert_eq!(v.len(), 4, "{l}");
        assert_eq!(v[3], 0, "every attempt connected or was refused: {l}");
        assert_eq!(v[0], v[1] + v[2], "every attempt ended exactly once: {l}");
        attempts += v[0];
        connected += v[1];
        refused += v[2];
    }
    drop(clients);
    writeln!(srv_in, "report").unwrap();
    let r = numbers(&srv_out.next(Duration::from_secs(10), "server report"));
    let (srv_accepted, srv_refused) = (r[0], r[1]);
    eprintln!(
        "storm: {attempts} attempts, {connected} connected, {refused} refused \
         ({srv_refused} by the application, {} as backlog full)",
        refused - srv_refused
    );
    assert_eq!(
        connected, srv_accepted,
        "a client connected for every accept"
    );
    assert!(
        refused > srv_refused,
        "the backlog filled up (refusals beyond the application's own)"
    );
    assert!(attempts > 100, "the storm was a storm: {attempts} attempts");

    // The application drained its backlog: the depth gauge says 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = listeners_on("h1");
        if l["listeners"][0]["backlog_depth"] == 0 {
            assert_eq!(l["listeners"][0]["backlog_capacity"], 2);
            break;
        }
        assert!(Instant::now() < deadline, "depth never went to 0: {l}");
        std::thread::yield_now();
    }
    // A fresh connect is accepted at once (the application now accepts all).
    writeln!(srv_in, "all").unwrap();
    assert_eq!(srv_out.next(Duration::from_secs(10), "all"), "all");
    let mut cli = H::spawn("h0");
    assert_eq!(cli.rc("startup"), 0);
    let s = cli.rc("socket");
    let c = cli.cmd(&format!("connect {s} 198.18.0.2 6000"));
    let v: Vec<f64> = c.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(v[0], 0.0, "{c}");
    assert!(v[1] < 500.0, "the fresh connect took {} ms", v[1]);
    writeln!(srv_in, "report").unwrap();
    let r = numbers(&srv_out.next(Duration::from_secs(10), "server report"));
    assert_eq!(r[0], srv_accepted + 1);
    // Nothing the process sent was refused as garbage.
    let st = dsanctl(&["--json", "--socket", "/run/dsan/lab/h1/dsand.sock", "stats"]);
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["drops"]["bad_command"], 0, "{st}");
    assert_eq!(st["app_protocol_violations"], 0, "{st}");
    writeln!(srv_in, "quit").unwrap();
}
