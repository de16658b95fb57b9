//! SAN connections carry bytes: the C program `provider-shim/tests/c/stream.c`
//! (compiled against the committed header and `libdsan_provider.so`) in the
//! two-host lab, with and without the fault injector. Needs root.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Compiles stream.c once per test process.
fn stream_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("dsan-harness-stream-{}", std::process::id()));
        let st = Command::new("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-O2", "-I"])
            .arg(root().join("provider-shim/include"))
            .arg(root().join("provider-shim/tests/c/stream.c"))
            .arg("-L")
            .arg(bindir())
            .args(["-ldsan_provider", "-lpthread", "-o"])
            .arg(&out)
            .status()
            .expect("cc");
        assert!(st.success(), "compiling stream.c failed");
        out
    })
    .clone()
}

/// stream.c in a lab host, its stdout as lines.
struct P {
    _child: Reaped,
    pid: u32,
    out: Receiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl P {
    fn spawn(host: &str, args: &[&str]) -> P {
        let mut c = in_host(host, &stream_bin(), args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn stream");
        let stdin = c.stdin.take();
        let out = lines(&mut c);
        P {
            pid: c.id(),
            _child: Reaped(c),
            out,
            stdin,
        }
    }

    fn line(&self, within: Duration, what: &str) -> String {
        self.out
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
    }

    /// The line after the "listening" line of a server.
    fn listening(&self) {
        assert_eq!(self.line(Duration::from_secs(10), "listening"), "listening");
    }
}

/// `rx BYTES SUM tx BYTES SUM err E E` -> ((rx bytes, sum), (tx bytes, sum), errors).
fn transfer_result(l: &str) -> ((u64, String), (u64, String), (i64, i64)) {
    let w: Vec<&str> = l.split_whitespace().collect();
    assert_eq!((w[0], w[3], w[6]), ("rx", "tx", "err"), "{l}");
    (
        (w[1].parse().unwrap(), w[2].into()),
        (w[4].parse().unwrap(), w[5].into()),
        (w[7].parse().unwrap(), w[8].parse().unwrap()),
    )
}

/// 64 MiB each way at once, checksums compared end to end.
fn both_ways(lab_args: &[&str], bytes: u64, seq: bool) -> (String, String) {
    let _lab = Lab::up(lab_args);
    let n = bytes.to_string();
    let mut sargs = vec!["server", "7000", &n];
    if seq {
        sargs.push("seq");
    }
    let srv = P::spawn("h1", &sargs);
    srv.listening();
    let cli = P::spawn("h0", &["client", "198.18.0.2", "7000", &n]);
    let within = Duration::from_secs(240);
    let c = transfer_result(&cli.line(within, "client result"));
    let s = transfer_result(&srv.line(within, "server result"));
    assert_eq!(c.2, (0, 0), "client errors");
    assert_eq!(s.2, (0, 0), "server errors");
    assert_eq!(c.1 .0, bytes);
    assert_eq!(s.1 .0, bytes);
    assert_eq!(s.0, c.1, "what h1 received is what h0 sent");
    assert_eq!(c.0, s.1, "what h0 received is what h1 sent");
    let m1 = scrape(METRICS_BASE + 1);
    assert!(metric(&m1, "dsan_san_bytes_total{direction=\"rx\"}") >= bytes);
    assert!(metric(&m1, "dsan_san_bytes_total{direction=\"tx\"}") >= bytes);
    (scrape(METRICS_BASE), m1)
}

const METRICS_BASE: u16 = 19450;

/// A close is posted to the daemon, not awaited, and both programs exit
/// right after it with bytes still in their send rings: the daemon sends
/// them and the FIN anyway (it serves the closes a process left in its ring
/// before it resets what the process still held), so each side gets every
/// byte and a clean end of stream, not a reset.
#[test]
fn a_close_just_before_exit_lets_the_last_bytes_and_the_fin_through() {
    let (m0, m1) = both_ways(&[], 4 << 20, false);
    for m in [&m0, &m1] {
        for reason in ["process_gone", "aborted", "peer"] {
            let series = format!("dsan_san_connections_reset_total{{reason=\"{reason}\"}}");
            assert_eq!(metric(m, &series), 0, "{series}");
        }
    }
}

#[test]
fn sixty_four_mib_each_way_on_a_clean_link() {
    let (m0, _) = both_ways(&[], 64 << 20, false);
    assert_eq!(
        metric(&m0, "dsan_frames_dropped_total{reason=\"injected\"}"),
        0
    );
}

#[test]
fn sixty_four_mib_each_way_at_one_percent_loss() {
    // (At 1500-byte frames: some 47,000 frames each way, so that 1 % of
    // them is hundreds of losses to repair; the lab's default frames of
    // 60 KiB would be some 1,100.)
    let (m0, m1) = both_ways(
        &["--loss", "0.01", "--fault-seed", "7", "--mtu", "1500"],
        64 << 20,
        false,
    );
    let injected = metric(&m0, "dsan_frames_dropped_total{reason=\"injected\"}")
        + metric(&m1, "dsan_frames_dropped_total{reason=\"injected\"}");
    let rtx = metric(&m0, "dsan_san_frames_retransmitted_total")
        + metric(&m1, "dsan_san_frames_retransmitted_total");
    assert!(injected > 100, "the injector dropped frames: {injected}");
    assert!(rtx > 0, "losses were repaired by retransmission");
}

#[test]
fn duplicates_and_reordering_never_reach_the_application() {
    both_ways(
        &["--dup", "0.02", "--reorder", "0.02", "--loss", "0.002"],
        8 << 20,
        false,
    );
}

#[test]
fn half_close_then_the_other_direction_flows() {
    // The server reads to the end of the stream (the client's SHUT_WR), and
    // only then sends: its receive returned 0 while its sending side was open.
    both_ways(&[], 4 << 20, true);
}

#[test]
fn a_reader_that_stops_stalls_the_writer_and_loses_nothing() {
    let _lab = Lab::up(&[]);
    let mut srv = P::spawn("h1", &["stall-server", "7001"]);
    srv.listening();
    let cli = P::spawn("h0", &["stall-client", "198.18.0.2", "7001"]);
    let l = cli.line(Duration::from_secs(20), "blocked");
    let w: Vec<&str> = l.split_whitespace().collect();
    assert_eq!((w[0], w[2], w[3]), ("blocked", "again", "-11"), "{l}");
    let sent: u64 = w[1].parse().unwrap();
    // Send ring (256 KiB) plus the receiver's ring (256 KiB) hold it all.
    assert!(
        (256 << 10..=512 << 10).contains(&sent),
        "{sent} bytes taken"
    );
    // The daemon counts the stall when it serves the writer's last kick,
    // which may come just after the writer's EAGAIN.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&scrape(METRICS_BASE), "dsan_san_credit_stalls_total") == 0 {
        assert!(Instant::now() < deadline, "no credit stall counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The reader reads: the writer gets FD_WRITE and sends again.
    use std::io::Write;
    writeln!(srv.stdin.as_mut().unwrap(), "read").unwrap();
    let l = cli.line(Duration::from_secs(20), "writable");
    assert!(l.starts_with("writable 1 send "), "{l}");
    let more: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
    let l = srv.line(Duration::from_secs(20), "reader result");
    assert_eq!(l, format!("rx {} err 0", sent + more), "nothing lost");
}

#[test]
fn a_killed_process_resets_its_connections_at_once() {
    let _lab = Lab::up(&[]);
    let srv = P::spawn("h1", &["hold-server", "7002"]);
    srv.listening();
    let cli = P::spawn("h0", &["hold-client", "198.18.0.2", "7002"]);
    assert_eq!(cli.line(Duration::from_secs(10), "ready"), "ready");
    assert_eq!(srv.line(Duration::from_secs(10), "ready"), "ready");
    let t0 = Instant::now();
    // kill -9 the server (`ip netns exec` execs it: same pid).
    assert!(Command::new("kill")
        .args(["-9", &srv.pid.to_string()])
        .status()
        .unwrap()
        .success());
    let l = cli.line(Duration::from_secs(5), "the reset");
    let took = t0.elapsed();
    assert_eq!(
        l, "recv -104 close 1 close_error -104 so_error 104 send -32",
        "recv fails with ECONNRESET, FD_CLOSE carries it, SO_ERROR tells it once, send gets EPIPE"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    let m0 = scrape(METRICS_BASE);
    assert_eq!(
        metric(&m0, "dsan_san_connections_reset_total{reason=\"peer\"}"),
        1
    );
}

#[test]
fn a_silent_peer_daemon_is_detected_by_the_keepalive() {
    let _lab = Lab::up(&[]);
    let srv = P::spawn("h1", &["hold-server", "7003"]);
    srv.listening();
    let cli = P::spawn("h0", &["hold-client", "198.18.0.2", "7003"]);
    assert_eq!(cli.line(Duration::from_secs(10), "ready"), "ready");
    assert_eq!(srv.line(Duration::from_secs(10), "ready"), "ready");
    // SIGKILL h1's daemon: it sends nothing more, not even a reset.
    let pid = std::fs::read_to_string("/run/dsan/lab/h1/dsand.pid").unwrap();
    let t0 = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap()
        .success());
    let l = cli.line(Duration::from_secs(10), "the keepalive's reset");
    let took = t0.elapsed();
    assert!(l.starts_with("recv -104 close 1 close_error -104"), "{l}");
    // keepalive_timeout is 3 s after the last frame heard.
    assert!(took <= Duration::from_millis(4500), "{took:?}");
    let m0 = scrape(METRICS_BASE);
    assert_eq!(
        metric(
            &m0,
            "dsan_san_connections_reset_total{reason=\"timed_out\"}"
        ),
        1
    );
}

#[test]
fn a_thousand_connections_at_once_each_move_a_little() {
    let _lab = Lab::up(&[]);
    let n = "1000";
    let srv = P::spawn("h1", &["echo-server", "7004", n]);
    srv.listening();
    let cli = P::spawn("h0", &["many", "198.18.0.2", "7004", n]);
    let within = Duration::from_secs(120);
    assert_eq!(cli.line(within, "connected"), "connected 1000");
    let m1 = scrape(METRICS_BASE + 1);
    assert_eq!(metric(&m1, "dsan_san_connections"), 1000);
    assert_eq!(cli.line(within, "many"), "many 1000 bad 0");
    assert_eq!(srv.line(within, "echoed"), "echoed 1000 bad 0");
}

#[test]
fn sixty_four_mib_each_way_with_jumbo_frames() {
    let (m0, _) = both_ways(&["--mtu", "9000"], 64 << 20, false);
    // The payloads were cut to the 9000-byte link, not to 1500.
    let frames = metric(&m0, "dsan_san_frames_sent_total{kind=\"data\"}");
    assert!(
        frames < (64 << 20) / 6000,
        "{frames} Data frames for 64 MiB: not jumbo"
    );
}
