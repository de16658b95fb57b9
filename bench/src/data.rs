//! `dsan-bench data`: byte streams, SAN against kernel TCP between the same
//! two lab hosts in one run, as netperf and iperf3 measure them:
//!
//! * `pingpong` (netperf TCP_RR): one connection, a request of `size` bytes
//!   and a response of the same size, one at a time; the latency of each;
//! * `stream` (iperf3): one connection, one direction, as fast as it goes;
//!   Gbit/s from the first byte sent to the last byte received;
//! * `crr` (netperf TCP_CRR, HTTP/1.0): connect, a 64-byte request and
//!   response, close; transactions per second and the latency of each.
//!
//! One process holds both ends (as `connect`): the SAN client attaches to
//! h0's daemon and the server to h1's; for TCP each thread enters its
//! host's namespace, so both transports cross the same veth. TCP sockets set
//! TCP_NODELAY (as netperf's RR tests do).

use anyhow::{anyhow, Context, Result};
use dsan_provider::{Decision, Provider, SanSocket};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

fn enter(ns: &str) -> Result<()> {
    control::os::enter_netns(ns).with_context(|| format!("entering {ns}"))
}

const H1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// What a run measured.
pub(crate) struct Res {
    /// Latency per exchange (pingpong, crr), ns.
    pub(crate) lat: Histogram<u64>,
    /// Bytes moved one way (stream) or exchanges (pingpong, crr).
    pub(crate) units: u64,
    /// Wall time of the measured part.
    pub(crate) elapsed: Duration,
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |err| anyhow!("{what}: {err}")
}

/// The SAN's two providers (client on h0, server on h1).
pub(crate) struct San {
    p0: Arc<Provider>,
    p1: Arc<Provider>,
}

impl San {
    /// Over providers attached already (client side on h0, server on h1).
    pub(crate) fn new(p0: Arc<Provider>, p1: Arc<Provider>) -> San {
        San { p0, p1 }
    }

    pub(crate) fn attach(s0: &str, s1: &str) -> Result<San> {
        Ok(San {
            p0: Provider::attach(Some(s0.as_ref())).map_err(e("attach h0"))?,
            p1: Provider::attach(Some(s1.as_ref())).map_err(e("attach h1"))?,
        })
    }

    fn listen(&self, port: u16) -> Result<SanSocket> {
        let l = SanSocket::new(&self.p1).map_err(e("socket"))?;
        l.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(e("bind"))?;
        l.listen(256).map_err(e("listen"))?;
        Ok(l)
    }

    fn connect(&self, port: u16) -> Result<SanSocket> {
        let c = SanSocket::new(&self.p0).map_err(e("socket"))?;
        c.connect(SocketAddrV4::new(H1, port))
            .map_err(e("connect"))?;
        Ok(c)
    }

    /// Request/response of `size` bytes, `count` times.
    pub(crate) fn pingpong(&self, port: u16, size: usize, count: u64) -> Result<Res> {
        let l = self.listen(port)?;
        let server = server_thread(move || -> Result<()> {
            let (c, _) = l.accept(|_| Decision::Accept).map_err(e("accept"))?;
            let mut b = vec![0u8; size];
            while c.recv_exact(&mut b).map_err(e("recv"))? {
                c.send_all(&b).map_err(e("send"))?;
            }
            Ok(())
        });
        let c = self.connect(port)?;
        let mut b = vec![7u8; size];
        let mut lat = hist();
        let t0 = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            c.send_all(&b).map_err(e("send"))?;
            if !c.recv_exact(&mut b).map_err(e("recv"))? {
                return Err(anyhow!("server closed"));
            }
            lat.saturating_record(t.elapsed().as_nanos() as u64);
        }
        let elapsed = t0.elapsed();
        c.shutdown(libc::SHUT_WR).map_err(e("shutdown"))?;
        server.join().map_err(|_| anyhow!("server panicked"))??;
        Ok(Res {
            lat,
            units: count,
            elapsed,
        })
    }

    /// `bytes` one way, h0 -> h1.
    pub(crate) fn stream(&self, port: u16, bytes: u64) -> Result<Res> {
        let l = self.listen(port)?;
        let (tx, rx) = mpsc::channel();
        let server = server_thread(move || -> Result<()> {
            let (c, _) = l.accept(|_| Decision::Accept).map_err(e("accept"))?;
            let mut b = vec![0u8; 1 << 16];
            let mut got = 0u64;
            loop {
                match c.recv(&mut b, 0).map_err(e("recv"))? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            tx.send((Instant::now(), got)).ok();
            Ok(())
        });
        let c = self.connect(port)?;
        let b = vec![1u8; 1 << 16];
        let mut lat = hist();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(b.len() as u64) as usize;
            let t = Instant::now();
            c.send_all(&b[..n]).map_err(e("send"))?;
            lat.saturating_record(t.elapsed().as_nanos() as u64);
            sent += n as u64;
        }
        c.shutdown(libc::SHUT_WR).map_err(e("shutdown"))?;
        let (t1, got) = rx
            .recv_timeout(Duration::from_secs(300))
            .map_err(|_| anyhow!("receiver did not finish"))?;
        server.join().map_err(|_| anyhow!("server panicked"))??;
        if got != bytes {
            return Err(anyhow!("received {got} of {bytes} bytes"));
        }
        Ok(Res {
            lat,
            units: bytes,
            elapsed: t1 - t0,
        })
    }

    /// Connect, 64-byte request and response, close; `count` times.
    pub(crate) fn crr(&self, port: u16, count: u64) -> Result<Res> {
        let l = self.listen(port)?;
        let server = server_thread(move || -> Result<()> {
            for _ in 0..count {
                let (c, _) = l.accept(|_| Decision::Accept).map_err(e("accept"))?;
                let mut b = [0u8; 64];
                if c.recv_exact(&mut b).map_err(e("recv"))? {
                    c.send_all(&b).map_err(e("send"))?;
                }
                // Read the client's close, then close (no unread bytes: no reset).
                let _ = c.recv(&mut b, 0);
            }
            Ok(())
        });
        let mut lat = hist();
        let t0 = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let c = self.connect(port)?;
            let mut b = [3u8; 64];
            c.send_all(&b).map_err(e("send"))?;
            if !c.recv_exact(&mut b).map_err(e("recv"))? {
                return Err(anyhow!("server closed early"));
            }
            drop(c);
            lat.saturating_record(t.elapsed().as_nanos() as u64);
        }
        let elapsed = t0.elapsed();
        server.join().map_err(|_| anyhow!("server panicked"))??;
        Ok(Res {
            lat,
            units: count,
            elapsed,
        })
    }
}

/// A server thread: its CPU time counts in the `server` class.
fn server_thread(
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let r = f();
        crate::cpu::server_thread_done();
        r
    })
}

fn tcp_server<F>(port: u16, f: F) -> Result<std::thread::JoinHandle<Result<()>>>
where
    F: FnOnce(TcpListener) -> Result<()> + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let t = server_thread(move || -> Result<()> {
        let l = (|| -> Result<TcpListener> {
            enter("dsan-h1")?;
            Ok(TcpListener::bind(("198.18.0.2", port))?)
        })();
        match l {
            Ok(l) => {
                ready_tx.send(Ok(())).ok();
                f(l)
            }
            Err(err) => {
                ready_tx.send(Err(anyhow!("{err}"))).ok();
                Err(err)
            }
        }
    });
    ready_rx
        .recv()
        .map_err(|_| anyhow!("server thread died"))??;
    Ok(t)
}

/// Runs `f` on a thread inside h0's namespace.
fn in_h0<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        enter("dsan-h0")?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("client thread panicked"))?
}

fn tcp_connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect(("198.18.0.2", port))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Kernel TCP pingpong.
pub(crate) fn tcp_pingpong(port: u16, size: usize, count: u64) -> Result<Res> {
    let server = tcp_server(port, move |l| {
        let (mut c, _) = l.accept()?;
        c.set_nodelay(true)?;
        let mut b = vec![0u8; size];
        while c.read_exact(&mut b).is_ok() {
            c.write_all(&b)?;
        }
        Ok(())
    })?;
    let r = in_h0(move || {
        let mut c = tcp_connect(port)?;
        let mut b = vec![7u8; size];
        let mut lat = hist();
        let t0 = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            lat.saturating_record(t.elapsed().as_nanos() as u64);
        }
        Ok(Res {
            lat,
            units: count,
            elapsed: t0.elapsed(),
        })
    })?;
    server.join().map_err(|_| anyhow!("server panicked"))??;
    Ok(r)
}

/// Kernel TCP one-way stream.
pub(crate) fn tcp_stream(port: u16, bytes: u64) -> Result<Res> {
    let (tx, rx) = mpsc::channel();
    let server = tcp_server(port, move |l| {
        let (mut c, _) = l.accept()?;
        let mut b = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            match c.read(&mut b)? {
                0 => break,
                n => got += n as u64,
            }
        }
        tx.send((Instant::now(), got)).ok();
        Ok(())
    })?;
    let (t0, lat) = in_h0(move || {
        let mut c = tcp_connect(port)?;
        let b = vec![1u8; 1 << 16];
        let mut lat = hist();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(b.len() as u64) as usize;
            let t = Instant::now();
            c.write_all(&b[..n])?;
            lat.saturating_record(t.elapsed().as_nanos() as u64);
            sent += n as u64;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        Ok((t0, lat))
    })?;
    let (t1, got) = rx
        .recv_timeout(Duration::from_secs(300))
        .map_err(|_| anyhow!("receiver did not finish"))?;
    server.join().map_err(|_| anyhow!("server panicked"))??;
    if got != bytes {
        return Err(anyhow!("received {got} of {bytes} bytes"));
    }
    Ok(Res {
        lat,
        units: bytes,
        elapsed: t1 - t0,
    })
}

/// Kernel TCP connect-request-response-close.
pub(crate) fn tcp_crr(port: u16, count: u64) -> Result<Res> {
    let server = tcp_server(port, move |l| {
        for _ in 0..count {
            let (mut c, _) = l.accept()?;
            c.set_nodelay(true)?;
            let mut b = [0u8; 64];
            if c.read_exact(&mut b).is_ok() {
                c.write_all(&b)?;
            }
            let _ = c.read(&mut b);
        }
        Ok(())
    })?;
    let r = in_h0(move || {
        let mut lat = hist();
        let t0 = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let mut c = tcp_connect(port)?;
            let mut b = [3u8; 64];
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            drop(c);
            lat.saturating_record(t.elapsed().as_nanos() as u64);
        }
        Ok(Res {
            lat,
            units: count,
            elapsed: t0.elapsed(),
        })
    })?;
    server.join().map_err(|_| anyhow!("server panicked"))??;
    Ok(r)
}
