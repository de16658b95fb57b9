//! The switch in the two-host lab: one descriptor for kernel TCP and SAN
//! clients, the SAN-address rule for listening, the condition function,
//! fallback to TCP, and the metrics that count all of it. Needs root.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A listening probe; its lines come back one by one.
struct Listener {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Listener {
    fn start(host: &str, args: &[&str]) -> (Listener, String) {
        let mut child = in_host(host, &probe(), args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        (Listener { child, out }, first.trim().to_string())
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(host: &str, ip: &str, port: &str) -> String {
    let o = in_host(host, &probe(), &["connect", ip, port])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn tcp_client(host: &str, ip: &str, port: u16) {
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("dsan-{host}"),
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/{port}"),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "kernel TCP connect to {ip}:{port}");
}

fn listeners(host: &str) -> serde_json::Value {
    let o = dsanctl(&[
        "--json",
        "--socket",
        &format!("/run/dsan/lab/{host}/dsand.sock"),
        "listeners",
    ]);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn one_descriptor_serves_tcp_and_san_clients() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5000", "16", "2"]);
    assert_eq!(first, "listening san=true");
    assert_eq!(listeners("h1")["listeners"][0]["port"], 5000);
    tcp_client("h0", "198.18.0.2", 5000);
    assert!(l.line().ends_with(" tcp"));
    let c = connect("h0", "198.18.0.2", "5000");
    assert!(c.starts_with("connected san "), "{c}");
    assert!(l.line().ends_with(" san"));
    // Metrics: the accept on h1, the connect on h0 (with its duration).
    let m1 = scrape(19451);
    assert_eq!(metric(&m1, "dsan_san_connects_accepted_total"), 1);
    assert!(metric(&m1, "dsan_san_connect_requests_received_total") >= 1);
    let m0 = scrape(19450);
    assert_eq!(
        metric(&m0, "dsan_san_connect_attempts_total{result=\"connected\"}"),
        1
    );
    assert_eq!(metric(&m0, "dsan_san_connect_duration_seconds_count"), 1);
    assert_eq!(metric_sum(&m0, "dsan_switch_fallbacks_total"), 0);
}

#[test]
fn a_listener_outside_every_san_subnet_stays_on_tcp() {
    let _lab = Lab::up(&[]);
    let (_l, first) = Listener::start("h1", &["listen", "127.0.0.1", "5001", "16", "1"]);
    assert_eq!(first, "listening san=false");
    assert_eq!(
        listeners("h1")["listeners"].as_array().unwrap().len(),
        0,
        "no SAN listener"
    );
}

#[test]
fn a_rejecting_condition_refuses_san_clients_without_fallback() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5002", "16", "1", "reject"]);
    assert_eq!(first, "listening san=true");
    let c = connect("h0", "198.18.0.2", "5002");
    assert!(c.starts_with("error 111 "), "ECONNREFUSED: {c}");
    // Nobody listening on the SAN port: also ECONNREFUSED, quickly, no fallback.
    let c = connect("h0", "198.18.0.2", "5999");
    assert!(c.starts_with("error 111 "), "{c}");
    // Kernel TCP clients are not subject to the SAN condition.
    tcp_client("h0", "198.18.0.2", 5002);
    assert!(l.line().ends_with(" tcp"));
    let m1 = scrape(19451);
    assert_eq!(
        metric(&m1, "dsan_san_connects_rejected_total{reason=\"refused\"}"),
        1
    );
    assert_eq!(
        metric(
            &m1,
            "dsan_san_connects_rejected_total{reason=\"no_listener\"}"
        ),
        1
    );
    let m0 = scrape(19450);
    assert_eq!(
        metric(&m0, "dsan_san_connect_attempts_total{result=\"refused\"}"),
        1
    );
    assert_eq!(
        metric(&m0, "dsan_san_connect_attempts_total{result=\"reset\"}"),
        1
    );
    assert_eq!(
        metric_sum(&m0, "dsan_switch_fallbacks_total"),
        0,
        "refusals never fall back"
    );
}

#[test]
fn a_silent_san_peer_falls_back_to_tcp() {
    let _lab = Lab::up(&[]);
    assert!(dsanctl(&["lab", "stop", "h1"]).status.success());
    // With h1's daemon gone the listener serves TCP alone, without an error.
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5003", "16", "2"]);
    assert_eq!(first, "listening san=false");
    let c = connect("h0", "198.18.0.2", "5003");
    let mut it = c.split_whitespace();
    assert_eq!(
        (it.next(), it.next()),
        (Some("connected"), Some("tcp")),
        "{c}"
    );
    let ms: f64 = it.next().unwrap().parse().unwrap();
    assert!(ms >= 900.0, "after the SAN gave up ({ms} ms)");
    assert!(l.line().ends_with(" tcp"));
    // The daemon remembers the silent address for a few seconds: the next
    // connect goes to TCP at once.
    let c = connect("h0", "198.18.0.2", "5003");
    let mut it = c.split_whitespace();
    assert_eq!(
        (it.next(), it.next()),
        (Some("connected"), Some("tcp")),
        "{c}"
    );
    let ms: f64 = it.next().unwrap().parse().unwrap();
    assert!(ms < 200.0, "the second fallback took {ms} ms");
    assert!(l.line().ends_with(" tcp"));
    let m0 = scrape(19450);
    assert_eq!(
        metric(&m0, "dsan_switch_fallbacks_total{reason=\"timed_out\"}"),
        2
    );
    assert_eq!(
        metric(&m0, "dsan_san_connect_attempts_total{result=\"timed_out\"}"),
        2
    );
}

#[test]
fn the_c_abi_builds_and_serves_both_transports() {
    let _lab = Lab::up(&[]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-sw-listener-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-O2", "-I"])
        .arg(root.join("provider-shim/include"))
        .arg("-I")
        .arg(root.join("control/include"))
        .arg(root.join("control/switch/examples/sw_listener.c"))
        .arg("-L")
        .arg(bindir())
        .args(["-ldsan_switch", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "compiling sw_listener.c against dsan_switch.h"
    );
    let mut child = in_host("h1", &exe, &["5004", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // Printed once dsan_sw_listen returned: both sides listen.
    assert_eq!(line.trim(), "listening");
    let c = connect("h0", "198.18.0.2", "5004");
    assert!(c.starts_with("connected san"), "{c}");
    tcp_client("h0", "198.18.0.2", 5004);
    let mut got = Vec::new();
    for _ in 0..2 {
        line.clear();
        out.read_line(&mut line).unwrap();
        got.push(line.trim().rsplit(' ').next().unwrap().to_string());
    }
    got.sort();
    assert_eq!(got, vec!["san", "tcp"]);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(exe);
}

#[test]
fn address_changes_apply_at_run_time() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5005", "16", "1"]);
    assert_eq!(first, "listening san=true");
    let st = Command::new("ip")
        .args([
            "-n",
            "dsan-h1",
            "addr",
            "add",
            "198.18.0.102/24",
            "dev",
            "san0",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let o = dsanctl(&[
            "--json",
            "--socket",
            "/run/dsan/lab/h1/dsand.sock",
            "status",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["san_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "198.18.0.102/24")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "address not learned: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Asking for counters has the lcore take the new addresses first.
    ok(&dsanctl(&[
        "--socket",
        "/run/dsan/lab/h1/dsand.sock",
        "stats",
    ]));
    let c = connect("h0", "198.18.0.102", "5005");
    assert!(c.starts_with("connected san "), "{c}");
    assert!(l.line().ends_with(" san"));
    // dsanctl connections and stats answer (counters published on request).
    let o = dsanctl(&["--json", "--socket", "/run/dsan/lab/h1/dsand.sock", "stats"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["connects_accepted"], 1, "{v}");
    let o = dsanctl(&["--socket", "/run/dsan/lab/h1/dsand.sock", "connections"]);
    assert!(o.status.success());
}

#[test]
fn metrics_pass_promtool() {
    let _lab = Lab::up(&[]);
    let (_l, _) = Listener::start("h1", &["listen", "0.0.0.0", "5006", "4", "1"]);
    let c = connect("h0", "198.18.0.2", "5006");
    assert!(c.starts_with("connected san"), "{c}");
    for port in [19450, 19451] {
        let body = scrape(port);
        let text = body.split("\r\n\r\n").nth(1).unwrap().to_string();
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(
            o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
            "promtool: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// WSD's switch accepts on the application's behalf only within the listen
/// backlog: with backlog 2 and an application that does not accept, at most 2
/// clients are connected and 2 wait in the provider's backlog; every further
/// one is refused at once; when the application accepts, it gets the
/// connected ones, and the waiting ones complete.
#[test]
fn the_listen_backlog_bounds_what_the_switch_accepts() {
    use std::time::Instant;
    let _lab = Lab::up(&[]);
    let mut srv = in_host("h1", &probe(), &["hold", "0.0.0.0", "7300", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut srv_in = srv.stdin.take().unwrap();
    let srv_out = lines(&mut srv);
    let next = |what: &str| {
        srv_out
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {what}"))
    };
    assert_eq!(next("listening"), "listening san=true");

    let spawn = |n: usize| -> Vec<Option<Child>> {
        (0..n)
            .map(|_| {
                Some(
                    in_host("h0", &probe(), &["connect", "198.18.0.2", "7300"])
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap(),
                )
            })
            .collect()
    };
    let mut done: Vec<String> = Vec::new();
    let reap = |clients: &mut Vec<Option<Child>>, done: &mut Vec<String>| {
        for c in clients.iter_mut() {
            if let Some(ch) = c.as_mut() {
                if ch.try_wait().unwrap().is_some() {
                    let o = c.take().unwrap().wait_with_output().unwrap();
                    done.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
                }
            }
        }
    };
    // Two clients: the switch accepts both on the application's behalf.
    let mut clients = spawn(2);
    let t = Instant::now();
    while done.len() < 2 && t.elapsed() < Duration::from_secs(10) {
        reap(&mut clients, &mut done);
        std::thread::yield_now();
    }
    assert_eq!(
        done.iter()
            .filter(|l| l.starts_with("connected san"))
            .count(),
        2,
        "{done:?}"
    );
    // Four more at once: the switch's queue is full, so two wait in the
    // provider's backlog and two are refused at once, well within the SAN
    // connect budget (2 s).
    let started = Instant::now();
    let mut clients = spawn(4);
    while done.len() < 4 && started.elapsed() < Duration::from_millis(1500) {
        reap(&mut clients, &mut done);
        std::thread::yield_now();
    }
    let refused: Vec<f64> = done
        .iter()
        .filter(|l| l.starts_with("error 111"))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(refused.len(), 2, "{done:?}");
    assert!(
        refused.iter().all(|ms| *ms < 500.0),
        "refused at once: {refused:?} ms"
    );
    assert_eq!(
        clients.iter().filter(|c| c.is_some()).count(),
        2,
        "two still waiting in the backlog: {done:?}"
    );
    // Both queues show: two accepted on the application's behalf, two in the
    // SAN backlog.
    let l = dsanctl(&[
        "--json",
        "--socket",
        "/run/dsan/lab/h1/dsand.sock",
        "listeners",
    ]);
    let l: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap();
    let l = &l["listeners"][0];
    assert_eq!(
        (
            &l["backlog_capacity"],
            &l["backlog_depth"],
            &l["accepted_waiting"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(2),
            &serde_json::json!(2)
        ),
        "{l}"
    );
    // The application accepts: first the connected ones, then the waiting
    // ones complete and are accepted too.
    let mut accepted = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted < 4 && Instant::now() < deadline {
        writeln!(srv_in, "accept").unwrap();
        let l = next("accept result");
        if l.starts_with("accepted") {
            assert!(l.ends_with(" san"), "{l}");
            accepted += 1;
        } else {
            assert_eq!(l, "error 11", "nothing ready yet");
            std::thread::yield_now();
        }
    }
    assert_eq!(accepted, 4);
    while clients.iter().any(Option::is_some) && started.elapsed() < Duration::from_secs(20) {
        reap(&mut clients, &mut done);
        std::thread::yield_now();
    }
    let connected = done
        .iter()
        .filter(|l| l.starts_with("connected san"))
        .count();
    assert_eq!(
        connected, 4,
        "the waiting ones completed over the SAN: {done:?}"
    );
    drop(srv_in);
    let _ = srv.kill();
    let _ = srv.wait();
}

/// Defer through the switch: a condition function that defers the first
/// request twice, then accepts it. The deferred request is offered again on
/// its own (no other request arrives), and the client connects over the SAN
/// well within the SAN connect budget, without falling back to TCP.
#[test]
fn a_deferred_request_is_offered_again_without_new_arrivals() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5006", "4", "1", "defer2"]);
    assert_eq!(first, "listening san=true");
    let c = connect("h0", "198.18.0.2", "5006");
    let mut it = c.split_whitespace();
    assert_eq!(
        (it.next(), it.next()),
        (Some("connected"), Some("san")),
        "{c}"
    );
    let ms: f64 = it.next().unwrap().parse().unwrap();
    assert!(ms < 1000.0, "deferred twice, accepted after {ms} ms");
    assert!(l.line().ends_with(" san"));
    let m0 = scrape(19450);
    assert_eq!(metric_sum(&m0, "dsan_switch_fallbacks_total"), 0);
}

/// A long-lived switch process follows the host's SAN addresses: a subnet
/// added while it runs is reached over the SAN, and one removed goes back to
/// kernel TCP, without the process doing anything.
#[test]
fn a_running_process_learns_subnet_changes() {
    use std::time::Instant;
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5007", "16", "25"]);
    assert_eq!(first, "listening san=true");
    let mut sh = in_host("h0", &probe(), &["shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sh_in = sh.stdin.take().unwrap();
    let sh_out = lines(&mut sh);
    let mut connect_sh = |ip: &str| {
        writeln!(sh_in, "connect {ip} 5007").unwrap();
        sh_out
            .recv_timeout(Duration::from_secs(10))
            .expect("shell answer")
    };
    // Attached with the lab's subnet only.
    assert!(connect_sh("198.18.0.2").starts_with("connected san"));
    assert!(l.line().ends_with(" san"));

    // A new subnet on both hosts, learned by both daemons.
    let addr = |ns: &str, verb: &str, a: &str| {
        let st = Command::new("ip")
            .args(["-n", ns, "addr", verb, a, "dev", "san0"])
            .status()
            .unwrap();
        assert!(st.success(), "ip addr {verb} {a} in {ns}");
    };
    let has = |host: &str, a: &str| -> bool {
        let o = dsanctl(&[
            "--json",
            "--socket",
            &format!("/run/dsan/lab/{host}/dsand.sock"),
            "status",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["san_addrs"]
            .as_array()
            .is_some_and(|x| x.iter().any(|s| s == a))
    };
    let wait = |what: &dyn Fn() -> bool, why: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "{why}");
            std::thread::yield_now();
        }
    };
    addr("dsan-h0", "add", "198.19.0.1/24");
    addr("dsan-h1", "add", "198.19.0.2/24");
    wait(
        &|| has("h0", "198.19.0.1/24") && has("h1", "198.19.0.2/24"),
        "addresses learned",
    );
    // The running process reaches the new subnet over the SAN. (The daemons
    // apply addresses on their next tick; allow a few tries for that.)
    let mut tries = 0;
    loop {
        let c = connect_sh("198.19.0.2");
        let san = c.starts_with("connected san");
        assert!(l.line().ends_with(if san { " san" } else { " tcp" }), "{c}");
        if san {
            break;
        }
        tries += 1;
        assert!(tries < 20, "still not over the SAN: {c}");
        std::thread::sleep(Duration::from_millis(100)); // the poll's interval
    }
    // Removed from h0: that subnet is no SAN subnet of h0 any more, and h0
    // has no route to it either.
    addr("dsan-h0", "del", "198.19.0.1/24");
    wait(&|| !has("h0", "198.19.0.1/24"), "address removal learned");
    let c = connect_sh("198.19.0.2");
    assert!(c.starts_with("error"), "{c}");
    drop(sh_in);
    let _ = sh.kill();
    let _ = sh.wait();
}

/// A switch client's run of `dsan-sw-probe send` (4 MiB echoed back).
fn send_through(host: &str, port: &str) -> String {
    let o = in_host(host, &probe(), &["send", "198.18.0.2", port, "4194304"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn the_switch_carries_bytes_over_both_transports() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["echo", "0.0.0.0", "5100", "2"]);
    assert_eq!(first, "listening san=true");
    // Over the SAN: every byte back, in order; the descriptor polls
    // readable when bytes or the end of the stream are there. A wake-up
    // that finds nothing is rare but possible: the daemon's FD_READ is
    // written by its notifier thread, so a signal for bytes the reader has
    // already taken (after its own look found them) can land late; POSIX
    // readiness allows it and a reader sees EAGAIN. A handful at most.
    let out = send_through("h0", "5100");
    let (head, spurious) = out.rsplit_once(' ').unwrap();
    assert_eq!(
        head,
        "sent 4194304 received 4194304 match true san spurious"
    );
    assert!(spurious.parse::<u32>().unwrap() <= 3, "{out}");
    assert_eq!(l.line(), "echoed 4194304 san");
    let m1 = scrape(19451);
    assert!(metric(&m1, "dsan_san_bytes_total{direction=\"rx\"}") >= 4194304);
    // Without a daemon on the client's host the switch uses kernel TCP: the
    // same calls carry the bytes.
    ok(&dsanctl(&["lab", "stop", "h0"]));
    assert_eq!(
        send_through("h0", "5100"),
        "sent 4194304 received 4194304 match true tcp spurious 0"
    );
    assert_eq!(l.line(), "echoed 4194304 tcp");
}

#[test]
fn a_tcp_only_service_on_a_san_host_is_reached_over_tcp_at_once() {
    let _lab = Lab::up(&[]);
    // A plain kernel TCP server in h1: no switch, no SAN listener.
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        control::os::enter_netns("dsan-h1").unwrap();
        let l = std::net::TcpListener::bind("0.0.0.0:5200").unwrap();
        tx.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut accepted = 0;
        while std::time::Instant::now() < deadline
            && accepted < 50
            && !stop2.load(std::sync::atomic::Ordering::Relaxed)
        {
            if l.accept().is_ok() {
                accepted += 1;
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // h1's daemon learns the listener within its refresh (150 ms); until
    // then the SAN answers "no listener".
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let c = loop {
        let c = connect("h0", "198.18.0.2", "5200");
        if c.starts_with("connected") || std::time::Instant::now() > deadline {
            break c;
        }
        assert!(c.starts_with("error 111 "), "{c}");
    };
    let w: Vec<&str> = c.split_whitespace().collect();
    assert_eq!(&w[..2], &["connected", "tcp"], "{c}");
    let ms: f64 = w[2].parse().unwrap();
    assert!(ms < 100.0, "the fallback took {ms} ms");
    let (m0, m1) = (scrape(19450), scrape(19451));
    assert!(metric(&m0, "dsan_switch_fallbacks_total{reason=\"tcp_only\"}") >= 1);
    assert_eq!(
        metric(&m0, "dsan_switch_fallbacks_total{reason=\"timed_out\"}"),
        0
    );
    assert!(metric(&m1, "dsan_san_connects_rejected_total{reason=\"tcp_only\"}") >= 1);
    // Nothing listening at all: refused at once, no fallback.
    let c = connect("h0", "198.18.0.2", "5201");
    assert!(c.starts_with("error 111 "), "{c}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

fn probe_out(host: &str, args: &[&str]) -> String {
    let o = in_host(host, &probe(), args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn nonblocking_connect_over_the_san_and_with_fallback() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5300", "16", "1"]);
    assert_eq!(first, "listening san=true");
    // EINPROGRESS, EALREADY while pending, readable when done, no error, 0 after.
    let c = probe_out("h0", &["nbconnect", "198.18.0.2", "5300"]);
    assert!(
        c.starts_with("inprogress again -114 readable error 0 second 0 san "),
        "{c}"
    );
    assert!(l.line().ends_with(" san"));
    // Refused: the error tells it once.
    let c = probe_out("h0", &["nbconnect", "198.18.0.2", "5399"]);
    assert!(
        c.starts_with("inprogress again -114 readable error 111 "),
        "{c}"
    );
    // Closing during a pending connect (to an address nobody answers) returns at once.
    let c = probe_out("h0", &["nbclose", "198.18.0.99", "5301"]);
    let ms: f64 = c.strip_prefix("closed ").unwrap().parse().unwrap();
    assert!(ms < 50.0, "close waited {ms} ms for the connect");
    // With h1's daemon gone: the SAN attempt times out and the nonblocking
    // connect finishes over TCP; readable only then.
    ok(&dsanctl(&["lab", "stop", "h1"]));
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5302", "16", "1"]);
    assert_eq!(first, "listening san=false");
    let c = probe_out("h0", &["nbconnect", "198.18.0.2", "5302"]);
    let w: Vec<&str> = c.split_whitespace().collect();
    assert_eq!(
        &w[..w.len() - 1],
        &[
            "inprogress",
            "again",
            "-114",
            "readable",
            "error",
            "0",
            "second",
            "0",
            "tcp"
        ],
        "{c}"
    );
    let ms: f64 = w[w.len() - 1].parse().unwrap();
    assert!(ms >= 900.0, "readable before the SAN gave up ({ms} ms)");
    assert!(l.line().ends_with(" tcp"));
}

/// Waits (at most 10 s) until h1's daemon lists a SAN listener on `port`.
fn wait_san_listener(port: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = listeners("h1");
        let there = v["listeners"]
            .as_array()
            .is_some_and(|a| a.iter().any(|l| l["port"] == port));
        if there {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SAN listener on {port}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn listeners_regain_their_san_side_when_the_daemon_comes_back() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5400", "16", "2"]);
    assert_eq!(first, "listening san=true");
    ok(&dsanctl(&["lab", "stop", "h1"]));
    // A listener created while the daemon is down serves TCP alone for now.
    let (mut l2, first) = Listener::start("h1", &["listen", "0.0.0.0", "5401", "16", "1"]);
    assert_eq!(first, "listening san=false");
    ok(&dsanctl(&["lab", "start", "h1"]));
    // Both get a SAN side with nothing for the application to do.
    wait_san_listener(5400);
    wait_san_listener(5401);
    let c = connect("h0", "198.18.0.2", "5400");
    assert!(c.starts_with("connected san "), "{c}");
    assert!(l.line().ends_with(" san"));
    let c = connect("h0", "198.18.0.2", "5401");
    assert!(c.starts_with("connected san "), "{c}");
    assert!(l2.line().ends_with(" san"));
}

#[test]
fn bind_before_connect_names_the_san_source_address() {
    let _lab = Lab::up(&[]);
    let (mut l, first) = Listener::start("h1", &["listen", "0.0.0.0", "5500", "16", "50"]);
    assert_eq!(first, "listening san=true");
    // h0 gets a second SAN address; a client bound to it connects from it.
    let st = Command::new("ip")
        .args([
            "-n",
            "dsan-h0",
            "addr",
            "add",
            "198.18.0.11/24",
            "dev",
            "san0",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let c = loop {
        let c = in_host(
            "h0",
            &probe(),
            &["connect", "198.18.0.2", "5500", "198.18.0.11"],
        )
        .output()
        .unwrap();
        let c = String::from_utf8_lossy(&c.stdout).trim().to_string();
        // Until h0's daemon has applied the address, it is not a local SAN
        // address (the switch then goes to TCP).
        if c.starts_with("connected san") || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(c.starts_with("connected san "), "{c}");
    // Tries made before h0's daemon applied the address went over TCP (and
    // were accepted as such): the SAN connection is the first SAN line.
    let mut a = l.line();
    for _ in 0..200 {
        if !a.ends_with(" tcp") {
            break;
        }
        a = l.line();
    }
    assert!(
        a.starts_with("accepted 198.18.0.11:") && a.ends_with(" san"),
        "{a}"
    );
}
