//! Two-host mode, for lab servers with DPDK NICs: `dsan-bench serve` on
//! one host answers on the SAN (the provider, attached to that host's
//! dsand) and on kernel TCP, on the same port; `dsan-bench run --peer ADDR`
//! on the other measures against it through its own dsand: connect latency,
//! the no-listener refusal and the closed-loop setup rate, SAN (through the
//! switch) and kernel TCP on the same wire, into the same table, .hlog,
//! .hgrm, summary.json and plot as `dsan-bench suite`.
//!
//! Each host has its own clock, so the hop-by-hop breakdown (which needs
//! both daemons' stamps on one clock) stays with the lab's suite.

use anyhow::{anyhow, bail, Context, Result};
use dsan_provider::{Decision, Error as SanError, Provider, SanSocket};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::suite::{hist, report, tcp_listener, Report, Row};

/// `dsan-bench serve`.
pub(crate) struct ServeOpts {
    pub(crate) port: u16,
    pub(crate) socket: Option<PathBuf>,
    /// Stop after this long (None: until killed).
    pub(crate) duration: Option<Duration>,
}

/// `dsan-bench run`.
pub(crate) struct RunOpts {
    pub(crate) peer: Ipv4Addr,
    pub(crate) port: u16,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) count: u64,
    pub(crate) concurrency: usize,
    pub(crate) duration: Duration,
    pub(crate) out: PathBuf,
}

/// Serves until killed (or for `duration`): accepts every SAN and kernel
/// TCP connection on `port` and closes it.
pub(crate) fn serve(o: ServeOpts) -> Result<()> {
    let p = Provider::attach(o.socket.as_deref())
        .map_err(|e| anyhow!("attaching to dsand: {e} (give --socket or DSAN_SOCKET)"))?;
    let l = SanSocket::new(&p).map_err(|e| anyhow!("{e}"))?;
    l.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, o.port))
        .map_err(|e| anyhow!("SAN port {}: {e}", o.port))?;
    l.listen(4096).map_err(|e| anyhow!("SAN listen: {e}"))?;
    let t = tcp_listener(Ipv4Addr::UNSPECIFIED, o.port, 4096)?;
    t.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (san_n, tcp_n) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let san = {
        let (stop, n) = (stop.clone(), san_n.clone());
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                match l.accept(|_| Decision::Accept) {
                    Ok((c, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        drop(c);
                    }
                    Err(SanError::Again) => std::thread::yield_now(),
                    Err(e) => bail!("SAN accept: {e}"),
                }
            }
            Ok(())
        })
    };
    let tcp = {
        let (stop, n) = (stop.clone(), tcp_n.clone());
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                match t.accept() {
                    Ok((c, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        drop(c);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now()
                    }
                    Err(e) => bail!("TCP accept: {e}"),
                }
            }
            Ok(())
        })
    };
    println!("serving port {} (SAN and kernel TCP)", o.port);
    use std::io::Write;
    std::io::stdout().flush().ok();
    let start = Instant::now();
    while o.duration.is_none_or(|d| start.elapsed() < d) && !san.is_finished() && !tcp.is_finished()
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    san.join().map_err(|_| anyhow!("SAN acceptor panicked"))??;
    tcp.join().map_err(|_| anyhow!("TCP acceptor panicked"))??;
    eprintln!(
        "served {} SAN and {} kernel TCP connections",
        san_n.load(Ordering::Relaxed),
        tcp_n.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One connect to `to`: Ok(true) connected, Ok(false) refused, Err(()) other.
fn connect_once(tcp: bool, to: SocketAddrV4) -> std::result::Result<bool, ()> {
    if tcp {
        return match TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(false),
            Err(_) => Err(()),
        };
    }
    let s = dsan_switch::socket().map_err(|_| ())?;
    let r = dsan_switch::connect(s, to);
    let _ = dsan_switch::close(s);
    match r {
        Ok(_) => Ok(true),
        Err(libc::ECONNREFUSED) => Ok(false),
        Err(_) => Err(()),
    }
}

fn row(scenario: &'static str, transport: &'static str, what: &'static str) -> Row {
    Row {
        scenario,
        policy: "peer".into(),
        accept: if scenario == "no-listener" {
            "-"
        } else {
            "spinning"
        },
        transport,
        what,
        hist: hist(),
        attempts: 0,
        errors: 0,
        refused: 0,
        pending: 0,
        rate: None,
        cpu_us: None,
        cpu: None,
        runs: Vec::new(),
        wall_after: None,
    }
}

/// Measures against a `dsan-bench serve` at `o.peer`.
pub(crate) fn run(o: RunOpts) -> Result<()> {
    if let Some(s) = &o.socket {
        std::env::set_var("DSAN_SOCKET", s);
    }
    // The switch must reach the local daemon and see the peer on a SAN
    // subnet, or its connects would silently go over kernel TCP.
    let p = Provider::attach(o.socket.as_deref())
        .map_err(|e| anyhow!("attaching to dsand: {e} (give --socket or DSAN_SOCKET)"))?;
    if !p.san_addrs().iter().any(|s| s.contains(o.peer)) {
        bail!("{} is on no SAN subnet of this host's dsand", o.peer);
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let started = SystemTime::now();
    let t0 = Instant::now();
    let to = SocketAddrV4::new(o.peer, o.port);
    let nobody = SocketAddrV4::new(o.peer, o.port.wrapping_add(1));
    let mut rows = Vec::new();
    for (scenario, what, dst) in [
        ("connect", "connected", to),
        ("no-listener", "refused", nobody),
    ] {
        for transport in ["dsan", "tcp"] {
            eprintln!("  {scenario} / {transport} ({} connects)", o.count);
            let mut r = row(scenario, transport, what);
            for _ in 0..o.count {
                let t = Instant::now();
                let got = connect_once(transport == "tcp", dst);
                let d = t.elapsed().as_nanos() as u64;
                r.attempts += 1;
                match (got, scenario) {
                    (Ok(true), "connect") => r.hist.saturating_record(d),
                    (Ok(false), "no-listener") => {
                        r.refused += 1;
                        r.hist.saturating_record(d);
                    }
                    _ => r.errors += 1,
                }
            }
            rows.push(r);
        }
    }
    for transport in ["dsan", "tcp"] {
        eprintln!(
            "  rate-closed / {transport} ({} connectors, {:?})",
            o.concurrency, o.duration
        );
        let dur = o.duration;
        let start = Instant::now();
        let threads: Vec<_> = (0..o.concurrency)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut h = hist();
                    let (mut n, mut err) = (0u64, 0u64);
                    while start.elapsed() < dur {
                        let t = Instant::now();
                        n += 1;
                        match connect_once(transport == "tcp", to) {
                            Ok(true) => h.saturating_record(t.elapsed().as_nanos() as u64),
                            _ => err += 1,
                        }
                    }
                    (h, n, err)
                })
            })
            .collect();
        let mut r = row("rate-closed", transport, "connected");
        for t in threads {
            let (h, n, err) = t.join().map_err(|_| anyhow!("connector panicked"))?;
            r.hist.add(&h).map_err(|e| anyhow!("{e:?}"))?;
            r.attempts += n;
            r.errors += err;
        }
        r.rate = Some((r.attempts - r.errors) as f64 / start.elapsed().as_secs_f64());
        rows.push(r);
    }
    let rows = crate::suite::merge_runs(rows);
    report(&Report {
        out: &o.out,
        rows: &rows,
        breakdowns: &[],
        config: json!({"mode": "two-host", "peer": o.peer.to_string(), "port": o.port,
                       "count": o.count, "concurrency": o.concurrency, "duration_s": o.duration.as_secs_f64(),
                       "build": env!("CARGO_PKG_VERSION")}),
        started,
        elapsed: t0.elapsed(),
        reject_wait: Duration::ZERO,
    })
}
