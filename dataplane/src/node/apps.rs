//! The application side: what attached processes ask through their command
//! rings (listen, decide, connect, close, kick, claim), what the protocol
//! core delivers to them (requests, connect outcomes, the end of a
//! connection), processes coming and going, and claims and hand-backs of
//! connections they share.
//!
//! Everything read from a region is untrusted: a command is copied out of
//! the ring once and parsed ([`Command::parse`]); what fails is counted by
//! reason and answered with EINVAL when its socket index is in range; an
//! impossible ring index detaches the process. Event descriptors are owned
//! here (the lcore closes them), never by the control thread.

use super::counters::{Local, Quota};
use super::groups::Groups;
use super::procs::{AppShared, Proc, Procs, SockObj};
use super::quotas::Quotas;
use super::signal::{complete, raise, EventReg};
use super::streams::Moved;
use super::{Ctx, NodeConfig};
use crate::proto::rng::OsRng;
use crate::proto::{
    AcceptError, ConnHandle, ConnectError, Decision, Endpoint, Incoming, ListenError, ListenerId,
    PortOwner, StreamParams,
};
use crate::time::Instant;
use crate::wire::RejectReason;
use dsan_channel::msg::{Bufs, Command, CommandView, Op, Request, RequestKey, Verdict};
use dsan_channel::region::{FD_ACCEPT, FD_ALL, FD_CONNECT, MAX_SOCKETS};
use dsan_channel::ring::{Consumer, PushError};
use dsan_channel::sys;
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) fn errno(e: i32) -> Option<i64> {
    Some(-i64::from(e))
}

/// The application side of the node: the attached processes, the SAN
/// listeners' groups and the users' quotas. What it needs of the rest of
/// the node comes in a [`Ctx`].
#[derive(Default)]
pub(super) struct Apps {
    pub(super) procs: Procs,
    /// Which sockets serve each SAN listener (see [`super::groups`]).
    pub(super) groups: Groups,
    quotas: Quotas,
    /// The version of the kernel TCP listener table last checked against
    /// the SAN listeners (see [`Apps::revoke_foreign_listeners`]).
    owners_seen: u64,
}

impl Apps {
    pub(super) fn attach(&mut self, app: Arc<AppShared>, cmds: Consumer, subnets_epoch: u64) {
        app.region
            .header()
            .subnets_epoch
            .store(subnets_epoch, Ordering::Release);
        self.procs.ids.push(app.id);
        self.procs.map.insert(
            app.id,
            Proc {
                cmds,
                backlogs: HashMap::new(),
                socks: HashMap::new(),
                events: HashMap::new(),
                event_fds: 0,
                shared: app,
                condemned: false,
            },
        );
    }

    /// The addresses changed (epoch `v`): every attached process learns it.
    pub(super) fn subnets_changed(&self, v: u64) {
        for p in self.procs.values() {
            p.shared
                .region
                .header()
                .subnets_epoch
                .store(v, Ordering::Release);
        }
    }

    /// A process leaves: everything it held is released (its listeners refuse
    /// their queues), its event descriptors are closed, and its region is
    /// marked closed; its connections are reset for `reason`.
    pub(super) fn detach(
        &mut self,
        now: Instant,
        id: u64,
        reason: crate::wire::ResetReason,
        cx: &mut Ctx,
    ) {
        if reason == crate::wire::ResetReason::ProcessGone {
            self.closes_left_by(now, id, cx);
        }
        if reason != crate::wire::ResetReason::Shutdown {
            // What it shares with other processes stays theirs.
            self.hand_over_all(id, cx);
        }
        cx.streams
            .reset_all_of(now, id, reason, cx.ep, &mut self.procs, cx.local);
        self.procs.ids.retain(|p| *p != id);
        if let Some(p) = self.procs.map.remove(&id) {
            if reason == crate::wire::ResetReason::Shutdown {
                // The daemon stops under a running process: its listeners
                // post FD_ACCEPT with ENETDOWN, so that a process waiting
                // for requests learns that none will come.
                for (sock, obj) in &p.socks {
                    if matches!(obj, SockObj::Listener { .. }) {
                        let sh = p.shared.region.sock(*sock as usize);
                        sh.accept_error.store(-libc::ENETDOWN, Ordering::Release);
                        raise(sh, p.events.get(sock), FD_ACCEPT);
                    }
                }
            }
            let uid = p.shared.uid;
            let mut socks: Vec<(u32, SockObj)> = p.socks.into_iter().collect();
            socks.sort_unstable_by_key(|(s, _)| *s);
            for (sock, obj) in socks {
                // A listener its sibling workers still serve lives on.
                if reason != crate::wire::ResetReason::Shutdown
                    && self.groups.left_group(id, sock, &obj)
                {
                    continue;
                }
                self.quotas.release(uid, &obj);
                self.release(now, obj, cx);
            }
            p.shared.region.header().closed.store(1, Ordering::Release);
            if let Some(n) = p.shared.notifier.get() {
                n.shutdown();
            }
        }
    }

    /// A process's close does not wait for the daemon: the closes it
    /// posted before it went are done as closes (the send rings' last bytes
    /// go out, then the FIN), not as resets. Nothing else it left in its
    /// ring is done. At most the ring's capacity of slots is taken.
    fn closes_left_by(&mut self, now: Instant, id: u64, cx: &mut Ctx) {
        // At most one ring's worth: a process still alive (a violator, or
        // one that shut its control socket) may keep pushing.
        let Some(bound) = self.procs.get(id).map(|p| p.cmds.capacity()) else {
            return;
        };
        for _ in 0..bound {
            let Some(p) = self.procs.get_mut(id) else {
                return;
            };
            let Ok(Some(slot)) = p.cmds.pop() else {
                return;
            };
            if let Ok(cmd) = Command::parse(&slot) {
                if matches!(cmd.op, Op::Close | Op::Abort) {
                    self.command(now, id, cmd, cx);
                }
            }
        }
    }

    /// The process broke the channel's protocol: it is condemned (nothing
    /// more of its ring is served) and detached by [`Apps::reap`] once no
    /// walk over the process list is under way; everyone else carries on.
    pub(super) fn violation(&mut self, id: u64, local: &mut Local) {
        let Some(p) = self.procs.get_mut(id) else {
            return;
        };
        if !p.condemned {
            p.condemned = true;
            local.app_protocol_violations += 1;
            self.procs.condemned.push(id);
        }
    }

    /// Detaches the processes condemned since the last call. Returns
    /// whether there were any.
    pub(super) fn reap(&mut self, now: Instant, cx: &mut Ctx) -> bool {
        if self.procs.condemned.is_empty() {
            return false;
        }
        let ids = std::mem::take(&mut self.procs.condemned);
        for id in ids {
            self.detach(now, id, crate::wire::ResetReason::ProcessGone, cx);
        }
        true
    }

    /// Registers (replacing and closing any previous ones) the event
    /// descriptor of a process's socket and, if given, the descriptor
    /// FD_WRITE signals instead.
    ///
    /// # Errors
    /// ESRCH for an unknown process; EMFILE when its user (not root) would
    /// hold more than `max_fds` event descriptors in the daemon.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn set_event_fd(
        &mut self,
        id: u64,
        sock: u32,
        fd: OwnedFd,
        wfd: Option<OwnedFd>,
        direct: bool,
        max_fds: u32,
        local: &mut Local,
    ) -> Result<(), i32> {
        let Some(p) = self.procs.get(id) else {
            return Err(libc::ESRCH);
        };
        let uid = p.shared.uid;
        let old = p.events.get(&sock).map_or(0, EventReg::descriptors);
        let new = 1 + u32::from(wfd.is_some());
        if uid != 0 && new > old {
            let held = self.procs.user_event_fds(uid);
            if held - u64::from(old) + u64::from(new) > u64::from(max_fds) {
                local.quota_refusals[Quota::EventFds as usize] += 1;
                return Err(libc::EMFILE);
            }
        }
        let p = self.procs.get_mut(id).expect("present");
        let mask = p.events.get(&sock).map_or(0, |r| r.mask);
        let notifier = if direct {
            None
        } else {
            p.shared.notifier.get().cloned()
        };
        p.unregister_events(sock);
        p.event_fds += new;
        p.events.insert(
            sock,
            EventReg {
                fd: Arc::new(fd),
                wfd: wfd.map(Arc::new),
                mask,
                notifier,
                direct,
            },
        );
        Ok(())
    }

    /// Whether user `uid` (not root) serves as many connections, with its
    /// connect attempts in progress, as its share of the host's allows.
    fn connections_full(&self, uid: u32, cx: &Ctx) -> bool {
        self.quotas
            .connections_full(uid, cx.streams.of_user(uid), cx.cfg.proto.max_connections)
    }

    /// Releases what a socket holds in the core.
    fn release(&mut self, now: Instant, obj: SockObj, cx: &mut Ctx) {
        match obj {
            SockObj::Listener { id, .. } => {
                self.groups.disband(&mut self.procs.map, id);
                let _ = cx.ep.close_listener(now, id);
            }
            SockObj::Attempt { h, .. } | SockObj::Conn(h) => {
                cx.streams.forget_owner(h);
                let _ = cx.ep.close(now, h);
            }
            SockObj::Ended | SockObj::Away(_) => {}
        }
    }

    /// Serves up to a burst of a process's commands. Returns whether there were any.
    pub(super) fn serve(&mut self, now: Instant, id: u64, cx: &mut Ctx) -> bool {
        let mut busy = false;
        for _ in 0..crate::device::BURST {
            let Some(p) = self.procs.get_mut(id).filter(|p| !p.condemned) else {
                return busy;
            };
            let slot = match p.cmds.pop() {
                Ok(Some(s)) => s,
                Ok(None) => return busy,
                Err(_) => {
                    self.violation(id, cx.local);
                    return true;
                }
            };
            busy = true;
            match Command::parse(&slot) {
                Ok(cmd) => self.command(now, id, cmd, cx),
                Err(e) => {
                    cx.local.app_rejects[e.index()] += 1;
                    let app = p.shared.clone();
                    app.region
                        .header()
                        .bad_commands
                        .fetch_add(1, Ordering::Relaxed);
                    let v = CommandView::new_checked(&slot[..]).expect("a slot is long enough");
                    if (v.sock() as usize) < MAX_SOCKETS {
                        complete(
                            app.region.sock(v.sock() as usize),
                            v.seq(),
                            -i64::from(libc::EINVAL),
                        );
                    }
                }
            }
        }
        busy
    }

    fn command(&mut self, now: Instant, id: u64, cmd: Command, cx: &mut Ctx) {
        let sock = cmd.sock;
        let app = self.procs.map[&id].shared.clone();
        let result = match cmd.op {
            Op::Listen {
                addr,
                backlog,
                area,
                bufs,
                takeover,
                reuse_port,
            } => self.listen(
                id,
                sock,
                (addr, backlog, area, bufs),
                takeover,
                reuse_port,
                cx,
            ),
            Op::Decide { key, verdict, .. } => self.decide(now, id, sock, key, verdict, cx),
            Op::Connect {
                dst,
                src,
                src_port,
                nonblocking,
                bufs,
            } => self.connect(
                now,
                (id, sock, cmd.seq),
                dst,
                (src, src_port),
                nonblocking,
                bufs,
                cx,
            ),
            Op::Close | Op::Abort => {
                let abort = cmd.op == Op::Abort;
                let p = self.procs.get_mut(id).expect("caller checked");
                p.backlogs.remove(&sock);
                p.unregister_events(sock);
                let uid = p.shared.uid;
                let removed = p.socks.remove(&sock);
                if let Some(o) = &removed {
                    if self.groups.left_group(id, sock, o) {
                        // Its sibling workers still serve the listener.
                        complete(app.region.sock(sock as usize), cmd.seq, 0);
                        return;
                    }
                    self.quotas.release(uid, o);
                }
                match removed {
                    // Another socket still holds it: it stays open there
                    // (also after SO_LINGER {1, 0}: on TCP, only the last
                    // close of a shared socket resets).
                    Some(SockObj::Conn(h))
                        if cx.streams.shares.shared(h) && self.hand_back(h, cx) => {}
                    Some(SockObj::Away(h)) => cx.streams.shares.let_go(h, id, sock),
                    Some(SockObj::Conn(h))
                        if abort && cx.streams.abort(now, h, cx.ep, &mut self.procs, cx.local) => {}
                    Some(SockObj::Conn(h))
                        if !abort && cx.streams.close(now, h, cx.ep, &mut self.procs, cx.local) => {
                    }
                    Some(obj) => self.release(now, obj, cx),
                    None => {}
                }
                Some(0)
            }
            Op::Kick => {
                let conn = match self.procs.get(id).and_then(|p| p.socks.get(&sock)) {
                    Some(SockObj::Conn(h)) => Some(*h),
                    _ => None,
                };
                if let Some(h) = conn {
                    if cx.streams.kick(h, cx.ep, cx.local).is_err() {
                        self.violation(id, cx.local);
                    }
                }
                None
            }
            Op::Claim {
                from_app,
                from_sock,
                key,
            } => self.claim((id, sock), (from_app, from_sock), key, cx),
            Op::EventSelect { mask } => {
                let p = self.procs.get_mut(id).expect("caller checked");
                if mask == 0 {
                    p.unregister_events(sock);
                    Some(0)
                } else if let Some(r) = p.events.get_mut(&sock) {
                    r.mask = mask & FD_ALL;
                    Some(0)
                } else {
                    errno(libc::EINVAL) // no descriptor registered
                }
            }
        };
        if let Some(r) = result {
            complete(app.region.sock(sock as usize), cmd.seq, r);
        }
    }

    fn listen(
        &mut self,
        id: u64,
        sock: u32,
        (addr, backlog, area, bufs): (SocketAddrV4, i32, u16, Bufs),
        takeover: u32,
        reuse_port: bool,
        cx: &mut Ctx,
    ) -> Option<i64> {
        let p = &self.procs.map[&id];
        let area_used = p
            .socks
            .values()
            .any(|o| matches!(o, SockObj::Listener { area: a, .. } if *a == area));
        if p.socks.contains_key(&sock) || area_used {
            return errno(libc::EINVAL);
        }
        let a = (*addr.ip(), addr.port());
        // Who may listen on a SAN port: as with TCP, a port below 1024
        // needs root or CAP_NET_BIND_SERVICE; and a port whose kernel TCP
        // listener belongs to another user is that user's.
        let (uid, low) = (p.shared.uid, p.shared.low_ports);
        if a.1 < 1024 && !low {
            cx.local.listen_denials[1] += 1;
            return errno(libc::EACCES);
        }
        if let Some(set) = &cx.cfg.proto.tcp_listening {
            let theirs = match set.owner(a.1) {
                PortOwner::Uid(u) => u != uid,
                PortOwner::Mixed => true,
                PortOwner::Nobody => false,
            };
            if theirs && uid != 0 {
                cx.local.listen_denials[0] += 1;
                return errno(libc::EACCES);
            }
        }
        // A forked child takes the address over from its parent's listener
        // (checked: the listener belongs to an attachment of that pid, that
        // process, proven by its pidfd, was this process's parent when it
        // attached, and both are the same user).
        let from = (takeover != 0)
            .then(|| cx.ep.listener_at(a))
            .flatten()
            .filter(|l| {
                self.groups
                    .owner(*l)
                    .and_then(|(owner, _)| self.procs.get(owner))
                    .is_some_and(|o| {
                        o.shared.pid == takeover
                            && o.shared.uid == uid
                            && p.shared.lineage.child_of(o.shared.pid, &o.shared.lineage)
                    })
            });
        // A later worker of the same parent joins the worker that took
        // the address over; a process of the same user joins a listener
        // that it and the owner both made with SO_REUSEPORT (see `groups`).
        if from.is_none() && (takeover != 0 || reuse_port) {
            if let Some(l) = cx.ep.listener_at(a).filter(|l| {
                (takeover != 0 && self.groups.may_join(&self.procs.map, *l, id, takeover))
                    || (reuse_port && self.groups.may_share(&self.procs.map, *l, id))
            }) {
                let cap = cx.ep.backlog(l).map_or(1, |b| b.1);
                let p = self.procs.get_mut(id).expect("present");
                let Ok(ring) = p.shared.region.format_backlog(usize::from(area), cap) else {
                    return errno(libc::EINVAL);
                };
                p.backlogs.insert(sock, ring);
                p.socks
                    .insert(sock, SockObj::Listener { id: l, area, bufs });
                self.groups.join(l, id, sock);
                cx.local.listener_joins += 1;
                return Some(cap as i64);
            }
        }
        // One user's share of the host's listeners.
        if !self.quotas.take_listener(uid) {
            cx.local.quota_refusals[Quota::Listeners as usize] += 1;
            return errno(libc::EMFILE);
        }
        let listened = match from {
            Some(f) => cx.ep.listen_over(a, i64::from(backlog), f),
            None => cx.ep.listen(a, i64::from(backlog)),
        };
        let l = match listened {
            Ok(l) => l,
            Err(e) => {
                self.quotas.give_listener(uid);
                return match e {
                    ListenError::AddrInUse => errno(libc::EADDRINUSE),
                    ListenError::AddrNotAvailable => errno(libc::EADDRNOTAVAIL),
                    _ => errno(libc::EMFILE),
                };
            }
        };
        let cap = cx.ep.backlog(l).map_or(1, |b| b.1);
        let p = self.procs.get_mut(id).expect("present");
        // The area is not in use by another listener of this process (checked above).
        let ring = match p.shared.region.format_backlog(usize::from(area), cap) {
            Ok(r) => r,
            Err(_) => {
                let _ = cx.ep.close_listener(Instant::ZERO, l);
                return errno(libc::EINVAL);
            }
        };
        p.backlogs.insert(sock, ring);
        p.socks
            .insert(sock, SockObj::Listener { id: l, area, bufs });
        self.groups.listen(l, id, sock, reuse_port);
        Some(cap as i64)
    }

    fn decide(
        &mut self,
        now: Instant,
        id: u64,
        sock: u32,
        key: RequestKey,
        verdict: Verdict,
        cx: &mut Ctx,
    ) -> Option<i64> {
        cx.trace.stamp(key.conn_id, super::Hop::DecisionSeen);
        let p = &self.procs.map[&id];
        let Some(SockObj::Listener { id: l, bufs, .. }) = p.socks.get(&sock).copied() else {
            return errno(libc::EINVAL);
        };
        let (d, new_sock) = match verdict {
            Verdict::Accept { new_sock } => (Decision::Accept, Some(new_sock)),
            Verdict::Reject => (Decision::Reject, None),
        };
        if new_sock.is_some_and(|s| p.socks.contains_key(&s)) {
            return errno(libc::EINVAL);
        }
        // One user's share of the host's connections (ENOBUFS, as the
        // host's own limit answers: the request stays queued).
        if d == Decision::Accept && self.connections_full(p.shared.uid, cx) {
            cx.local.quota_refusals[Quota::Connections as usize] += 1;
            return errno(libc::ENOBUFS);
        }
        let offer = cx.cfg.proto.offer(bufs.rcv as u32);
        match cx.ep.decide_with(now, l, key, d, offer) {
            Ok(Some(h)) => {
                let new_sock = new_sock.expect("accepted");
                let params = cx.ep.connection(h).expect("just accepted").stream_params();
                let p = self.procs.get_mut(id).expect("present");
                p.socks.insert(new_sock, SockObj::Conn(h));
                cx.streams.set_owner(h, id, new_sock);
                cx.streams.open(
                    now,
                    h,
                    (id, new_sock),
                    bufs,
                    params,
                    cx.ep,
                    &mut self.procs,
                    cx.local,
                );
                Some(0)
            }
            Ok(None) => errno(libc::ECONNREFUSED),
            Err(AcceptError::TooManyConnections) => errno(libc::ENOBUFS),
            // Expired or answered already: the application skips it.
            Err(AcceptError::Stale) => errno(libc::ECONNABORTED),
            Err(_) => errno(libc::EINVAL),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        now: Instant,
        (id, sock, seq): (u64, u32, u32),
        dst: SocketAddrV4,
        (src, src_port): (Option<std::net::Ipv4Addr>, u16),
        nonblocking: bool,
        bufs: Bufs,
        cx: &mut Ctx,
    ) -> Option<i64> {
        match self.procs.map[&id].socks.get(&sock) {
            Some(SockObj::Attempt { .. }) => return errno(libc::EALREADY),
            Some(SockObj::Conn(_)) => return errno(libc::EISCONN),
            Some(SockObj::Listener { .. }) => return errno(libc::EINVAL),
            _ => {}
        }
        // A source port below 1024 needs the right, as a kernel bind does.
        if src_port != 0 && src_port < 1024 && !self.procs.map[&id].shared.low_ports {
            return errno(libc::EACCES);
        }
        // One user's share of the host's connect attempts (EAGAIN, as a
        // kernel out of local ports answers).
        let uid = self.procs.map[&id].shared.uid;
        if self.connections_full(uid, cx) {
            cx.local.quota_refusals[Quota::Connections as usize] += 1;
            return errno(libc::EAGAIN);
        }
        if !self.quotas.take_attempt(uid) {
            cx.local.quota_refusals[Quota::Attempts as usize] += 1;
            return errno(libc::EAGAIN);
        }
        let offer = cx.cfg.proto.offer(bufs.rcv as u32);
        let h = match cx
            .ep
            .connect_for(now, uid, src, src_port, (*dst.ip(), dst.port()), offer)
        {
            Ok(h) => h,
            Err(e) => {
                self.quotas.give_attempt(uid);
                return match e {
                    ConnectError::HostUnreachable => errno(libc::EHOSTUNREACH),
                    ConnectError::NoLocalAddress => errno(libc::EADDRNOTAVAIL),
                    ConnectError::ResolutionShare => {
                        cx.local.quota_refusals[Quota::Resolutions as usize] += 1;
                        errno(libc::EAGAIN)
                    }
                    _ => errno(libc::EAGAIN),
                };
            }
        };
        let p = self.procs.get_mut(id).expect("present");
        let s = p.shared.region.sock(sock as usize);
        s.connect_state.store(0, Ordering::Relaxed);
        let attempt = cx.ep.attempt(h);
        if let Some((local, _, _)) = attempt {
            s.result2.store(
                (u64::from(u32::from(local.0)) << 16) | u64::from(local.1),
                Ordering::Relaxed,
            );
        }
        p.socks.insert(
            sock,
            SockObj::Attempt {
                h,
                blocking: !nonblocking,
                seq,
                bufs,
            },
        );
        cx.streams.set_owner(h, id, sock);
        if let Some((_, _, wire_id)) = attempt.filter(|_| cx.trace.on()) {
            cx.trace.connect(h, wire_id);
        }
        if nonblocking {
            errno(libc::EINPROGRESS)
        } else {
            None // completes with the outcome
        }
    }

    /// A SAN listener whose port now has a kernel TCP listener of another
    /// user (who could not get the SAN port because this one held it) is
    /// closed: the port is that user's, and its switch takes the SAN side
    /// on its next try. The process learns it as FD_ACCEPT with EACCES.
    /// Runs when the listener table changed (the scanner bumps its version).
    pub(super) fn revoke_foreign_listeners(
        &mut self,
        now: Instant,
        ep: &mut Endpoint<OsRng>,
        local: &mut Local,
        cfg: &NodeConfig,
    ) {
        let Some(set) = cfg.proto.tcp_listening.clone() else {
            return;
        };
        let v = set.version();
        if v == self.owners_seen {
            return;
        }
        self.owners_seen = v;
        let mut foreign: Vec<(ListenerId, u64, u32)> = Vec::new();
        for (l, addr, _, _) in ep.listeners() {
            let Some((pid, sock)) = self.groups.owner(l) else {
                continue;
            };
            let Some(p) = self.procs.get(pid) else {
                continue;
            };
            let theirs = match set.owner(addr.1) {
                PortOwner::Uid(u) => u != p.shared.uid,
                PortOwner::Mixed | PortOwner::Nobody => false,
            };
            if theirs && p.shared.uid != 0 {
                foreign.push((l, pid, sock));
            }
        }
        foreign.sort_unstable();
        for (l, pid, sock) in foreign {
            local.listen_denials[2] += 1;
            // Its sibling workers' sockets learn it too.
            for (mpid, msock) in self.groups.disband(&mut self.procs.map, l) {
                if let Some(p) = self.procs.get(mpid) {
                    let sh = p.shared.region.sock(msock as usize);
                    sh.accept_error.store(-libc::EACCES, Ordering::Release);
                    if !raise(sh, p.events.get(&msock), FD_ACCEPT) {
                        local.event_signal_failed += 1;
                    }
                }
            }
            let _ = ep.close_listener(now, l);
            if let Some(p) = self.procs.get_mut(pid) {
                if let Some(o) = p.socks.remove(&sock) {
                    let uid = p.shared.uid;
                    self.quotas.release(uid, &o);
                }
                let Some(p) = self.procs.get_mut(pid) else {
                    continue;
                };
                p.backlogs.remove(&sock);
                let sh = p.shared.region.sock(sock as usize);
                sh.accept_error.store(-libc::EACCES, Ordering::Release);
                if !raise(sh, p.events.get(&sock), FD_ACCEPT) {
                    local.event_signal_failed += 1;
                }
            }
        }
    }

    /// A connect request for `listener` that the core queued: into the
    /// backlog ring of the first of the listener's sockets (in turn) whose
    /// ring takes it, its event bit raised; refused at once, with no event,
    /// when none does.
    pub(super) fn deliver_request(
        &mut self,
        now: Instant,
        listener: ListenerId,
        request: Incoming,
        cx: &mut Ctx,
    ) {
        let members = self.groups.members(listener);
        if members.is_empty() {
            self.groups.done_with(members);
            return;
        }
        let left = (request.arrived + cx.cfg.proto.connect_budget).saturating_since(now);
        let req = Request {
            peer: SocketAddrV4::new(request.peer.0, request.peer.1),
            local: SocketAddrV4::new(request.local.0, request.local.1),
            conn_id: request.conn_id,
            expires_ns: sys::monotonic_ns() + left.as_nanos() as u64,
        };
        // Stamped before the push: a spinning accepting thread may
        // take the request the moment it is in the ring.
        cx.trace.stamp(request.conn_id, super::Hop::Queued);
        // To the first member (in turn) whose ring takes it.
        let slot = req.to_slot();
        let mut taken = false;
        for &(pid, sock) in &members {
            let Some(p) = self.procs.get_mut(pid).filter(|p| !p.condemned) else {
                continue;
            };
            let pushed = match p.backlogs.get_mut(&sock) {
                Some(ring) => ring.push(&slot),
                None => Err(PushError::Full),
            };
            match pushed {
                Ok(()) => {
                    let s = p.shared.region.sock(sock as usize);
                    if !raise(s, p.events.get(&sock), FD_ACCEPT) {
                        cx.local.event_signal_failed += 1;
                    }
                    taken = true;
                    break;
                }
                // The core counts the request as pending, so an
                // honest application's ring has room; it is full
                // only when it holds requests that expired before
                // the application took them: the next member.
                Err(PushError::Full) => {}
                Err(PushError::Violation(_)) => self.violation(pid, cx.local),
            }
        }
        self.groups.done_with(members);
        if !taken {
            // No ring took it: refused at once, no event.
            cx.ep.refuse(now, request.key(), RejectReason::BacklogFull);
        }
    }

    /// The outcome of connect attempt `conn` (the stream's parameters, or
    /// the errno): the socket becomes a connection (its stream opens) or
    /// is free again, and the process learns it (a blocking connect's
    /// completion, or FD_CONNECT).
    pub(super) fn connect_outcome(
        &mut self,
        now: Instant,
        conn: ConnHandle,
        outcome: Result<StreamParams, i32>,
        cx: &mut Ctx,
    ) {
        let Some((pid, sock)) = cx.streams.pending_owner(conn) else {
            return;
        };
        let Some(p) = self.procs.get_mut(pid) else {
            return;
        };
        let Some(SockObj::Attempt {
            blocking,
            seq,
            bufs,
            ..
        }) = p.socks.get(&sock).copied()
        else {
            return;
        };
        let err = outcome.err().unwrap_or(0);
        let uid = p.shared.uid;
        self.quotas.give_attempt(uid);
        let Some(p) = self.procs.get_mut(pid) else {
            return;
        };
        if let Ok(params) = outcome {
            p.socks.insert(sock, SockObj::Conn(conn));
            cx.streams.open(
                now,
                conn,
                (pid, sock),
                bufs,
                params,
                cx.ep,
                &mut self.procs,
                cx.local,
            );
        } else {
            p.socks.remove(&sock);
            cx.streams.forget_owner(conn);
        }
        let Some(p) = self.procs.get(pid) else {
            return;
        };
        let s = p.shared.region.sock(sock as usize);
        s.connect_state
            .store(if err == 0 { 1 } else { err }, Ordering::Release);
        if blocking {
            s.arrivals.fetch_add(1, Ordering::Release);
            complete(s, seq, i64::from(err));
        } else {
            s.connect_error.store(err, Ordering::Release);
            if !raise(s, p.events.get(&sock), FD_CONNECT) {
                cx.local.event_signal_failed += 1;
            }
        }
        cx.trace.completed(conn);
    }

    /// The core ended connection `conn` (the peer closed or reset it): its
    /// stream ends and its socket, if still open, reads the end.
    pub(super) fn connection_ended(&mut self, conn: ConnHandle, reset: bool, cx: &mut Ctx) {
        let owner = cx.streams.owner(conn);
        cx.streams
            .ended(conn, reset, cx.ep, &mut self.procs, cx.local);
        cx.streams.forget_owner(conn);
        if let Some((pid, sock)) = owner {
            if let Some(p) = self.procs.get_mut(pid) {
                p.socks.insert(sock, SockObj::Ended);
            }
        }
    }

    /// Registers the life of the connection socket `sock` of process `app`
    /// holds (see [`super::handover`]). One per connection: a second is
    /// dropped. Counted against the user's share of event descriptors.
    ///
    /// # Errors
    /// ESRCH (no such process), ENOTCONN (no connection there), EMFILE
    /// (the user's share is used up).
    pub(super) fn set_life(
        &mut self,
        app: u64,
        sock: u32,
        fd: OwnedFd,
        cx: &mut Ctx,
    ) -> Result<(), i32> {
        let p = self.procs.get(app).ok_or(libc::ESRCH)?;
        let h = match p.socks.get(&sock) {
            Some(SockObj::Conn(h) | SockObj::Away(h)) => *h,
            _ => return Err(libc::ENOTCONN),
        };
        if !cx.streams.has(h) {
            return Err(libc::ENOTCONN);
        }
        if cx.streams.shares.has_life(h) {
            return Ok(());
        }
        let uid = p.shared.uid;
        if uid != 0 && self.procs.user_event_fds(uid) + 1 > u64::from(cx.cfg.uid_event_fds) {
            cx.local.quota_refusals[Quota::EventFds as usize] += 1;
            return Err(libc::EMFILE);
        }
        let Some(ino) = dsan_channel::sys::pipe_inode(fd.as_raw_fd()) else {
            return Err(libc::EINVAL);
        };
        self.procs.get_mut(app).expect("present").event_fds += 1;
        cx.streams.shares.add_life(h, fd, app, ino);
        Ok(())
    }

    /// The claim key of the connection whose life is the pipe `ino`, for
    /// process `app`, which holds a write end of it (the control thread
    /// took the inode from the descriptor the process sent): a socket
    /// received in an `SCM_RIGHTS` message comes with its life, and a
    /// holder of the life holds the connection. The claim itself is then
    /// [`Apps::claim`]'s (which checks the user again).
    ///
    /// # Errors
    /// ESRCH (no such process), ENOTCONN (no such life: the connection
    /// ended), EACCES (another user's connection; counted as a refused
    /// claim).
    pub(super) fn life_key(&self, app: u64, ino: u64, cx: &mut Ctx) -> Result<u64, i32> {
        let uid = self.procs.get(app).ok_or(libc::ESRCH)?.shared.uid;
        let h = cx.streams.shares.by_life(ino).ok_or(libc::ENOTCONN)?;
        let (_, _, suid, _) = cx.streams.serving(h).ok_or(libc::ENOTCONN)?;
        if uid != 0 && uid != suid {
            cx.local.claims_refused += 1;
            return Err(libc::EACCES);
        }
        Ok(cx.streams.claim_key(h))
    }

    /// Socket `sock` of process `id` claims the connection whose claim key
    /// is `key`; `from` names the socket it knew it by (itself, for a
    /// socket taking back a connection that moved away). Checked: the key
    /// names a connection that someone may share (it has a life), of the
    /// claimer's user (or the claimer is root), and `sock` is free (or is
    /// that very socket, away).
    fn claim(
        &mut self,
        (id, sock): (u64, u32),
        from: (u64, u32),
        key: u64,
        cx: &mut Ctx,
    ) -> Option<i64> {
        let Some(h) = cx.streams.shares.by_key(key) else {
            cx.local.claims_refused += 1;
            return errno(libc::EBADF);
        };
        let Some((spid, ssock, suid, orphan)) = cx.streams.serving(h) else {
            return errno(libc::ENOTCONN);
        };
        let me = &self.procs.map[&id];
        if me.shared.uid != 0 && me.shared.uid != suid {
            cx.local.claims_refused += 1;
            return errno(libc::EACCES);
        }
        match me.socks.get(&sock) {
            None if from != (id, sock) => {}
            Some(SockObj::Away(x)) if from == (id, sock) && *x == h => {}
            Some(SockObj::Conn(x)) if *x == h => return Some(0),
            _ => return errno(libc::EINVAL),
        }
        match cx
            .streams
            .move_to(h, (id, sock), cx.ep, &self.procs, cx.local)
        {
            Moved::Yes => {}
            Moved::No => return errno(libc::ENOTCONN),
            Moved::Violation(old) => {
                self.violation(old, cx.local);
                return errno(libc::ENOTCONN);
            }
        }
        let previous = (!orphan).then_some((spid, ssock));
        cx.streams.shares.claimed(h, (id, sock), previous);
        if let Some((spid, ssock)) = previous {
            if let Some(p) = self.procs.get_mut(spid) {
                p.socks.insert(ssock, SockObj::Away(h));
            }
        }
        if let Some(p) = self.procs.get_mut(id) {
            p.socks.insert(sock, SockObj::Conn(h));
        }
        Some(0)
    }

    /// The socket serving `h` lets go of it (its close, or its process
    /// leaving): true if the connection stays open, moved to another socket
    /// holding it or kept as an orphan for a process that holds it without
    /// having claimed it yet; false when nobody else holds it.
    fn hand_back(&mut self, h: ConnHandle, cx: &mut Ctx) -> bool {
        while let Some(next) = cx.streams.shares.next_holder(h) {
            let holds = self.procs.get(next.0).is_some_and(|p| {
                !p.condemned && matches!(p.socks.get(&next.1), Some(SockObj::Away(x)) if *x == h)
            });
            if !holds {
                continue;
            }
            match cx.streams.move_to(h, next, cx.ep, &self.procs, cx.local) {
                Moved::Yes => {
                    if let Some(p) = self.procs.get_mut(next.0) {
                        p.socks.insert(next.1, SockObj::Conn(h));
                    }
                    cx.streams.shares.tidy(h);
                    return true;
                }
                Moved::No => {}
                Moved::Violation(old) => self.violation(old, cx.local),
            }
        }
        cx.streams.shares.take_away(h);
        cx.streams.shares.life_held(h) && cx.streams.orphan(h)
    }

    /// Process `id` leaves: the sockets through which it held connections
    /// from afar let go, and the connections it served stay with their
    /// other holders. Returns the sockets done with here (the caller
    /// releases the rest).
    fn hand_over_all(&mut self, id: u64, cx: &mut Ctx) -> Vec<u32> {
        let Some(p) = self.procs.get(id) else {
            return Vec::new();
        };
        let mut held: Vec<(u32, SockObj)> = p
            .socks
            .iter()
            .filter(|(_, o)| matches!(o, SockObj::Conn(_) | SockObj::Away(_)))
            .map(|(s, o)| (*s, *o))
            .collect();
        held.sort_unstable_by_key(|(s, _)| *s);
        let mut done = Vec::new();
        for (sock, obj) in held {
            match obj {
                SockObj::Away(h) => {
                    cx.streams.shares.let_go(h, id, sock);
                    done.push(sock);
                }
                SockObj::Conn(h) if cx.streams.shares.shared(h) && self.hand_back(h, cx) => {
                    done.push(sock);
                }
                _ => {}
            }
        }
        if let Some(p) = self.procs.get_mut(id) {
            for s in &done {
                p.socks.remove(s);
            }
        }
        done
    }
}
