//! The latency breakdown of a SAN connect and of a refusal, hop by hop.
//!
//! Both lab daemons trace connection setups (`{"cmd":"trace"}` on their
//! control sockets: each hop stamped with CLOCK_MONOTONIC and the wire
//! connection id); the client (the switch, attached to h0) and the
//! accepting thread (the provider, attached to h1) stamp their own hops with
//! the same clock. Connects run one at a time, so each one's stamps are
//! found by time window: the daemons' stamps of connection `id` between the
//! call and its return, the accepting thread's stamp between the request's
//! queueing and the decision. A connect whose stamps do not line up (lost,
//! failed) is counted and left out.

use anyhow::{anyhow, bail, Result};
use dsan_channel::sys::{monotonic_ns, EventFd};
use dsan_provider::{Decision, Provider, SanSocket, FD_ACCEPT};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::lab;

const H1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// One hop's name and latencies (nanoseconds).
pub(crate) struct HopRow {
    pub(crate) name: &'static str,
    pub(crate) hist: Histogram<u64>,
}

/// A breakdown: the hops in order, then the total.
pub(crate) struct Breakdown {
    pub(crate) scenario: &'static str,
    pub(crate) accept: &'static str,
    pub(crate) hops: Vec<HopRow>,
    pub(crate) total: Histogram<u64>,
    /// Connects whose stamps did not line up.
    pub(crate) unmatched: u64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds")
}

fn trace(host: &str, action: &str) -> Result<Value> {
    control::ctl::request(
        &lab::socket_of(host),
        &json!({"cmd": "trace", "action": action}),
        Duration::from_secs(10),
    )
    .map_err(|e| anyhow!("trace {action} on {host}: {e}"))
}

/// conn id -> hop name -> stamp.
type Stamps = HashMap<u64, HashMap<String, u64>>;

fn stamps(v: &Value) -> Result<Stamps> {
    let mut m: Stamps = HashMap::new();
    for e in v["events"].as_array().ok_or_else(|| anyhow!("no events"))? {
        let id: u64 = e[0].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        let hop = e[1].as_str().unwrap_or("").to_string();
        let t = e[2].as_u64().unwrap_or(0);
        m.entry(id).or_default().insert(hop, t);
    }
    Ok(m)
}

/// The accepting side: a SAN listener on h1, its thread spinning or waiting
/// on its eventfd, stamping when its condition function sees a request.
struct Acceptor {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Acceptor {
    fn start(p1: &Arc<Provider>, port: u16, waiting: bool) -> Result<Acceptor> {
        let l = SanSocket::new(p1).map_err(|e| anyhow!("{e}"))?;
        l.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(|e| anyhow!("bind: {e}"))?;
        l.listen(128).map_err(|e| anyhow!("listen: {e}"))?;
        let efd = EventFd::new().map_err(|e| anyhow!("eventfd: {e}"))?;
        l.event_select(efd.as_fd(), FD_ACCEPT)
            .map_err(|e| anyhow!("event_select: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, sn) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            while !st.load(Ordering::Relaxed) {
                if waiting {
                    efd.wait(Some(Duration::from_millis(50)));
                    let _ = l.enum_network_events();
                }
                let r = l.accept(|_| {
                    sn.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(monotonic_ns());
                    Decision::Accept
                });
                match r {
                    Ok((c, _)) => drop(c),
                    Err(dsan_provider::Error::Again) => std::thread::yield_now(),
                    Err(e) => bail!("accept: {e}"),
                }
            }
            Ok(())
        });
        Ok(Acceptor {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow!("acceptor panicked"))??;
        let v = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(v)
    }
}

/// `n` switch connects to `port` on h1, each stamped at the call and the
/// return: (call, return, connected).
fn connects(n: u64, port: u16) -> Vec<(u64, u64, bool)> {
    (0..n)
        .map(|_| {
            let Ok(s) = dsan_switch::socket() else {
                return (0, 0, false);
            };
            let t0 = monotonic_ns();
            let r = dsan_switch::connect(s, SocketAddrV4::new(H1, port));
            let t1 = monotonic_ns();
            let _ = dsan_switch::close(s);
            (t0, t1, r.is_ok())
        })
        .collect()
}

/// `n` connects with both daemons tracing, and what the traces say.
struct Traced {
    /// (call, return, connected) of each connect.
    calls: Vec<(u64, u64, bool)>,
    h0: Stamps,
    h1: Stamps,
    /// h0's client commands by time.
    cmds: Vec<(u64, u64)>,
}

fn traced_connects(n: u64, port: u16) -> Result<Traced> {
    trace("h0", "start")?;
    trace("h1", "start")?;
    let calls = connects(n, port);
    let (v0, v1) = (trace("h0", "stop")?, trace("h1", "stop")?);
    let (h0, h1) = (stamps(&v0)?, stamps(&v1)?);
    let cmds = commands(&h0);
    Ok(Traced {
        calls,
        h0,
        h1,
        cmds,
    })
}

/// The client commands of h0's trace, by time: (stamp, conn id).
fn commands(h0: &Stamps) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = h0
        .iter()
        .filter_map(|(id, s)| s.get("client_command").map(|&t| (t, *id)))
        .collect();
    v.sort_unstable();
    v
}

/// The connect made in `[t0, t1]`: the one whose client command falls in
/// the window (connects run one at a time).
fn find(cmds: &[(u64, u64)], t0: u64, t1: u64) -> Option<u64> {
    let i = cmds.partition_point(|&(t, _)| t < t0);
    cmds.get(i).filter(|&&(t, _)| t <= t1).map(|&(_, id)| id)
}

/// Records each call's hops (the differences between its consecutive
/// stamps, from `line`; None leaves the call out) under `names`.
fn tally(
    scenario: &'static str,
    accept: &'static str,
    names: &[&'static str],
    calls: &[(u64, u64, bool)],
    line: impl Fn(u64, u64, bool) -> Option<Vec<u64>>,
) -> Breakdown {
    let mut hops: Vec<HopRow> = names
        .iter()
        .map(|&name| HopRow { name, hist: hist() })
        .collect();
    let mut total = hist();
    let mut unmatched = 0;
    for &(t0, t1, ok) in calls {
        match line(t0, t1, ok).filter(|p| p.windows(2).all(|w| w[0] <= w[1])) {
            Some(pts) => {
                for (i, w) in pts.windows(2).enumerate() {
                    hops[i].hist.saturating_record(w[1] - w[0]);
                }
                total.saturating_record(t1 - t0);
            }
            None => unmatched += 1,
        }
    }
    Breakdown {
        scenario,
        accept,
        hops,
        total,
        unmatched,
    }
}

/// Measures `n` connects into an accepting listener (`waiting`: its thread
/// sleeps on its eventfd; else it spins).
pub(crate) fn connect(p1: &Arc<Provider>, port: u16, n: u64, waiting: bool) -> Result<Breakdown> {
    let acc = Acceptor::start(p1, port, waiting)?;
    let traced = traced_connects(n, port);
    let seen = acc.finish()?;
    let Traced {
        calls,
        h0,
        h1,
        cmds,
    } = traced?;
    const HOPS: [&str; 10] = [
        "call -> h0 lcore takes the command",
        "h0 core: command -> request frame",
        "wire: request frame h0 -> h1",
        "h1 core: request -> backlog, FD_ACCEPT",
        "h1 -> accepting thread sees it",
        "accepting thread -> h1 lcore takes the decision",
        "h1 core: decision -> accept frame",
        "wire: accept frame h1 -> h0",
        "h0 core: accept -> completion posted",
        "h0 -> the call returns",
    ];
    let accept = if waiting { "waiting" } else { "spinning" };
    Ok(tally("connect", accept, &HOPS, &calls, |t0, t1, ok| {
        if !ok {
            return None;
        }
        let id = find(&cmds, t0, t1)?;
        let (a, b) = (h0.get(&id)?, h1.get(&id)?);
        let queued = *b.get("queued")?;
        let decided = *b.get("decision_seen")?;
        let seen_at = *seen.iter().find(|&&t| t >= queued && t <= decided)?;
        Some(vec![
            t0,
            *a.get("client_command")?,
            *a.get("request_sent")?,
            *b.get("request_received")?,
            queued,
            seen_at,
            decided,
            *b.get("accept_sent")?,
            *a.get("accept_received")?,
            *a.get("completed")?,
            t1,
        ])
    }))
}

/// Measures `n` connects to a port nobody listens on (h1 refuses).
pub(crate) fn no_listener(port: u16, n: u64) -> Result<Breakdown> {
    let Traced {
        calls,
        h0,
        h1,
        cmds,
    } = traced_connects(n, port)?;
    const HOPS: [&str; 7] = [
        "call -> h0 lcore takes the command",
        "h0 core: command -> request frame",
        "wire: request frame h0 -> h1",
        "h1 core: request -> reject frame",
        "wire: reject frame h1 -> h0",
        "h0 core: reject -> completion posted",
        "h0 -> the call returns",
    ];
    Ok(tally("no-listener", "-", &HOPS, &calls, |t0, t1, ok| {
        if ok {
            return None; // connected: nothing to break down
        }
        let id = find(&cmds, t0, t1)?;
        let (a, b) = (h0.get(&id)?, h1.get(&id)?);
        Some(vec![
            t0,
            *a.get("client_command")?,
            *a.get("request_sent")?,
            *b.get("request_received")?,
            *b.get("reject_sent")?,
            *a.get("reject_received")?,
            *a.get("completed")?,
            t1,
        ])
    }))
}
