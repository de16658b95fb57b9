//! `dsan-bench connect`: connection set-up latency, SAN (through the provider
//! library and both dataplanes) against kernel TCP on the same veth, in one run.
//!
//! One process holds both ends: the client thread attaches to h0's daemon and
//! the server thread to h1's (the provider talks to its daemon over a Unix
//! socket and shared memory, so it needs no network namespace); for kernel
//! TCP each thread enters its host's namespace with setns, so both transports
//! cross the same veth. Times come from one monotonic clock.
#![allow(unsafe_code)] // system calls and shared memory: each block has a SAFETY comment

use anyhow::{anyhow, Context, Result};
use dsan_channel::sys::EventFd;
use dsan_provider::{Decision, Error as SanError, Provider, SanSocket, FD_ACCEPT};
use hdrhistogram::Histogram;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the accepting thread waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptMode {
    /// Sleeps on the eventfd (SAN) or in accept(2) (TCP).
    Blocked,
    /// Polls without sleeping.
    Spinning,
}

impl AcceptMode {
    /// Its name in tables.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            AcceptMode::Blocked => "blocked",
            AcceptMode::Spinning => "spinning",
        }
    }
}

/// Latencies of one run, nanoseconds.
pub(crate) struct Run {
    /// From the connecting call to the client seeing "connected".
    pub(crate) connected: Histogram<u64>,
    /// From the connecting call to the server holding the connection.
    pub(crate) accepted: Histogram<u64>,
    /// Failed attempts.
    pub(crate) errors: u64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds")
}

fn enter_netns(name: &str) -> Result<()> {
    control::os::enter_netns(name).with_context(|| format!("entering namespace {name}"))
}

fn eventfd() -> Result<EventFd> {
    EventFd::new().context("eventfd")
}

/// SAN: `count` connects from h0 to h1:port, one at a time.
pub(crate) fn san(
    sock0: &str,
    sock1: &str,
    port: u16,
    count: u64,
    mode: AcceptMode,
) -> Result<Run> {
    let p0 =
        Provider::attach(Some(sock0.as_ref())).map_err(|e| anyhow!("attach to h0's dsand: {e}"))?;
    let p1 =
        Provider::attach(Some(sock1.as_ref())).map_err(|e| anyhow!("attach to h1's dsand: {e}"))?;
    let l = SanSocket::new(&p1).map_err(|e| anyhow!("{e}"))?;
    l.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| anyhow!("bind: {e}"))?;
    l.listen(64).map_err(|e| anyhow!("listen: {e}"))?;
    let efd = eventfd()?;
    l.event_select(efd.as_fd(), FD_ACCEPT)
        .map_err(|e| anyhow!("event_select: {e}"))?;
    let (tx, rx) = mpsc::channel::<Instant>();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    // The accepting thread waits for the request itself (spinning on
    // accept, or blocked on its FD_ACCEPT eventfd), never for the client's
    // start time: the client sends that before it connects, so it is there
    // when the connection is.
    let server = std::thread::spawn(move || -> Result<Histogram<u64>> {
        let mut h = hist();
        while !done2.load(Ordering::Relaxed) {
            if mode == AcceptMode::Blocked {
                efd.wait(Some(Duration::from_millis(100)));
                let _ = l.enum_network_events();
            }
            match l.accept(|_| Decision::Accept) {
                Ok((c, _)) => {
                    record_accepted(&rx, &mut h)?;
                    drop(c);
                }
                Err(SanError::Again) => std::thread::yield_now(),
                Err(e) => return Err(anyhow!("accept: {e}")),
            }
        }
        Ok(h)
    });
    let mut connected = hist();
    let mut errors = 0;
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), port);
    for _ in 0..count {
        let c = SanSocket::new(&p0).map_err(|e| anyhow!("{e}"))?;
        let t = Instant::now();
        tx.send(t).ok();
        match c.connect(dst) {
            Ok(()) => {
                connected.saturating_record(t.elapsed().as_nanos() as u64);
            }
            Err(_) => errors += 1,
        }
        drop(c);
    }
    done.store(true, Ordering::Relaxed);
    let accepted = server
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
    Ok(Run {
        connected,
        accepted,
        errors,
    })
}

/// Records an accepted connection's latency: from the start time its
/// client sent just before connecting.
fn record_accepted(rx: &mpsc::Receiver<Instant>, h: &mut Histogram<u64>) -> Result<()> {
    let start = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("no start time for an accepted connection"))?;
    h.saturating_record(start.elapsed().as_nanos() as u64);
    Ok(())
}

/// Kernel TCP: `count` connects from h0 to h1:port over the lab's veth.
pub(crate) fn tcp(port: u16, count: u64, mode: AcceptMode) -> Result<Run> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let (tx, rx) = mpsc::channel::<Instant>();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let server = std::thread::spawn(move || -> Result<Histogram<u64>> {
        let setup = (|| -> Result<TcpListener> {
            enter_netns("dsan-h1")?;
            let l = TcpListener::bind(("198.18.0.2", port))?;
            l.set_nonblocking(mode == AcceptMode::Spinning)?;
            // A blocked accept returns every 100 ms to look at `done`.
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: a valid socket and option buffer.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&l),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(l)
        })();
        let l = match setup {
            Ok(l) => {
                ready_tx.send(Ok(())).ok();
                l
            }
            Err(e) => {
                ready_tx.send(Err(anyhow!("{e}"))).ok();
                return Err(e);
            }
        };
        let mut h = hist();
        while !done2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((c, _)) => {
                    record_accepted(&rx, &mut h)?;
                    drop(c);
                }
                // Spinning: nothing yet; blocked: the 100 ms timeout.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if mode == AcceptMode::Spinning {
                        std::thread::yield_now()
                    }
                }
                Err(e) => return Err(anyhow!("accept: {e}")),
            }
        }
        Ok(h)
    });
    ready_rx
        .recv()
        .map_err(|_| anyhow!("server thread died"))??;
    let client = std::thread::spawn(move || -> Result<(Histogram<u64>, u64)> {
        enter_netns("dsan-h0")?;
        let mut connected = hist();
        let mut errors = 0;
        for _ in 0..count {
            let t = Instant::now();
            tx.send(t).ok();
            match TcpStream::connect(("198.18.0.2", port)) {
                Ok(s) => {
                    connected.saturating_record(t.elapsed().as_nanos() as u64);
                    drop(s);
                }
                Err(_) => errors += 1,
            }
        }
        Ok((connected, errors))
    });
    let (connected, errors) = client
        .join()
        .map_err(|_| anyhow!("client thread panicked"))??;
    done.store(true, Ordering::Relaxed);
    let accepted = server
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
    Ok(Run {
        connected,
        accepted,
        errors,
    })
}

/// The provider command round trip: a connect to an address in no SAN
/// subnet is refused by the lcore itself, so its time is library -> ring ->
/// lcore -> completion -> library.
pub(crate) fn command_rtt(sock0: &str, count: u64) -> Result<Histogram<u64>> {
    let p0 = Provider::attach(Some(sock0.as_ref())).map_err(|e| anyhow!("attach: {e}"))?;
    let c = SanSocket::new(&p0).map_err(|e| anyhow!("{e}"))?;
    let dst = SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 9);
    let mut h = hist();
    for _ in 0..count {
        let t = Instant::now();
        let r = c.connect(dst);
        h.saturating_record(t.elapsed().as_nanos() as u64);
        if r != Err(SanError::HostUnreach) {
            return Err(anyhow!("expected EHOSTUNREACH, got {r:?}"));
        }
    }
    Ok(h)
}

/// SAN connects whose accepting side is the switch (`dsan_switch`): the
/// switch's accept thread takes the request and hands the connection to the
/// application thread waiting in `dsan_switch::accept`. The client uses the
/// provider directly, as in [`san`].
pub(crate) fn san_via_switch(sock0: &str, sock1: &str, port: u16, count: u64) -> Result<Run> {
    // The switch attaches to the daemon named by DSAN_SOCKET on first use
    // (and again when that daemon changed).
    std::env::set_var("DSAN_SOCKET", sock1);
    let p0 =
        Provider::attach(Some(sock0.as_ref())).map_err(|e| anyhow!("attach to h0's dsand: {e}"))?;
    let l = dsan_switch::socket().map_err(|e| anyhow!("switch socket: errno {e}"))?;
    dsan_switch::bind(l, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| anyhow!("switch bind: errno {e}"))?;
    let san = dsan_switch::listen(l, 64).map_err(|e| anyhow!("switch listen: errno {e}"))?;
    if !san {
        return Err(anyhow!("the switch did not set up a SAN listener"));
    }
    let (tx, rx) = mpsc::channel::<Instant>();
    let server = std::thread::spawn(move || -> Result<Histogram<u64>> {
        let mut h = hist();
        for _ in 0..count {
            let (c, _) = dsan_switch::accept(l).map_err(|e| anyhow!("switch accept: errno {e}"))?;
            let start = rx.recv().map_err(|_| anyhow!("client gone"))?;
            h.saturating_record(start.elapsed().as_nanos() as u64);
            let _ = dsan_switch::close(c);
        }
        Ok(h)
    });
    let mut connected = hist();
    let mut errors = 0;
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), port);
    for _ in 0..count {
        let c = SanSocket::new(&p0).map_err(|e| anyhow!("{e}"))?;
        let t = Instant::now();
        tx.send(t).ok();
        match c.connect(dst) {
            Ok(()) => connected.saturating_record(t.elapsed().as_nanos() as u64),
            Err(_) => errors += 1,
        }
    }
    let accepted = server
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
    let _ = dsan_switch::close(l);
    Ok(Run {
        connected,
        accepted,
        errors,
    })
}
