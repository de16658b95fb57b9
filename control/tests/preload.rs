//! Unmodified programs over the SAN with `libdsan_preload.so`: curl and
//! nginx, redis-benchmark and redis-server, wrk, iperf3, each with a
//! preloaded server in h1 and a preloaded client in h0, checking the result
//! and that the SAN carried it (h1's accepted SAN connections and SAN bytes
//! grew by what the workload implies; h0 fell back to TCP never). Plus a
//! kernel client of a preloaded server, a preloaded client of a kernel
//! server, the routing rules and log, and a program with no daemon. Needs
//! root and the programs `scripts/setup.sh` installs.

mod common;
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const METRICS_BASE: u16 = 19450;

fn lib() -> PathBuf {
    bindir().join("libdsan_preload.so")
}

/// `prog args` in lab host `host`, attached to its daemon, preloaded.
fn preloaded(host: &str, prog: &str, args: &[&str]) -> Command {
    let mut c = in_host(host, Path::new(prog), args);
    c.env("LD_PRELOAD", lib());
    c
}

/// `prog args` in lab host `host`, not preloaded.
fn plain(host: &str, prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("dsan-{host}"), prog])
        .args(args);
    c
}

/// Runs `c` to completion within `secs` (killed and failed otherwise).
fn run(mut c: Command, secs: u64) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Readers so that a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = t_out.join().unwrap();
            let err = t_err.join().unwrap();
            panic!(
                "{c:?} still running after {secs} s\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until something listens on TCP `port` in `host` (a deadline of 10 s).
fn wait_listening(host: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = plain(host, "ss", &["-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        if !o.stdout.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {host}:{port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `path` contains `needle` (a deadline of `secs`).
fn wait_for_text(path: &Path, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never in {path:?}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("dsan-preload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("www")).unwrap();
        Scratch(d)
    }
    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
    fn s(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 64 MiB of reproducible bytes.
fn big_file(path: &Path) -> Vec<u8> {
    let mut v = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, &v).unwrap();
    v
}

/// An nginx configuration serving `dir/www` on `port`.
fn nginx_conf(dir: &Scratch, port: u16, sendfile: bool, workers: u32) -> PathBuf {
    let master = if workers == 0 { "off" } else { "on" };
    let conf = format!(
        "daemon off;\nuser root;\nmaster_process {master};\nworker_processes {};\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  sendfile {};\n  keepalive_requests 100000;\n  server {{ listen {port}; root {d}/www; }}\n}}\n",
        workers.max(1),
        if sendfile { "on" } else { "off" },
        d = dir.s()
    );
    let p = dir.path("nginx.conf");
    std::fs::write(&p, conf).unwrap();
    p
}

/// A running nginx: stopped with SIGTERM (its master stops its workers),
/// waited for with a deadline, then killed, also when the test fails.
struct Nginx {
    child: std::process::Child,
    dir: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let pattern = format!("nginx -p {}", self.dir);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let left = Command::new("pgrep")
                .args(["-f", &pattern])
                .output()
                .unwrap();
            if left.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("pkill").args(["-9", "-f", &pattern]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx(host: &str, dir: &Scratch, conf: &Path, preload: bool) -> Nginx {
    let args = ["-p", &dir.s(), "-c", &conf.display().to_string()];
    let mut c = if preload {
        preloaded(host, "nginx", &args)
    } else {
        plain(host, "nginx", &args)
    };
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Nginx {
        child,
        dir: dir.s(),
    }
}

/// The counters a test compares before and after: h1's accepted SAN
/// connections and SAN bytes (both directions), h0's fallbacks.
#[derive(Debug, Clone, Copy)]
struct Counts {
    accepted: u64,
    bytes: u64,
    fallbacks: u64,
    tcp_only: u64,
}

fn counts() -> Counts {
    let h0 = scrape(METRICS_BASE);
    let h1 = scrape(METRICS_BASE + 1);
    Counts {
        accepted: metric(&h1, "dsan_san_connects_accepted_total"),
        bytes: metric_sum(&h1, "dsan_san_bytes_total"),
        fallbacks: metric_sum(&h0, "dsan_switch_fallbacks_total"),
        tcp_only: metric(&h0, "dsan_switch_fallbacks_total{reason=\"tcp_only\"}"),
    }
}

/// Downloads `url` with curl in h0 (preloaded or not) into `out`.
fn curl(preload: bool, url: &str, out: &Path, env: &[(&str, &str)]) -> Output {
    let args = ["-sS", "--fail", "-o", &out.display().to_string(), url];
    let mut c = if preload {
        preloaded("h0", "curl", &args)
    } else {
        plain("h0", "curl", &args)
    };
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run(c, 60);
    assert!(o.status.success(), "curl {url}: {}", text(&o));
    o
}

fn same_file(got: &Path, want: &[u8]) {
    let g = std::fs::read(got).unwrap();
    assert_eq!(g.len(), want.len(), "length of {got:?}");
    assert!(g == want, "{got:?} differs from what was served");
}

#[test]
fn curl_downloads_64_mib_from_nginx_over_the_san() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("nginx");
    let want = big_file(&dir.path("www/big"));
    for sendfile in [false, true] {
        let conf = nginx_conf(&dir, 8080, sendfile, 0);
        let _srv = nginx("h1", &dir, &conf, true);
        wait_listening("h1", 8080);
        let before = counts();
        let out = dir.path("got");
        curl(true, "http://198.18.0.2:8080/big", &out, &[]);
        same_file(&out, &want);
        let after = counts();
        assert!(
            after.accepted > before.accepted,
            "sendfile {sendfile}: no SAN connection accepted: {before:?} {after:?}"
        );
        assert!(
            after.bytes - before.bytes >= want.len() as u64,
            "sendfile {sendfile}: the SAN carried {} bytes",
            after.bytes - before.bytes
        );
        assert_eq!(after.fallbacks, before.fallbacks, "no fallback to TCP");

        // A kernel client (not preloaded) still reaches the preloaded
        // nginx, over kernel TCP.
        let before = counts();
        curl(false, "http://198.18.0.2:8080/big", &out, &[]);
        same_file(&out, &want);
        let after = counts();
        assert_eq!(
            after.accepted, before.accepted,
            "the kernel client used TCP"
        );
        assert!(after.bytes - before.bytes < 1 << 20);
    }
}

#[test]
fn nginx_with_two_forked_workers_serves_over_the_san() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("workers");
    let want = big_file(&dir.path("www/big"));
    let conf = nginx_conf(&dir, 8084, true, 2);
    let _srv = nginx("h1", &dir, &conf, true);
    wait_listening("h1", 8084);
    // The workers listen again when they start (one of them takes the SAN
    // side over from the master): wait until a download goes over the SAN.
    let out = dir.path("got");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = counts();
        let o = run(
            preloaded(
                "h0",
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    &out.display().to_string(),
                    "http://198.18.0.2:8084/big",
                ],
            ),
            30,
        );
        let after = counts();
        if o.status.success() && after.accepted > before.accepted {
            same_file(&out, &want);
            assert!(after.bytes - before.bytes >= want.len() as u64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never over the SAN: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every download now goes over the SAN to a worker, none falls back.
    let before = counts();
    for _ in 0..3 {
        curl(true, "http://198.18.0.2:8084/big", &out, &[]);
        same_file(&out, &want);
    }
    let after = counts();
    assert_eq!(after.accepted - before.accepted, 3, "{before:?} {after:?}");
    assert_eq!(after.fallbacks, before.fallbacks);
    // The master's listener and the worker's that took its address over.
    let t = ok(&dsanctl(&[
        "--socket",
        "/run/dsan/lab/h1/dsand.sock",
        "listeners",
    ]));
    assert!(
        t.lines().filter(|l| l.contains(" 8084 ")).count() >= 2,
        "{t}"
    );
}

#[test]
fn a_preloaded_client_reaches_a_kernel_server_over_tcp() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("kernel-server");
    let want = big_file(&dir.path("www/big"));
    let conf = nginx_conf(&dir, 8081, true, 0);
    let _srv = nginx("h1", &dir, &conf, false);
    wait_listening("h1", 8081);
    // h1's daemon learns of a kernel listener within its refresh (150 ms);
    // until then a SAN connect is refused, as for a closed port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run(
        preloaded(
            "h0",
            "curl",
            &["-sS", "-o", "/dev/null", "http://198.18.0.2:8081/"],
        ),
        30,
    )
    .status
    .success()
    {
        assert!(Instant::now() < deadline, "never reached over TCP");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = counts();
    let out = dir.path("got");
    let o = curl(
        true,
        "http://198.18.0.2:8081/big",
        &out,
        &[("DSAN_PRELOAD_LOG", "1")],
    );
    same_file(&out, &want);
    let after = counts();
    assert_eq!(after.tcp_only, before.tcp_only + 1, "{}", text(&o));
    assert_eq!(after.accepted, before.accepted);
    assert!(
        text(&o).contains("connect fd"),
        "the decision is logged: {}",
        text(&o)
    );
}

#[test]
fn routing_rules_send_a_connect_to_the_kernel() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("rules");
    std::fs::write(dir.path("www/small"), b"hello\n").unwrap();
    let conf = nginx_conf(&dir, 8082, false, 0);
    let _srv = nginx("h1", &dir, &conf, true);
    wait_listening("h1", 8082);
    let rules = dir.path("rules.conf");
    std::fs::write(
        &rules,
        "# the test's rules\nbogus line here\ntcp client curl 198.18.0.0/24:8082\nboth any * *\n",
    )
    .unwrap();
    let before = counts();
    let out = dir.path("got");
    let o = curl(
        true,
        "http://198.18.0.2:8082/small",
        &out,
        &[
            ("DSAN_PRELOAD_CONF", &rules.display().to_string()),
            ("DSAN_PRELOAD_LOG", "1"),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"hello\n");
    let log = text(&o);
    assert!(log.contains("rules.conf:2: expected four fields"), "{log}");
    assert!(log.contains("kernel TCP (rule on line 3)"), "{log}");
    let after = counts();
    assert_eq!(after.accepted, before.accepted, "the rule kept it on TCP");
    assert_eq!(after.fallbacks, before.fallbacks);
}

#[test]
fn wrk_against_nginx_without_socket_errors() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("wrk");
    std::fs::write(dir.path("www/small"), vec![b'x'; 512]).unwrap();
    let conf = nginx_conf(&dir, 8083, false, 0);
    let _srv = nginx("h1", &dir, &conf, true);
    wait_listening("h1", 8083);
    let before = counts();
    let o = run(
        preloaded(
            "h0",
            "wrk",
            &["-t2", "-c20", "-d3s", "http://198.18.0.2:8083/small"],
        ),
        60,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("Socket errors"), "{t}");
    assert!(!t.contains("Non-2xx"), "{t}");
    let rps: f64 = t
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in {t}"));
    assert!(rps > 100.0, "{t}");
    let after = counts();
    assert!(
        after.accepted - before.accepted >= 20,
        "{before:?} {after:?}"
    );
    // Each request is at least its 512-byte body.
    assert!(
        after.bytes - before.bytes >= (rps * 3.0 * 0.5) as u64 * 512,
        "{t}"
    );
    assert_eq!(after.fallbacks, before.fallbacks);
}

fn redis_server(dir: &Scratch, save: &str) -> Reaped {
    let child = preloaded(
        "h1",
        "redis-server",
        &[
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            save,
            "--appendonly",
            "no",
            "--dir",
            &dir.s(),
            "--logfile",
            &dir.path("redis.log").display().to_string(),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    Reaped(child)
}

fn redis_benchmark(n: u32) -> String {
    let o = run(
        preloaded(
            "h0",
            "redis-benchmark",
            &[
                "-h",
                "198.18.0.2",
                "-p",
                "6379",
                "-t",
                "set,get",
                "-n",
                &n.to_string(),
                "-c",
                "50",
                "-P",
                "16",
                "-q",
                "--csv",
            ],
        ),
        120,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("\"SET\"") && t.contains("\"GET\""), "{t}");
    assert!(!t.to_lowercase().contains("error"), "{t}");
    t
}

#[test]
fn redis_benchmark_over_the_san_also_while_redis_forks_to_save() {
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("redis");
    {
        let _srv = redis_server(&dir, "");
        wait_listening("h1", 6379);
        let before = counts();
        redis_benchmark(100_000);
        let after = counts();
        // 50 clients (and the benchmark's own first connection).
        assert!(
            after.accepted - before.accepted >= 50,
            "{before:?} {after:?}"
        );
        // 200,000 commands of at least 20 bytes each.
        assert!(
            after.bytes - before.bytes >= 200_000 * 20,
            "{before:?} {after:?}"
        );
        assert_eq!(after.fallbacks, before.fallbacks);

        // The connections preloaded programs hold show with their program.
        let mut blpop = preloaded(
            "h0",
            "redis-cli",
            &["-h", "198.18.0.2", "-p", "6379", "blpop", "nothing", "10"],
        );
        let _cli = Reaped(blpop.stdout(Stdio::null()).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = dsanctl(&["--socket", "/run/dsan/lab/h1/dsand.sock", "connections"]);
            let t = ok(&o);
            if t.contains("redis-server") {
                break;
            }
            assert!(Instant::now() < deadline, "{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Saving every second with writes coming: redis forks a child that
    // saves while the parent serves SAN clients.
    let _srv = redis_server(&dir, "1 1");
    wait_listening("h1", 6379);
    let before = counts();
    redis_benchmark(300_000);
    wait_for_text(
        &dir.path("redis.log"),
        "Background saving terminated with success",
        30,
    );
    redis_benchmark(50_000);
    let after = counts();
    assert!(
        after.accepted - before.accepted >= 100,
        "{before:?} {after:?}"
    );
    assert_eq!(after.fallbacks, before.fallbacks);
}

#[test]
fn iperf3_both_directions_and_four_streams() {
    let _lab = Lab::up(&[]);
    for (i, extra) in [&[][..], &["-R"][..], &["-P", "4"][..]].iter().enumerate() {
        let port = (5201 + i).to_string();
        let _srv = Reaped(
            preloaded("h1", "iperf3", &["-4", "-s", "-1", "-p", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening("h1", 5201 + i as u16);
        let before = counts();
        let mut args = vec!["-c", "198.18.0.2", "-p", &port, "-t", "2"];
        args.extend_from_slice(extra);
        let o = run(preloaded("h0", "iperf3", &args), 60);
        let t = text(&o);
        assert!(
            o.status.success() && t.contains("iperf Done."),
            "{extra:?}: {t}"
        );
        let after = counts();
        // The control connection and one or four data connections.
        let streams = if extra.contains(&"-P") { 4 } else { 1 };
        assert!(
            after.accepted - before.accepted > streams,
            "{extra:?}: {before:?} {after:?}"
        );
        assert!(after.bytes - before.bytes > 10 << 20, "{extra:?}: {t}");
        assert_eq!(after.fallbacks, before.fallbacks, "{extra:?}");
    }
}

/// A Python program exercising sockets the library leaves to the kernel:
/// loopback TCP with select, poll and epoll, UDP, AF_UNIX, AF_INET6, dup and
/// fork, in a process with no daemon (and with one, on loopback).
const PASSTHROUGH: &str = r#"
import os, select, socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(8)
c = socket.create_connection(l.getsockname()); s, _ = l.accept()
c.sendall(b"x" * 100000)
got = b""
ep = select.epoll(); ep.register(s.fileno(), select.EPOLLIN)
while len(got) < 100000:
    assert ep.poll(5), "epoll"
    r, _, _ = select.select([s], [], [], 5); assert r, "select"
    p = select.poll(); p.register(s, select.POLLIN); assert p.poll(5000), "poll"
    got += s.recv(65536)
d = os.dup(c.fileno()); os.write(d, b"y"); os.close(d); assert s.recv(1) == b"y"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
u.sendto(b"dgram", u.getsockname()); assert u.recv(10) == b"dgram"
a, b = socket.socketpair(); a.send(b"unix"); assert b.recv(4) == b"unix"
try:
    v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 0)); v6.listen(1)
    w = socket.create_connection(v6.getsockname()[:2]); w.close(); v6.close()
except OSError:
    pass
pid = os.fork()
if pid == 0:
    c.sendall(b"child"); os._exit(0)
os.waitpid(pid, 0); assert s.recv(5) == b"child"
print("ok")
"#;

#[test]
fn everything_else_is_left_to_the_kernel() {
    require_root();
    // No daemon: every call passes through.
    let mut c = Command::new("python3");
    c.args(["-c", PASSTHROUGH])
        .env("LD_PRELOAD", lib())
        .env("DSAN_SOCKET", "/nonexistent/dsand.sock");
    let o = run(c, 60);
    assert!(
        o.status.success() && text(&o).contains("ok"),
        "{}",
        text(&o)
    );
    // With a daemon: loopback is still the kernel's.
    let _lab = Lab::up(&[]);
    let before = counts();
    let o = run(preloaded("h1", "python3", &["-c", PASSTHROUGH]), 60);
    assert!(
        o.status.success() && text(&o).contains("ok"),
        "{}",
        text(&o)
    );
    let after = counts();
    assert_eq!(after.accepted, before.accepted);
}

#[test]
fn the_library_exports_only_the_calls_it_interposes() {
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib())
        .output()
        .expect("nm (binutils)");
    let t = String::from_utf8_lossy(&o.stdout);
    let mut syms: Vec<&str> = t
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    syms.sort_unstable();
    let map = std::fs::read_to_string(root().join("preload/exports.map")).unwrap();
    let body = map
        .split("global:")
        .nth(1)
        .unwrap()
        .split("local:")
        .next()
        .unwrap();
    let mut want: Vec<&str> = body
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect();
    want.sort_unstable();
    assert_eq!(syms, want);
}

#[test]
fn a_program_that_forks_while_its_threads_use_sockets_never_hangs_its_child() {
    // Issue #27: the library's locks are taken and released around fork
    // (with the switch's), so a child never inherits one held by a thread
    // it does not have.
    let _lab = Lab::up(&[]);
    let script = root().join("control/tests/py/fork_churn.py");
    let s = script.display().to_string();
    let (_srv, _out) = started(
        preloaded("h1", "python3", &[&s, "server", "7450"]),
        "listening",
    );
    let o = run(
        preloaded(
            "h0",
            "python3",
            &[&s, "client", "198.18.0.2", "7450", "300"],
        ),
        120,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("forks 300 hung 0 "), "{t}");
}

/// Compiles `provider-shim/tests/c/SRC`, a plain C program (no dsan
/// library), with `-O2` and `flags`; the executable's path.
fn cc_plain(src: &str, name: &str, flags: &[&str]) -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dsan-harness-{name}-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-O2"])
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(root().join("provider-shim/tests/c").join(src))
        .status()
        .unwrap();
    assert!(st.success(), "compiling {src}");
    exe
}

#[test]
fn a_program_with_1024_descriptors_holds_1000_san_connections() {
    // Issue #24: a SAN connection cost a preloaded program about six
    // descriptors (its number, the switch's epoll instance, a kernel socket,
    // a connect's, a readable and a writable eventfd): a client with the
    // default limit of 1,024 held some 170. Now each costs the one number
    // the program holds, on both sides (Python's socket with a timeout
    // polls for "writable" before every send, and epoll for the replies).
    let _lab = Lab::up(&[]);
    let script = root().join("control/tests/py/hold_many.py");
    let s = script.display().to_string();
    let before = counts();
    let limited = |host: &str, args: &[&str]| {
        let mut a = vec!["--nofile=1024:1024", "python3", &s];
        a.extend_from_slice(args);
        preloaded(host, "prlimit", &a)
    };
    let (_srv, out) = started(limited("h1", &["server", "7470", "1000"]), "listening");
    let o = run(
        limited("h0", &["client", "198.18.0.2", "7470", "1000"]),
        120,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let fds: usize = t
        .split_whitespace()
        .skip_while(|w| *w != "fds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!(t.contains("ok 1000 fds"), "{t}");
    assert!(fds <= 1000 + 24, "the client held {fds} descriptors: {t}");
    assert_eq!(
        out.recv_timeout(Duration::from_secs(30)).unwrap(),
        "held 1000"
    );
    let sfds: usize = out
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .trim_start_matches("fds ")
        .parse()
        .unwrap();
    assert!(sfds <= 1000 + 24, "the server held {sfds} descriptors");
    let after = counts();
    assert!(
        after.accepted - before.accepted >= 1000,
        "the SAN carried them"
    );
}

#[test]
fn unrelated_servers_with_so_reuseport_share_their_san_clients() {
    // Issue #24: two processes (not forked from one another) that each
    // listen on the port with SO_REUSEPORT share its kernel TCP clients;
    // the second one got no SAN listener (the address was in use) and
    // served kernel TCP only. Now it joins the first one's SAN listener and
    // SAN requests go to the two in turn.
    let _lab = Lab::up(&[]);
    let server = "import socket,sys\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\nl.bind(('0.0.0.0',7480))\nl.listen(64)\nprint('listening',flush=True)\nwhile True:\n  c,_=l.accept()\n  c.recv(16)\n  c.sendall(sys.argv[1].encode())\n  c.close()";
    let before = counts();
    let joins = |m: &str| metric(m, "dsan_san_listener_joins_total");
    let joins_before = joins(&scrape(METRICS_BASE + 1));
    let (_a, _) = started(
        preloaded("h1", "python3", &["-c", server, "a"]),
        "listening",
    );
    let (_b, _) = started(
        preloaded("h1", "python3", &["-c", server, "b"]),
        "listening",
    );
    let o = run(
        preloaded(
            "h0",
            "python3",
            &[
                "-c",
                "import socket\nfor i in range(40):\n  s=socket.create_connection(('198.18.0.2',7480),timeout=10)\n  s.sendall(b'x')\n  print(s.recv(16).decode(),flush=True)\n  s.close()",
            ],
        ),
        60,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let served = |who: &str| t.lines().filter(|l| l.trim() == who).count();
    assert_eq!(served("a") + served("b"), 40, "{t}");
    assert!(served("a") >= 10 && served("b") >= 10, "both serve: {t}");
    let after = counts();
    assert_eq!(after.accepted - before.accepted, 40, "the SAN carried them");
    assert_eq!(after.fallbacks, before.fallbacks, "no fallback");
    assert!(
        joins(&scrape(METRICS_BASE + 1)) > joins_before,
        "the second joined"
    );
}

#[test]
fn memcached_and_socat_over_the_san() {
    // Issue #24: more unmodified programs. memcached (libevent, worker
    // threads) serves a socat client; socat's forking server (a child per
    // connection, which forks again to run `cat` on pipes) echoes to socat
    // clients. Each over the SAN, none falling back.
    let _lab = Lab::up(&[]);
    let spawn = |args: &[&str]| {
        let mut c = preloaded("h1", args[0], &args[1..]);
        Reaped(
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _mc = spawn(&[
        "memcached",
        "-u",
        "root",
        "-l",
        "0.0.0.0",
        "-p",
        "7490",
        "-U",
        "0",
        "-t",
        "2",
    ]);
    let _echo = spawn(&["socat", "TCP4-LISTEN:7491,fork,reuseaddr", "EXEC:cat"]);
    wait_listening("h1", 7490);
    wait_listening("h1", 7491);
    let before = counts();
    let socat = |port: &str, input: &str| -> String {
        let mut c = preloaded(
            "h0",
            "socat",
            &["-t", "5", "-", &format!("TCP4:198.18.0.2:{port}")],
        );
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let mut r = Reaped(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = r.0.try_wait().unwrap() {
                let mut out = String::new();
                r.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
                assert!(st.success(), "socat to {port}: {st} {out}");
                return out;
            }
            assert!(Instant::now() < deadline, "socat to {port} did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    for i in 0..10 {
        let out = socat(
            "7490",
            &format!("set k{i} 0 0 5\r\nval{i:02}\r\nget k{i}\r\nquit\r\n"),
        );
        assert_eq!(
            out,
            format!("STORED\r\nVALUE k{i} 0 5\r\nval{i:02}\r\nEND\r\n"),
            "memcached round {i}"
        );
        assert_eq!(
            socat("7491", &format!("hello {i}\n")),
            format!("hello {i}\n")
        );
    }
    let after = counts();
    assert_eq!(after.accepted - before.accepted, 20, "the SAN carried them");
    assert_eq!(after.fallbacks, before.fallbacks, "no fallback");
}

#[test]
fn a_plain_blocking_accept_waits_for_san_clients() {
    // Issue #24: a blocking accept() with nothing polled first returned
    // EAGAIN at once (the switch's listen made the program's descriptor
    // nonblocking through the kernel socket they shared).
    let _lab = Lab::up(&[]);
    let exe = cc_plain("blocking_accept.c", "blocking-accept", &[]);
    let before = counts();
    let (_srv, out) = started(
        preloaded("h1", &exe.display().to_string(), &["7460", "3"]),
        "listening",
    );
    // (With the old bug the three accepts failed at once, before any
    // client came: the first line would say so.)
    for _ in 0..3 {
        let o = run(
            preloaded(
                "h0",
                "python3",
                &[
                    "-c",
                    "import socket\ns=socket.create_connection(('198.18.0.2',7460),timeout=5)\ns.sendall(b'hello')\nassert s.recv(16)==b'hello'\ns.close()",
                ],
            ),
            30,
        );
        assert!(o.status.success(), "{}", text(&o));
        let l = out.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(l, "accepted 198.18.0.1 read 5");
    }
    let after = counts();
    assert_eq!(after.accepted - before.accepted, 3, "the SAN carried them");
    // And Python's blocking socket.accept() too.
    let (_py, pout) = started(preloaded(
        "h1",
        "python3",
        &[
            "-c",
            "import socket\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',7461))\nl.listen()\nprint('listening',flush=True)\nc,a=l.accept()\nprint('accepted',a[0],c.recv(16).decode(),flush=True)",
        ],
    ), "listening");
    let o = run(
        preloaded(
            "h0",
            "python3",
            &[
                "-c",
                "import socket\ns=socket.create_connection(('198.18.0.2',7461),timeout=5)\ns.sendall(b'hi')\ns.close()",
            ],
        ),
        30,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        pout.recv_timeout(Duration::from_secs(10)).unwrap(),
        "accepted 198.18.0.1 hi"
    );
}

/// One round of a differential check: the Python pair `script` (its
/// "server PORT" mode in h1, which prints "listening" first, then its
/// "client PORT" mode in h0), on kernel TCP or preloaded over the SAN.
/// Returns the client's output, the server's further lines and the server
/// (reaped when dropped); checks that h1 accepted one SAN connection when
/// preloaded and none otherwise.
fn pair_round(
    script: &str,
    preload: bool,
    port: &str,
) -> (String, std::sync::mpsc::Receiver<String>, Reaped) {
    let s = root().join(script).display().to_string();
    let mk = |host: &str, args: &[&str]| {
        if preload {
            preloaded(host, "python3", args)
        } else {
            plain(host, "python3", args)
        }
    };
    let (srv, out) = started(mk("h1", &[&s, "server", port]), "listening");
    let before = counts();
    let o = run(mk("h0", &[&s, "client", port]), 30);
    let san = counts().accepted - before.accepted;
    assert_eq!(
        san,
        u64::from(preload),
        "SAN connections accepted ({script})"
    );
    (text(&o), out, srv)
}

#[test]
fn socket_names_are_the_connections_as_on_kernel_tcp() {
    // Issue #24: getsockname() gave 0.0.0.0:0 on a SAN client and
    // 0.0.0.0:PORT on an accepted SAN connection.
    let _lab = Lab::up(&[]);
    let mut seen = Vec::new();
    for (preload, port) in [(false, "7480"), (true, "7481")] {
        let (client, out, _srv) = pair_round("control/tests/py/names.py", preload, port);
        let server = out.recv_timeout(Duration::from_secs(10)).unwrap();
        // client sock ('198.18.0.1', P) peer ('198.18.0.2', PORT)
        // server sock ('198.18.0.2', PORT) peer ('198.18.0.1', P) accept-addr (...)
        let p = client
            .split("('198.18.0.1', ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_else(|| panic!("{client}"))
            .to_string();
        assert_ne!(p, "0", "{client}");
        assert!(
            client.contains(&format!("peer ('198.18.0.2', {port})")),
            "{client}"
        );
        assert_eq!(
            server,
            format!(
                "server sock ('198.18.0.2', {port}) peer ('198.18.0.1', {p}) accept-addr ('198.18.0.1', {p})"
            ),
            "preload {preload}"
        );
        seen.push(preload);
    }
    assert_eq!(seen, [false, true]);
}

#[test]
fn a_fortified_program_reads_its_san_connections() {
    // Issue #24: a client built with -O2 -D_FORTIFY_SOURCE=2 (as Debian
    // builds its packages) read through __read_chk, which reached the
    // kernel on the switch's epoll descriptor (EINVAL).
    let _lab = Lab::up(&[]);
    let fortify = ["-D_FORTIFY_SOURCE=2"];
    let server = cc_plain("blocking_accept.c", "fortified-server", &fortify);
    let client = cc_plain("fortified_client.c", "fortified-client", &fortify);
    // The test means something only if the client does use the entries.
    let nm = Command::new("nm").arg("-D").arg(&client).output().unwrap();
    let syms = String::from_utf8_lossy(&nm.stdout);
    for s in ["__read_chk", "__recv_chk", "__recvfrom_chk"] {
        assert!(syms.contains(s), "{s} not used by the client:\n{syms}");
    }
    let before = counts();
    let (_srv, out) = started(
        preloaded("h1", &server.display().to_string(), &["7490", "3"]),
        "listening",
    );
    let o = run(
        preloaded(
            "h0",
            &client.display().to_string(),
            &["198.18.0.2", "7490", "64"],
        ),
        30,
    );
    assert!(text(&o).contains("ok read recv recvfrom"), "{}", text(&o));
    for _ in 0..3 {
        assert_eq!(
            out.recv_timeout(Duration::from_secs(10)).unwrap(),
            "accepted 198.18.0.1 read 5"
        );
    }
    assert_eq!(counts().accepted - before.accepted, 3, "over the SAN");
}

#[test]
fn shut_rd_leaves_the_bytes_already_received_readable() {
    // Issue #24: SHUT_RD discarded the bytes already queued; Linux's TCP
    // hands them over, then the end of the stream.
    let _lab = Lab::up(&[]);
    let mut got = Vec::new();
    for (preload, port) in [(false, "7495"), (true, "7496")] {
        let (client, _, _srv) = pair_round("control/tests/py/shut_rd.py", preload, port);
        got.push(client.trim().to_string());
    }
    assert_eq!(got[0], "after SHUT_RD: b'abc' b''", "kernel TCP");
    assert_eq!(got[1], got[0], "over the SAN as on kernel TCP");
}

#[test]
fn a_service_that_just_started_listening_is_never_refused() {
    // Issue #24: h1's daemon learned kernel TCP listeners from a scan every
    // 100-150 ms and answered "no listener" (final: ECONNREFUSED, no
    // fallback) in between, so a preloaded client that connected right
    // after a plain TCP server's listen() was refused. Now "no listener" is
    // said only after a scan that began after the request arrived; else
    // "TCP only", and the switch connects over TCP.
    let _lab = Lab::up(&[]);
    use std::io::Write;
    let s = root()
        .join("control/tests/py/listen_race.py")
        .display()
        .to_string();
    let rounds = 1000u32;
    let mut srv = Reaped(
        plain(
            "h1",
            "python3",
            &[&s, "server", "24000", &rounds.to_string()],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut cli = Reaped(
        preloaded("h0", "python3", &[&s, "client"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (srv_out, cli_out) = (lines(&mut srv.0), lines(&mut cli.0));
    let before = counts();
    let mut srv_in = srv.0.stdin.take().unwrap();
    let mut cli_in = cli.0.stdin.take().unwrap();
    for i in 0..rounds {
        let l = srv_out
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("round {i}: the server did not listen"));
        let port = l.strip_prefix("listening ").expect("listening PORT");
        writeln!(cli_in, "{port}").unwrap();
        let r = cli_out
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("round {i}: the client did not answer"));
        assert_eq!(r, format!("ok {port}"), "round {i}");
        writeln!(srv_in, "next").unwrap();
    }
    // Every round asked the SAN first and went to TCP on h1's answer.
    let after = counts();
    assert!(
        after.tcp_only - before.tcp_only >= u64::from(rounds),
        "tcp_only fallbacks: {} -> {}",
        before.tcp_only,
        after.tcp_only
    );
}

/// Behaviours of `control/tests/py/differential.py` in which a preloaded
/// program still observes something else over the SAN than on kernel TCP
/// (each listed with its status in docs/preload.md). The test fails when
/// one of them starts to match (take it off the list) or another differs.
const KNOWN_DIFFERENCES: &[&str] = &[];

/// One run of the differential script, plain or preloaded, on ports from
/// `base`: every observation of both sides, sorted.
fn differential(preload: bool, base: u16, env: &[(&str, &str)]) -> Vec<String> {
    let s = root()
        .join("control/tests/py/differential.py")
        .display()
        .to_string();
    let b = base.to_string();
    let mk = |host: &str, args: &[&str]| {
        let mut c = if preload {
            preloaded(host, "python3", args)
        } else {
            plain(host, "python3", args)
        };
        c.envs(env.iter().copied());
        c
    };
    let (_srv, out) = started(mk("h1", &[&s, "server", &b]), "listening");
    let o = std::panic::catch_unwind(|| run(mk("h0", &[&s, "client", &b]), 240));
    let Ok(o) = o else {
        // The client did not finish: what the server side saw says where.
        let server: Vec<String> = out.try_iter().collect();
        panic!(
            "the client side (preload: {preload}) did not finish; the server side saw:\n{}",
            server.join("\n")
        );
    };
    let client = text(&o);
    assert!(client.contains("client done"), "{client}");
    let mut lines: Vec<String> = client
        .lines()
        .filter(|l| !l.contains("client done"))
        .map(str::to_string)
        .collect();
    loop {
        let l = out
            .recv_timeout(Duration::from_secs(150))
            .expect("the server side finishes");
        if l == "server done" {
            break;
        }
        lines.push(l);
    }
    lines.sort();
    lines
}

#[test]
fn unmodified_programs_observe_over_the_san_what_they_observe_on_kernel_tcp() {
    // Issue #24: the differential suite. Each behaviour runs on plain
    // kernel TCP and preloaded over the SAN, and the observations (return
    // values, errno, bytes, readiness, names) must be the same.
    let _lab = Lab::up(&[]);
    let names = {
        let o = Command::new("python3")
            .arg(root().join("control/tests/py/differential.py"))
            .arg("list")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(names.len() >= 60, "{} behaviours", names.len());
    let tcp = differential(false, 26000, &[]);
    let before = counts();
    let san = differential(true, 26200, &[]);
    let used = counts().accepted - before.accepted;
    // Once more with wake sockets for readiness (`DSAN_WAKE=socket`: the
    // daemon's lcore signals them itself): the same observations.
    let tokens = || metric(&scrape(METRICS_BASE + 1), "dsan_app_wake_tokens_total");
    let (before, tokens_before) = (counts(), tokens());
    let woken = differential(true, 26400, &[("DSAN_WAKE", "socket")]);
    let used_woken = counts().accepted - before.accepted;
    let tokens_sent = tokens() - tokens_before;
    let of = |all: &[String], n: &str| -> Vec<String> {
        all.iter()
            .filter(|l| l.split(' ').next() == Some(n))
            .cloned()
            .collect()
    };
    let mut unexpected = Vec::new();
    for (run, san) in [("", &san), (" (wake sockets)", &woken)] {
        for n in &names {
            let (a, b) = (of(&tcp, n), of(san, n));
            let same = a == b;
            let known = KNOWN_DIFFERENCES.contains(&n.as_str());
            if same == known {
                unexpected.push(format!(
                    "{n}{run}: {}\n  tcp: {a:?}\n  san: {b:?}",
                    if same {
                        "now matches kernel TCP: take it off KNOWN_DIFFERENCES"
                    } else {
                        "differs from kernel TCP"
                    }
                ));
            }
        }
    }
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    // The preloaded runs went over the SAN (one or more connections for
    // nearly every behaviour), the second woken through wake sockets.
    assert!(used >= 45, "SAN connections accepted on h1: {used}");
    assert!(
        used_woken >= 45,
        "SAN connections accepted on h1 (wake sockets): {used_woken}"
    );
    assert!(tokens_sent > 0, "no wake socket was signalled");
    // docs/preload.md lists every behaviour with its status.
    let doc = std::fs::read_to_string(root().join("docs/preload.md")).unwrap();
    for n in &names {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{n}` |")))
            .unwrap_or_else(|| panic!("docs/preload.md has no row for {n}"));
        assert_eq!(
            row.contains("| differs"),
            KNOWN_DIFFERENCES.contains(&n.as_str()),
            "docs/preload.md: the row for {n} gives the wrong status: {row}"
        );
    }
}

#[test]
fn a_fork_per_connection_server_serves_every_san_client() {
    // Issue #24: Python's ForkingTCPServer answered 0 of 20 SAN clients (a
    // child's inherited SAN connection was the parent's alone, and the
    // parent's close reset it). Now the child claims the connection (its
    // rings move to the child's attachment) and the parent's close, with the
    // child still holding it, closes nothing.
    let t = handed_over_to_every_client("fork_server.py", &[], "7510", 200);
    assert!(t.contains("ok 200 of 200"), "{t}");
}

#[test]
fn a_fork_per_connection_server_serves_every_san_client_on_a_busy_machine() {
    // A child that closed its connection and _exited while the switch's
    // registration thread still held the connection left the close
    // unposted: the daemon reset the connection as the child's death (the
    // client could read ECONNRESET). The window is short on an idle
    // machine; two busy threads here (one per CPU of the CI machine) made
    // it show in about half of the runs before the fix.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    struct Stop(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        Vec<std::thread::JoinHandle<()>>,
    );
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in self.1.drain(..) {
                let _ = t.join();
            }
        }
    }
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let _stop = Stop(stop, busy);
    let t = handed_over_to_every_client("fork_server.py", &[], "7513", 400);
    assert!(t.contains("ok 400 of 400"), "{t}");
}

#[test]
fn a_connection_passed_with_scm_rights_is_served_by_the_process_that_received_it() {
    // Issue #24, fourth item: a SAN connection received in an SCM_RIGHTS
    // message was the sender's alone (ENOTSOCK in the receiver). A master
    // passes each accepted connection to one of two worker processes
    // (started afresh, not forked) and closes its copy at once: each worker
    // claims the connection with the life that travelled beside it and
    // answers.
    let dir = Scratch::new("pass");
    let t = handed_over_to_every_client("pass_server.py", &[&dir.s()], "7512", 100);
    assert!(t.contains("ok 100 of 100, 2 server processes"), "{t}");
}

/// Runs `script` (fork_server.py's shape) preloaded as a server on h1
/// (with `args` after the port) and its client on h0 with `n` connections:
/// the client's output. Every connection went over the SAN and was handed
/// over to another process (a claim), none was reset, none fell back to TCP.
fn handed_over_to_every_client(script: &str, args: &[&str], port: &str, n: u64) -> String {
    let _lab = Lab::up(&[]);
    let s = root()
        .join("control/tests/py")
        .join(script)
        .display()
        .to_string();
    let mut a = vec![s.as_str(), "server", port];
    a.extend_from_slice(args);
    let (_srv, _) = started(preloaded("h1", "python3", &a), "listening");
    let h1 = |name: &str| metric(&scrape(METRICS_BASE + 1), name);
    let resets = || {
        metric_sum(
            &scrape(METRICS_BASE + 1),
            "dsan_san_connections_reset_total",
        )
    };
    let (acc, hand, reset) = (
        h1("dsan_san_connects_accepted_total"),
        h1("dsan_san_connection_handovers_total"),
        resets(),
    );
    let fallbacks = counts().fallbacks;
    let o = run(
        preloaded("h0", "python3", &[&s, "client", port, &n.to_string()]),
        120,
    );
    let t = text(&o);
    assert_eq!(h1("dsan_san_connects_accepted_total") - acc, n, "{t}");
    assert!(h1("dsan_san_connection_handovers_total") - hand >= n, "{t}");
    assert_eq!(resets(), reset, "{t}");
    assert_eq!(
        counts().fallbacks,
        fallbacks,
        "no connection fell back to TCP"
    );
    t
}

#[test]
fn a_blocking_send_over_the_tcp_fallback_waits_for_room() {
    // Found by the differential suite: a preloaded client whose connect fell
    // back to kernel TCP got EAGAIN from a blocking send once the path was
    // full (the switch's kernel socket is nonblocking). It waits now, as a
    // blocking kernel send does.
    let _lab = Lab::up(&[]);
    let s = root()
        .join("control/tests/py/slow_reader.py")
        .display()
        .to_string();
    let (srv, out) = started(plain("h1", "python3", &[&s, "server", "7511"]), "listening");
    let before = counts();
    let o = run(preloaded("h0", "python3", &[&s, "client", "7511"]), 60);
    assert_eq!(text(&o).trim(), format!("sent {}", 8 << 20), "{}", text(&o));
    let got = out
        .recv_timeout(Duration::from_secs(30))
        .expect("the server's count");
    assert_eq!(got, format!("got {}", 8 << 20));
    drop(srv);
    assert_eq!(counts().tcp_only, before.tcp_only + 1, "over kernel TCP");
}

/// PostgreSQL's programs (Debian's postgresql-15, which `scripts/setup.sh`
/// installs without starting a server).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server started for a test: a fast shutdown (SIGINT to the
/// postmaster, which ends its backends) on drop, waited for.
struct Postgres(std::process::Child);

impl Drop for Postgres {
    fn drop(&mut self) {
        // SAFETY: plain call on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pgbench_against_a_preloaded_postgresql_over_the_san() {
    // Issue #24: PostgreSQL forks a backend per connection, which serves the
    // connection its postmaster accepted (and closed at once). With the
    // fork hand-over, pgbench -c 16 runs over the SAN without errors.
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("pg");
    let data = dir.path("data");
    let owned = Command::new("chown")
        .args(["-R", "postgres:postgres", &dir.s()])
        .status()
        .unwrap();
    assert!(owned.success());
    let init = run(
        {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--clear-groups",
                &format!("{PG_BIN}/initdb"),
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]);
            c
        },
        120,
    );
    assert!(init.status.success(), "initdb: {}", text(&init));
    // The lab's clients (initdb's trust covers local connections only).
    {
        use std::io::Write;
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .unwrap();
        writeln!(hba, "host all all 198.18.0.0/15 trust").unwrap();
    }
    // The server in h1, preloaded, as user postgres with the root group as
    // a supplementary group (the lab's control sockets are root's group's:
    // docs/operations.md, who may attach).
    let mut c = in_host(
        "h1",
        Path::new("setpriv"),
        &[
            "--reuid=postgres",
            "--regid=postgres",
            "--groups=postgres,root",
            &format!("{PG_BIN}/postgres"),
            "-D",
            &data.display().to_string(),
            "-c",
            "listen_addresses=0.0.0.0",
            "-c",
            "port=5433",
            "-c",
            &format!("unix_socket_directories={}", dir.s()),
            "-c",
            "max_connections=40",
            "-c",
            "fsync=off",
            "-c",
            "shared_buffers=32MB",
        ],
    );
    c.env("LD_PRELOAD", lib())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _pg = Postgres(c.spawn().unwrap());
    wait_listening("h1", 5433);
    let bench = |args: &[&str]| {
        let mut a = vec!["-h", "198.18.0.2", "-p", "5433", "-U", "postgres"];
        a.extend_from_slice(args);
        a.push("postgres");
        run(preloaded("h0", &format!("{PG_BIN}/pgbench"), &a), 180)
    };
    let before = counts();
    let h1 = |name: &str| metric(&scrape(METRICS_BASE + 1), name);
    let hand = h1("dsan_san_connection_handovers_total");
    let init = bench(&["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "pgbench -i: {}", text(&init));
    let o = bench(&["-c", "16", "-j", "2", "-T", "5", "-n"]);
    let t = text(&o);
    assert!(o.status.success(), "pgbench: {t}");
    assert!(t.contains("number of clients: 16"), "{t}");
    assert!(t.contains("number of failed transactions: 0 "), "{t}");
    let txs: u64 = t
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or(0);
    assert!(txs > 0, "{t}");
    // Over the SAN: every client connection accepted on h1 and claimed by
    // its backend; nothing fell back to TCP.
    let after = counts();
    assert!(after.accepted - before.accepted >= 17, "{t}");
    assert!(
        h1("dsan_san_connection_handovers_total") - hand >= 17,
        "{t}"
    );
    assert_eq!(after.fallbacks, before.fallbacks, "{t}");
}

#[test]
fn nginx_with_four_workers_serves_san_clients_from_every_worker() {
    // Issue #24: of several forked workers only the first to use the
    // inherited listener served SAN clients. Now later workers join its SAN
    // listener and requests are handed to the workers in turn.
    let _lab = Lab::up(&[]);
    let dir = Scratch::new("four-workers");
    std::fs::write(dir.path("www/index.html"), b"hello\n").unwrap();
    let conf = dir.path("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser root;\nmaster_process on;\nworker_processes 4;\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  log_format w '$pid $remote_addr';\n  access_log {d}/access.log w;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n  server {{ listen 8086; root {d}/www; }}\n}}\n",
            d = dir.s()
        ),
    )
    .unwrap();
    let _srv = nginx("h1", &dir, &conf, true);
    wait_listening("h1", 8086);
    let h1 = |name: &str| metric(&scrape(METRICS_BASE + 1), name);
    // The workers listen again as they start: three join the one that took
    // the address over from the master.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h1("dsan_san_listener_joins_total") < 3 {
        assert!(
            Instant::now() < deadline,
            "joins: {}",
            h1("dsan_san_listener_joins_total")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = dir.path("access.log");
    let seen = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    let before = counts();
    let o = run(
        preloaded(
            "h0",
            "wrk",
            &["-t", "2", "-c", "16", "-d", "2s", "http://198.18.0.2:8086/"],
        ),
        60,
    );
    let t = text(&o);
    assert!(o.status.success() && !t.contains("Socket errors"), "{t}");
    let after = counts();
    assert!(
        after.accepted - before.accepted >= 16,
        "{before:?} {after:?}"
    );
    assert_eq!(after.fallbacks, before.fallbacks, "{t}");
    let lines = std::fs::read_to_string(&log).unwrap();
    let mut per_worker = std::collections::BTreeMap::<String, u64>::new();
    for l in lines.lines().skip(seen) {
        let pid = l.split_whitespace().next().unwrap_or("").to_string();
        *per_worker.entry(pid).or_default() += 1;
    }
    assert_eq!(
        per_worker.len(),
        4,
        "requests per worker (pid: count): {per_worker:?}"
    );
}

#[test]
fn buffer_sizes_set_before_listen_and_connect_size_the_san_rings() {
    // Issue #24: SO_RCVBUF/SO_SNDBUF never reached the SAN (every
    // connection had the default rings), and a connection accepted over
    // the SAN did not start with its listener's options, as the kernel's do.
    let _lab = Lab::up(&[]);
    let s = root()
        .join("control/tests/py/bufsizes.py")
        .display()
        .to_string();
    let round = |preload: bool, port: &str, srv_buf: &str, cli_buf: &str| {
        let mk = |host: &str, args: &[&str]| {
            if preload {
                preloaded(host, "python3", args)
            } else {
                plain(host, "python3", args)
            }
        };
        let (_srv, out) = started(mk("h1", &[&s, "server", port, srv_buf]), "listening");
        let before = counts();
        let o = run(mk("h0", &[&s, "client", port, cli_buf]), 30);
        let server = out.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            counts().accepted - before.accepted,
            u64::from(preload),
            "SAN connections accepted"
        );
        (text(&o).trim().to_string(), server)
    };
    // (client line, server line): "WHO rcv_space N so_rcvbuf M".
    let field = |line: &str, name: &str| -> u64 {
        let mut it = line.split_whitespace();
        it.find(|w| *w == name);
        it.next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line:?}"))
    };
    let (kc, ks) = round(false, "7500", "32768", "16384");
    let (sc, ss) = round(true, "7501", "32768", "16384");
    // What the programs read back (SO_RCVBUF, the accepted connection's
    // inherited from its listener) is the kernel's.
    assert_eq!(
        field(&sc, "so_rcvbuf"),
        field(&kc, "so_rcvbuf"),
        "{sc} / {kc}"
    );
    assert_eq!(
        field(&ss, "so_rcvbuf"),
        field(&ks, "so_rcvbuf"),
        "{ss} / {ks}"
    );
    // Over the SAN the receive ring (TCP_INFO's receive space) is what each
    // side asked for: the client's own, the accepted one its listener's.
    assert_eq!(field(&sc, "rcv_space"), 16384, "{sc}");
    assert_eq!(field(&ss, "rcv_space"), 32768, "{ss}");
    // Without the options, the default rings.
    let (dc, ds) = round(true, "7502", "0", "0");
    let ring = 256 << 10;
    assert_eq!(field(&dc, "rcv_space"), ring, "{dc}");
    assert_eq!(field(&ds, "rcv_space"), ring, "{ds}");
}
