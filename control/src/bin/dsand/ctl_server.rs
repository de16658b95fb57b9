//! The control socket: one JSON object per line each way; attachments (the
//! shared region and doorbell handed over with SCM_RIGHTS), event
//! descriptors (handed to the lcore, which owns them), and queries.

use super::bringup::current_addrs;
use super::log;
use control::lcore::{counters_json, Lcore};
use control::os;
use dataplane::dpdk;
use dataplane::node::{AppShared, Command, Counters, PingRequest, TraceAction};
use dataplane::wire::Ipv4;
use dsan_channel::region::{layout, MAX_SOCKETS, REGION_VERSION};
use dsan_channel::sys;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

static NEXT_APP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long the control side waits for the lcore.
const ASK: Duration = Duration::from_secs(5);

/// What a control connection needs from the daemon.
pub(crate) struct Ctx {
    pub(crate) lcore: Lcore,
    pub(crate) info: Arc<Value>,
    pub(crate) port: dpdk::PortStatsReader,
    pub(crate) socket_gid: u32,
    pub(crate) fallbacks: Arc<control::metrics::Fallbacks>,
    /// Open control connections per peer uid.
    pub(crate) conns: Arc<Mutex<HashMap<u32, usize>>>,
    /// Connections refused for exceeding the limits.
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// Requests refused (malformed, descriptors where none belong, an event
    /// descriptor that is not an eventfd, ...) and connections closed for a
    /// line that is too long or a truncated control message.
    pub(crate) bad_requests: std::sync::atomic::AtomicU64,
}

/// How long a control connection that is not an attachment may stay silent.
pub(crate) const IDLE: Duration = Duration::from_secs(60);

/// Control connections one uid may hold open at once.
pub(crate) const MAX_CONNS_PER_UID: usize = 64;
/// Control connections open at once, in all.
pub(crate) const MAX_CONNS: usize = 256;

/// A control connection's place; given back when dropped.
pub(crate) struct Slot {
    conns: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Admits a new control connection if its uid and the daemon are within
/// their limits; otherwise answers it with an error and closes it.
pub(crate) fn admit(conn: &UnixStream, cx: &Ctx) -> Option<Slot> {
    let uid = os::peer_cred(conn.as_raw_fd()).map_or(u32::MAX, |(_, uid, _)| uid);
    {
        let mut m = cx.conns.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().sum();
        let mine = m.get(&uid).copied().unwrap_or(0);
        if total < MAX_CONNS && mine < MAX_CONNS_PER_UID {
            *m.entry(uid).or_insert(0) += 1;
            return Some(Slot {
                conns: cx.conns.clone(),
                uid,
            });
        }
    }
    cx.refused.fetch_add(1, Ordering::Relaxed);
    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
    let msg = json!({"ok": false, "error": format!(
        "too many control connections (at most {MAX_CONNS_PER_UID} per uid, {MAX_CONNS} in all)")});
    let _ = sys::send_line(conn.as_raw_fd(), &msg.to_string(), &[]);
    None
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Serves one control connection until it closes; an attached process is
/// detached then (the lcore releases everything it held).
pub(crate) fn serve_conn(conn: UnixStream, cx: &Ctx) {
    let fd = conn.as_raw_fd();
    let mut app: Option<Arc<AppShared>> = None;
    // A connection that is not an attachment must send a request at least
    // every IDLE (it holds one of the uid's places): an attached process's
    // connection may be silent for ever (it is the attachment).
    let _ = conn.set_read_timeout(Some(IDLE));
    loop {
        let (line, fds) = match sys::recv_line(fd) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(_) => {
                // A line over the limit, a truncated control message: the
                // connection closes, and it shows.
                cx.bad_requests.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut out_fds = Vec::new();
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                let r = match req["cmd"].as_str() {
                    Some("attach") if fds.is_empty() => {
                        let r = attach(fd, cx, &mut app, &mut out_fds);
                        if app.is_some() {
                            let _ = conn.set_read_timeout(None);
                        }
                        r
                    }
                    Some("event_fd") => event_fd(&req, cx, app.as_deref(), fds),
                    Some("life") => life(&req, cx, app.as_deref(), fds),
                    Some("life_key") => life_key(cx, app.as_deref(), fds),
                    Some("trace") if fds.is_empty() => trace(&req, cx, fd),
                    Some("switch_listen_failed") if fds.is_empty() => {
                        // Never silent: the daemon's log says which process
                        // and port, the counter how often.
                        cx.fallbacks.add_listen_failure(req["reason"].as_str());
                        let pid = os::peer_cred(fd).map_or(0, |(pid, _, _)| pid);
                        log(
                            "warn",
                            &format!(
                                "pid {pid}: SAN listen on port {} failed (errno {}, {}): it serves kernel TCP only",
                                req["port"], req["errno"], req["reason"]
                            ),
                        );
                        Ok(json!({"ok": true}))
                    }
                    Some("switch_fallback") if fds.is_empty() => {
                        cx.fallbacks.add(req["reason"].as_str());
                        Ok(json!({"ok": true}))
                    }
                    _ if !fds.is_empty() => Err(
                        "descriptors are accepted only with \"event_fd\", \"life\" and \"life_key\""
                            .to_string(),
                    ),
                    Some("ping") if fds.is_empty() => ping(&req, cx, fd),
                    _ => handle_request(&req, cx),
                };
                r.unwrap_or_else(|e| {
                    cx.bad_requests.fetch_add(1, Ordering::Relaxed);
                    json!({"ok": false, "error": e})
                })
            }
            Err(e) => {
                cx.bad_requests.fetch_add(1, Ordering::Relaxed);
                json!({"ok": false, "error": format!("malformed request (expected one JSON object per line): {e}")})
            }
        };
        if sys::send_line(fd, &reply.to_string(), &out_fds).is_err() {
            break;
        }
    }
    // The process went away (or detached): release what it held.
    if let Some(app) = app {
        let detached = cx.lcore.ask(|tx| Command::Detach(app.id, tx), ASK);
        cx.lcore.engine.doorbell.unwatch(app.bell.as_raw_fd());
        // Its notifier ends with it, also when the process left it blocked
        // in a write on an eventfd it made blocking and filled.
        if let Some(n) = app.notifier.get() {
            n.shutdown();
            if !n.reap(Duration::from_secs(1)) {
                log(
                    "warn",
                    &format!("the notifier of pid {} did not end", app.pid),
                );
            }
        }
        if detached.is_err() {
            log(
                "warn",
                &format!("dataplane did not confirm the detach of pid {}", app.pid),
            );
            return;
        }
        log("info", &format!("detached pid {}", app.pid));
    }
}

fn attach(
    fd: i32,
    cx: &Ctx,
    app: &mut Option<Arc<AppShared>>,
    out_fds: &mut Vec<i32>,
) -> Result<Value, String> {
    if app.is_some() {
        return Err("this connection is already attached".into());
    }
    let (pid, uid, gid) =
        os::peer_cred(fd).map_err(|e| format!("cannot read peer credentials: {e}"))?;
    // The socket's group counts as a supplementary group too (as the
    // socket file's permissions count it).
    let in_group =
        gid == cx.socket_gid || os::peer_groups(fd).is_ok_and(|g| g.contains(&cx.socket_gid));
    if uid != 0 && uid != os::euid() && !in_group {
        return Err(format!(
            "uid {uid} may not attach (root, the daemon's user or the socket's group only)"
        ));
    }
    let id = NEXT_APP.fetch_add(1, Ordering::Relaxed);
    // What the lcore needs to know about it, read here (never on the lcore):
    // whether it may bind ports below 1024, and its parent (a forked worker
    // takes its parent's listener over).
    let (low_ports, lineage) = os::peer_lineage(fd, pid);
    let (a, cmds) = AppShared::new_as(id, pid, uid, uid == 0 || low_ports, lineage)
        .map_err(|e| format!("cannot create the shared region: {e}"))?;
    let doorbell = &cx.lcore.engine.doorbell;
    doorbell
        .watch(a.bell.as_raw_fd())
        .map_err(|e| format!("cannot watch the process's doorbell: {e}"))?;
    if let Err(e) = cx.lcore.tell(Command::Attach(a.clone(), cmds), ASK) {
        doorbell.unwatch(a.bell.as_raw_fd());
        return Err(err(e));
    }
    out_fds.push(a.region.fd());
    out_fds.push(doorbell.page_fd());
    out_fds.push(a.bell.as_raw_fd());
    log("info", &format!("attached pid {pid} uid {uid} as app {id}"));
    *app = Some(a);
    Ok(
        json!({"ok": true, "app": id, "region_size": layout::size(), "version": REGION_VERSION, "san_addrs": current_addrs(&cx.lcore.node),
              "fds": ["region", "doorbell_page", "bell"]}),
    )
}

/// The attachment and the request's `"sock"` (in range) of a request that
/// registers descriptors for a socket.
fn socket_of<'a>(req: &Value, app: Option<&'a AppShared>) -> Result<(&'a AppShared, u32), String> {
    let app = app.ok_or("attach first")?;
    let sock = req["sock"]
        .as_u64()
        .filter(|s| (*s as usize) < MAX_SOCKETS)
        .ok_or("\"sock\" out of range")? as u32;
    Ok((app, sock))
}

/// The reply to a registration the lcore did (or refused with an errno).
fn registered(r: Result<(), i32>, app: &AppShared) -> Result<Value, String> {
    match r {
        Ok(()) => Ok(json!({"ok": true})),
        Err(libc::EMFILE) => Err(format!(
            "EMFILE: user {}'s share of the daemon's event descriptors is used up",
            app.uid
        )),
        Err(libc::ENOTCONN) => Err("that socket holds no connection".into()),
        Err(_) => Err("this process is no longer attached".into()),
    }
}

/// `{"cmd":"event_fd","sock":N}` with one eventfd attached: the event
/// descriptor of socket N, handed to the lcore (which owns and closes it).
/// With two descriptors, the second is the one FD_WRITE signals instead.
fn event_fd(
    req: &Value,
    cx: &Ctx,
    app: Option<&AppShared>,
    mut fds: Vec<OwnedFd>,
) -> Result<Value, String> {
    let (app, sock) = socket_of(req, app)?;
    // One descriptor, or two: the event descriptor and the FD_WRITE one.
    if fds.is_empty() || fds.len() > 2 {
        return Err(
            "\"event_fd\" carries one descriptor (or two: the event and the FD_WRITE descriptor)"
                .into(),
        );
    }
    if fds.iter().any(|f| !sys::is_eventfd(f.as_raw_fd())) {
        return Err("the event descriptor must be an eventfd".into());
    }
    let wfd = (fds.len() == 2).then(|| fds.pop().expect("two"));
    let fd = fds.pop().expect("one");
    // The process's notifier thread (it writes the eventfds for the lcore),
    // started with its first event descriptor.
    if app.notifier.get().is_none() {
        let n = dataplane::node::Notifier::start(app.pid)
            .map_err(|e| format!("cannot start a notifier: {e}"))?;
        if let Err(n) = app.notifier.set(n) {
            n.shutdown(); // another connection of the process was first
        }
    }
    let r = cx
        .lcore
        .ask(
            |done| Command::EventFd {
                app: app.id,
                sock,
                fd,
                wfd,
                done,
            },
            ASK,
        )
        .map_err(err)?;
    registered(r, app)
}

/// `{"cmd":"life","sock":N}` with the read end of a pipe attached: the
/// life of socket N's connection (its process holds the write end beside
/// the socket, and so does every process that inherits it), handed to the
/// lcore (`dataplane::node::handover`).
fn life(
    req: &Value,
    cx: &Ctx,
    app: Option<&AppShared>,
    mut fds: Vec<OwnedFd>,
) -> Result<Value, String> {
    let (app, sock) = socket_of(req, app)?;
    if fds.len() != 1 || !sys::is_pipe(fds[0].as_raw_fd()) {
        return Err("\"life\" carries one descriptor: the read end of a pipe".into());
    }
    let fd = fds.pop().expect("one");
    let r = cx
        .lcore
        .ask(
            |done| Command::Life {
                app: app.id,
                sock,
                fd,
                done,
            },
            ASK,
        )
        .map_err(err)?;
    registered(r, app)
}

/// `{"cmd":"life_key"}` with the write end of a connection's life
/// attached (a socket received in an `SCM_RIGHTS` message came with it):
/// the connection's claim key, `{"ok":true,"key":K}`, for the process to
/// claim it with (`dataplane::node::handover`). The descriptor is the
/// proof of holding the connection; it is closed here at once.
fn life_key(cx: &Ctx, app: Option<&AppShared>, fds: Vec<OwnedFd>) -> Result<Value, String> {
    let app = app.ok_or("attach first")?;
    let ino = match fds.as_slice() {
        [fd] => sys::pipe_inode(fd.as_raw_fd()),
        _ => None,
    }
    .ok_or("\"life_key\" carries one descriptor: the write end of a connection's life")?;
    drop(fds);
    let r = cx
        .lcore
        .ask(
            |done| Command::LifeKey {
                app: app.id,
                ino,
                done,
            },
            ASK,
        )
        .map_err(err)?;
    match r {
        Ok(key) => Ok(json!({"ok": true, "key": key})),
        Err(libc::EACCES) => Err("EACCES: another user's connection".into()),
        Err(libc::ENOTCONN) => Err("no connection has that life (it ended)".into()),
        Err(_) => Err("this process is no longer attached".into()),
    }
}

/// `{"cmd":"trace","action":"start"|"stop"}`: connection-setup tracing
/// (for dsan-bench's latency breakdown). Only root or the daemon's own user
/// may trace: the stamps name every connection the host sets up.
fn trace(req: &Value, cx: &Ctx, fd: std::os::fd::RawFd) -> Result<Value, String> {
    let uid = os::peer_cred(fd).map_or(u32::MAX, |(_, uid, _)| uid);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != 0 && uid != me {
        return Err("tracing is for root and the daemon's user".into());
    }
    let action = match req["action"].as_str() {
        Some("start") => TraceAction::Start,
        Some("stop") => TraceAction::Stop,
        _ => return Err("trace: \"action\" must be \"start\" or \"stop\"".into()),
    };
    let (events, dropped) = cx
        .lcore
        .ask(|tx| Command::Trace(action, tx), ASK)
        .map_err(err)?;
    let list: Vec<Value> = events
        .iter()
        .map(|e| json!([e.conn_id.to_string(), e.hop.name(), e.t_ns]))
        .collect();
    Ok(json!({"ok": true, "events": list, "dropped": dropped, "clock": "CLOCK_MONOTONIC ns"}))
}

/// Whether the peer of control connection `fd` has gone (hung up or shut
/// down its side), without reading from it.
fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// `ping`: echo probes through the dataplane. Bounded in count and length
/// (`control::ctl::ping_budget`), and cancelled as soon as its requester
/// disconnects, so that an abandoned ping never holds up the next one.
fn ping(req: &Value, cx: &Ctx, fd: std::os::fd::RawFd) -> Result<Value, String> {
    let dst: Ipv4 = req["dst"]
        .as_str()
        .ok_or("ping needs \"dst\": a SAN IPv4 address")?
        .parse()
        .map_err(|_| "\"dst\" is not an IPv4 address")?;
    let count = req["count"].as_u64().unwrap_or(1);
    let interval_us = req["interval_us"].as_u64().unwrap_or(0);
    let timeout_ms = req["timeout_ms"].as_u64().unwrap_or(1000);
    let wait = control::ctl::ping_budget(count, interval_us, timeout_ms)?;
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reply, rx) = std::sync::mpsc::channel();
    cx.lcore
        .tell(
            Command::Ping(PingRequest {
                dst,
                count: count as u32,
                interval: Duration::from_micros(interval_us),
                timeout: Duration::from_millis(timeout_ms),
                reply,
                cancel: cancel.clone(),
            }),
            ASK,
        )
        .map_err(err)?;
    let deadline = std::time::Instant::now() + wait;
    let r = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the dataplane dropped the probe".into())
            }
            Err(_) => {}
        }
        if peer_gone(fd) || std::time::Instant::now() >= deadline {
            cancel.store(true, Ordering::Relaxed);
            cx.lcore.engine.doorbell.ring();
            return Err("ping cancelled (requester gone or budget spent)".into());
        }
    };
    Ok(
        json!({"ok": true, "dst": dst.to_string(), "mac": r.mac.map(|m| m.to_string()), "resolve_ns": r.resolve_ns,
              "sent": r.sent, "received": r.received, "rtt_ns": r.rtt_ns}),
    )
}

fn handle_request(req: &Value, cx: &Ctx) -> Result<Value, String> {
    let (shared, node) = (&cx.lcore.engine, &cx.lcore.node);
    match req["cmd"].as_str() {
        Some("status") => {
            let s = &shared.stats;
            let n: Counters = cx.lcore.counters();
            let j = counters_json(&n, s);
            let ps = cx.port.stats().ok();
            let mut v = (*cx.info).clone();
            v["ok"] = json!(true);
            v["san_addrs"] = json!(current_addrs(node));
            v["lcore_stats"] = json!({
                "rx_frames": s.rx_frames.load(Ordering::Relaxed), "tx_frames": s.tx_frames.load(Ordering::Relaxed),
                "tx_dropped": s.tx_dropped.load(Ordering::Relaxed), "alloc_failed": s.alloc_failed.load(Ordering::Relaxed),
                "busy_polls": s.busy_polls.load(Ordering::Relaxed), "idle_polls": s.idle_polls.load(Ordering::Relaxed),
                "sleeps": s.sleeps.load(Ordering::Relaxed), "wake_sleeps": s.wake_sleeps.load(Ordering::Relaxed),
                "sleeping": shared.doorbell.is_sleeping(),
            });
            v["frames_received"] = j["frames_received"].clone();
            v["frames_sent"] = j["frames_sent"].clone();
            v["drops"] = j["drops"].clone();
            if let Some(ps) = ps {
                v["port_stats"] = json!({"ipackets": ps.ipackets, "opackets": ps.opackets, "imissed": ps.imissed, "ierrors": ps.ierrors, "oerrors": ps.oerrors, "rx_nombuf": ps.rx_nombuf});
            }
            Ok(v)
        }
        Some("subnets") => Ok(json!({"ok": true, "san_addrs": current_addrs(node)})),
        Some("listeners") => {
            let v = cx.lcore.listeners(ASK).map_err(err)?;
            let list: Vec<Value> = v
                .iter()
                .map(|l| json!({"address": l.ip.to_string(), "port": l.port, "pid": l.pid, "backlog_capacity": l.capacity, "backlog_depth": l.depth, "accepted_waiting": l.accepted_waiting}))
                .collect();
            Ok(json!({"ok": true, "listeners": list}))
        }
        Some("connections") => {
            let v = cx.lcore.connections(ASK).map_err(err)?;
            let list: Vec<Value> = v
                .iter()
                .map(|c| json!({"role": c.role, "local": format!("{}:{}", c.local.0, c.local.1), "peer": format!("{}:{}", c.peer.0, c.peer.1), "pid": c.pid, "program": program(c.pid), "closing": c.closing}))
                .collect();
            Ok(json!({"ok": true, "connections": list}))
        }
        Some("stats") => {
            let mut v = counters_json(&cx.lcore.counters(), &shared.stats);
            v["ok"] = json!(true);
            v["control_connections_refused"] = json!(cx.refused.load(Ordering::Relaxed));
            v["control_requests_refused"] = json!(cx.bad_requests.load(Ordering::Relaxed));
            Ok(v)
        }
        Some(other) => Err(format!(
            "unknown command {other:?} (known: status, stats, ping, listeners, connections, attach, event_fd)"
        )),
        None => Err("request has no \"cmd\"".into()),
    }
}

/// The name of process `pid` (its `comm`), empty if it is gone.
fn program(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}
