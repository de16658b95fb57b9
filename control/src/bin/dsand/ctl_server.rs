//! The control socket: the applications' typed requests
//! (`dsan_channel::ctl`: attachments, the shared region and doorbell handed
//! over with SCM_RIGHTS; event descriptors and lives, handed to the lcore,
//! which owns them) and the operator's JSON lines (queries, ping, trace).
#![allow(unsafe_code)] // geteuid and a zero-wait poll: each block with a SAFETY comment

use super::log;
use control::lcore::{counters_json, Lcore};
use control::os;
use dataplane::dpdk;
use dataplane::node::{AppShared, Command, Counters, NodeHandle, PingRequest, TraceAction};
use dataplane::proto::Subnet;
use dataplane::wire::Ipv4;
use dsan_channel::ctl::{self, Reply};
use dsan_channel::region::{layout, MAX_SOCKETS, REGION_VERSION};
use dsan_channel::sys::{self, Received};
use dsan_channel::wake;
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
        let (msg, fds) = match sys::recv_message(fd) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(_) => {
                // A line over the limit, a truncated control message: the
                // connection closes, and it shows.
                cx.bad_requests.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        let sent = match msg {
            Received::Typed(b) => {
                let mut out_fds = Vec::new();
                let reply = match ctl::Request::parse(&b) {
                    Ok(req) => serve_typed(req, fd, cx, &mut app, fds, &mut out_fds),
                    Err(e) => Err((libc::EINVAL, format!("malformed request: {e}"))),
                };
                let reply = reply.unwrap_or_else(|(errno, message)| {
                    cx.bad_requests.fetch_add(1, Ordering::Relaxed);
                    out_fds.clear();
                    Reply::Refused { errno, message }
                });
                if matches!(reply, Reply::Attached { .. }) {
                    // An attached process's connection may be silent for ever.
                    let _ = conn.set_read_timeout(None);
                }
                sys::send_typed(fd, reply.emit(), &out_fds)
            }
            Received::Line(line) if line.trim().is_empty() => continue,
            Received::Line(line) => {
                let reply = serve_line(&line, fd, cx, &fds);
                sys::send_line(fd, &reply.to_string(), &[])
            }
        };
        if sent.is_err() {
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

/// A refusal: the errno the library returns and a message for people.
type Refusal = (i32, String);

fn refuse(errno: i32) -> impl Fn(String) -> Refusal {
    move |m| (errno, m)
}

/// One typed request of an application (`dsan_channel::ctl`).
fn serve_typed(
    req: ctl::Request,
    fd: i32,
    cx: &Ctx,
    app: &mut Option<Arc<AppShared>>,
    fds: Vec<OwnedFd>,
    out_fds: &mut Vec<i32>,
) -> Result<Reply, Refusal> {
    let (fewest, most) = req.descriptors();
    if fds.len() < fewest || fds.len() > most {
        return Err((
            libc::EINVAL,
            format!(
                "\"{}\" carries {fewest} to {most} descriptors, not {}",
                req.name(),
                fds.len()
            ),
        ));
    }
    match req {
        ctl::Request::Attach => attach(fd, cx, app, out_fds).map_err(refuse(libc::EACCES)),
        ctl::Request::EventFd { sock } => event_fd(sock, cx, app.as_deref(), fds),
        ctl::Request::Life { sock } => life(sock, cx, app.as_deref(), fds),
        ctl::Request::LifeKey => life_key(cx, app.as_deref(), fds),
        ctl::Request::Subnets => Ok(Reply::Subnets(current_addrs(&cx.lcore.node))),
        ctl::Request::SwitchListenFailed {
            reason,
            port,
            errno,
        } => {
            // Never silent: the daemon's log says which process and port,
            // the counter how often.
            cx.fallbacks.add_listen_failure(reason);
            let pid = os::peer_cred(fd).map_or(0, |(pid, _, _)| pid);
            log(
                "warn",
                &format!(
                    "pid {pid}: SAN listen on port {port} failed (errno {errno}, {}): it serves kernel TCP only",
                    reason.label()
                ),
            );
            Ok(Reply::Ok)
        }
        ctl::Request::SwitchFallback(reason) => {
            cx.fallbacks.add(reason);
            Ok(Reply::Ok)
        }
    }
}

/// One JSON line: the operator's requests (`dsanctl`).
fn serve_line(line: &str, fd: i32, cx: &Ctx, fds: &[OwnedFd]) -> Value {
    let r = match serde_json::from_str::<Value>(line) {
        Ok(req) => match req["cmd"].as_str() {
            _ if !fds.is_empty() => Err("descriptors come only with an application's typed requests".to_string()),
            Some("attach" | "event_fd" | "life" | "life_key" | "switch_fallback" | "switch_listen_failed") => Err(format!(
                "{} is an application's request: typed (dsan_channel::ctl, format {}), not a JSON line",
                req["cmd"],
                ctl::VERSION
            )),
            Some("trace") => trace(&req, cx, fd),
            Some("ping") => ping(&req, cx, fd),
            _ => handle_request(&req, cx),
        },
        Err(e) => Err(format!("malformed request (expected one JSON object per line): {e}")),
    };
    r.unwrap_or_else(|e| {
        cx.bad_requests.fetch_add(1, Ordering::Relaxed);
        json!({"ok": false, "error": e})
    })
}

fn attach(
    fd: i32,
    cx: &Ctx,
    app: &mut Option<Arc<AppShared>>,
    out_fds: &mut Vec<i32>,
) -> Result<Reply, String> {
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
    Ok(Reply::Attached {
        app: id,
        region_size: layout::size() as u64,
        region_version: REGION_VERSION,
        subnets: current_addrs(&cx.lcore.node),
    })
}

/// The attachment and the socket (in range) of a request that registers
/// descriptors for a socket.
fn socket_of(sock: u32, app: Option<&AppShared>) -> Result<(&AppShared, u32), Refusal> {
    let app = app.ok_or((libc::EINVAL, "attach first".to_string()))?;
    if sock as usize >= MAX_SOCKETS {
        return Err((libc::EINVAL, format!("socket {sock} out of range")));
    }
    Ok((app, sock))
}

/// The reply to a registration the lcore did (or refused with an errno).
fn registered(r: Result<(), i32>, app: &AppShared) -> Result<Reply, Refusal> {
    match r {
        Ok(()) => Ok(Reply::Ok),
        Err(libc::EMFILE) => Err((
            libc::EMFILE,
            format!(
                "EMFILE: user {}'s share of the daemon's event descriptors is used up",
                app.uid
            ),
        )),
        Err(libc::ENOTCONN) => Err((libc::ENOTCONN, "that socket holds no connection".into())),
        Err(_) => Err((libc::ENETDOWN, "this process is no longer attached".into())),
    }
}

/// `EventFd { sock }` with one event descriptor attached: the event
/// descriptor of socket `sock`, handed to the lcore (which owns and closes
/// it). With two descriptors, the second is the one FD_WRITE signals
/// instead. Both are eventfds (written by the process's notifier thread),
/// or both are senders of wake sockets (`dsan_channel::wake`: signalled
/// by the lcore itself).
fn event_fd(
    sock: u32,
    cx: &Ctx,
    app: Option<&AppShared>,
    mut fds: Vec<OwnedFd>,
) -> Result<Reply, Refusal> {
    let (app, sock) = socket_of(sock, app)?;
    // (One descriptor, or two: the event descriptor and the FD_WRITE one;
    // counted by `serve_typed`.)
    let direct = fds.iter().all(|f| wake::is_sender(f.as_raw_fd()));
    if !direct && !fds.iter().all(|f| sys::is_eventfd(f.as_raw_fd())) {
        return Err((
            libc::EINVAL,
            "the event descriptors must be eventfds, or senders of wake sockets (datagram \
             sockets connected to a dsan-wake name), all of one kind"
                .into(),
        ));
    }
    let wfd = (fds.len() == 2).then(|| fds.pop().expect("two"));
    let fd = fds.pop().expect("one");
    // The daemon's waker (it sends a pass's wake tokens for the lcore when
    // the pass readied more than a few), started with the first wake socket.
    if direct {
        dataplane::node::start_waker()
            .map_err(|e| (libc::EAGAIN, format!("cannot start the waker: {e}")))?;
    }
    // The process's notifier thread (it writes the eventfds for the lcore),
    // started with its first eventfd.
    if !direct && app.notifier.get().is_none() {
        let n = dataplane::node::Notifier::start(app.pid)
            .map_err(|e| (libc::EAGAIN, format!("cannot start a notifier: {e}")))?;
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
                direct,
                done,
            },
            ASK,
        )
        .map_err(|e| (libc::ENETDOWN, err(e)))?;
    registered(r, app)
}

/// `Life { sock }` with the read end of a pipe attached: the life of
/// socket `sock`'s connection (its process holds the write end beside
/// the socket, and so does every process that inherits it), handed to the
/// lcore (`dataplane::node::handover`).
fn life(
    sock: u32,
    cx: &Ctx,
    app: Option<&AppShared>,
    mut fds: Vec<OwnedFd>,
) -> Result<Reply, Refusal> {
    let (app, sock) = socket_of(sock, app)?;
    if fds.len() != 1 || !sys::is_pipe(fds[0].as_raw_fd()) {
        return Err((
            libc::EINVAL,
            "\"life\" carries one descriptor: the read end of a pipe".into(),
        ));
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
        .map_err(|e| (libc::ENETDOWN, err(e)))?;
    registered(r, app)
}

/// `LifeKey` with the write end of a connection's life attached (a socket
/// received in an `SCM_RIGHTS` message came with it): the connection's
/// claim key, `Reply::Key`, for the process to
/// claim it with (`dataplane::node::handover`). The descriptor is the
/// proof of holding the connection; it is closed here at once.
fn life_key(cx: &Ctx, app: Option<&AppShared>, fds: Vec<OwnedFd>) -> Result<Reply, Refusal> {
    let app = app.ok_or((libc::EINVAL, "attach first".to_string()))?;
    let ino = match fds.as_slice() {
        [fd] => sys::pipe_inode(fd.as_raw_fd()),
        _ => None,
    }
    .ok_or((
        libc::EINVAL,
        "\"life_key\" carries one descriptor: the write end of a connection's life".to_string(),
    ))?;
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
        .map_err(|e| (libc::ENETDOWN, err(e)))?;
    match r {
        Ok(key) => Ok(Reply::Key(key)),
        Err(libc::EACCES) => Err((libc::EACCES, "EACCES: another user's connection".into())),
        Err(libc::ENOTCONN) => Err((
            libc::ENOTCONN,
            "no connection has that life (it ended)".into(),
        )),
        Err(_) => Err((libc::ENETDOWN, "this process is no longer attached".into())),
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
            v["san_addrs"] = json!(current_addr_names(node));
            v["lcore_stats"] = json!({
                "rx_frames": s.rx_frames.load(Ordering::Relaxed), "tx_frames": s.tx_frames.load(Ordering::Relaxed),
                "tx_dropped": s.tx_dropped.load(Ordering::Relaxed), "alloc_failed": s.alloc_failed.load(Ordering::Relaxed),
                "busy_polls": s.busy_polls.load(Ordering::Relaxed), "idle_polls": s.idle_polls.load(Ordering::Relaxed),
                "sleeps": s.sleeps.load(Ordering::Relaxed), "wake_sleeps": s.wake_sleeps.load(Ordering::Relaxed), "rhythm_spins": s.rhythm_spins.load(Ordering::Relaxed),
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
        Some("subnets") => Ok(json!({"ok": true, "san_addrs": current_addr_names(node)})),
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

/// The host's SAN addresses now.
fn current_addrs(node: &NodeHandle) -> Vec<Subnet> {
    node.subnets.read().map(|v| v.clone()).unwrap_or_default()
}

/// The host's SAN addresses now, as `ip/prefix` (for the operator's JSON).
fn current_addr_names(node: &NodeHandle) -> Vec<String> {
    current_addrs(node)
        .iter()
        .map(ToString::to_string)
        .collect()
}
