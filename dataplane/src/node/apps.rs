//! Attached processes: their regions, the commands they send through their
//! command ring, and what each of their sockets is in the protocol core.
//!
//! Everything read from a region is untrusted: a command is copied out of
//! the ring once and parsed ([`Command::parse`]); what fails is counted by
//! reason and answered with EINVAL when its socket index is in range; an
//! impossible ring index detaches the process. Event descriptors are owned
//! here (the lcore closes them), never by the control thread.

use super::counters::Quota;
use super::signal::{complete, raise, EventReg};
use super::Node;
use crate::proto::{
    AcceptError, ConnHandle, ConnectError, Decision, ListenError, ListenerId, PortOwner,
};
use crate::time::Instant;
use dsan_channel::msg::{Bufs, Command, CommandView, Op, RequestKey, Verdict};
use dsan_channel::region::{Region, FD_ACCEPT, FD_ALL, MAX_SOCKETS};
use dsan_channel::ring::{Consumer, Producer};
use dsan_channel::sys::EventFd;
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the daemon and the lcore share about one attached process.
#[derive(Debug)]
pub struct AppShared {
    /// The daemon's id for the attachment.
    pub id: u64,
    /// The process (from SO_PEERCRED).
    pub pid: u32,
    /// Its user (from SO_PEERCRED): a SAN port whose kernel TCP listener
    /// belongs to another user is not granted to it.
    pub uid: u32,
    /// Whether it may listen on ports below 1024 (root or
    /// CAP_NET_BIND_SERVICE, read at attach).
    pub low_ports: bool,
    /// Who it is and whose child, proven at attach (for taking a listener
    /// over from its parent, checked without reading /proc on the lcore).
    pub lineage: Lineage,
    /// Its shared region.
    pub region: Region,
    /// Its own doorbell (the daemon's copy; the lcore waits on it and never reads it).
    pub bell: EventFd,
    /// The thread that writes its event descriptors, started by the control
    /// thread with the first one it registers.
    pub notifier: std::sync::OnceLock<Arc<super::Notifier>>,
}

/// A process's identity and parent, as the control thread proved them when
/// it attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Its parent's pid then (0 if unknown).
    pub ppid: u32,
    /// Its pidfd's inode in pidfs: unique for the boot (Linux 6.9 and
    /// later), so it never names another process after the pid is reused.
    pub ino: Option<u64>,
    /// Its parent's, read while that process was still its parent.
    pub parent_ino: Option<u64>,
}

impl Lineage {
    /// Whether `other` had the same parent as this process when each
    /// attached: by pidfs inode where both have one, else by pid.
    pub fn sibling_of(&self, other: &Lineage) -> bool {
        match (self.parent_ino, other.parent_ino) {
            (Some(a), Some(b)) => a == b,
            _ => self.ppid != 0 && self.ppid == other.ppid,
        }
    }

    /// Whether the process of `parent` (attached with pid `parent_pid`) was
    /// this one's parent when this one attached: by pidfs inode where both
    /// have one, else by pid.
    pub fn child_of(&self, parent_pid: u32, parent: &Lineage) -> bool {
        match (self.parent_ino, parent.ino) {
            (Some(a), Some(b)) => a == b,
            _ => self.ppid != 0 && self.ppid == parent_pid,
        }
    }
}

impl AppShared {
    /// A new attachment with a fresh region; also returns the consuming end
    /// of its command ring, which belongs to the lcore (hand it over with
    /// [`super::Command::Attach`]).
    ///
    /// # Errors
    /// If the region cannot be created.
    pub fn new(id: u64, pid: u32) -> std::io::Result<(Arc<AppShared>, Consumer)> {
        Self::new_as(id, pid, 0, true, Lineage::default())
    }

    /// [`new`](Self::new) for a process of user `uid`, that may bind ports
    /// below 1024 if `low_ports`, of `lineage`.
    ///
    /// # Errors
    /// If the region cannot be created.
    pub fn new_as(
        id: u64,
        pid: u32,
        uid: u32,
        low_ports: bool,
        lineage: Lineage,
    ) -> std::io::Result<(Arc<AppShared>, Consumer)> {
        let (region, cmds) = Region::create(&format!("dsan-app-{pid}"))?;
        let bell = EventFd::new()?;
        Ok((
            Arc::new(AppShared {
                id,
                pid,
                uid,
                low_ports,
                lineage,
                region,
                bell,
                notifier: std::sync::OnceLock::new(),
            }),
            cmds,
        ))
    }
}

/// What a process's socket is in the dataplane.
#[derive(Debug, Clone, Copy)]
pub(super) enum SockObj {
    Listener {
        id: ListenerId,
        area: u16,
        bufs: Bufs,
    },
    Attempt {
        h: ConnHandle,
        blocking: bool,
        seq: u32,
        bufs: Bufs,
    },
    Conn(ConnHandle),
    /// It holds a connection that another socket serves now (a forked
    /// child claimed it; see [`super::handover`]).
    Away(ConnHandle),
    /// The peer closed it; the application has yet to.
    Ended,
}

/// The lcore's state for one process.
pub(super) struct Proc {
    pub(super) cmds: Consumer,
    pub(super) backlogs: HashMap<u32, Producer>,
    pub(super) socks: HashMap<u32, SockObj>,
    pub(super) events: HashMap<u32, EventReg>,
    /// The descriptors `events` holds (counted against its user's share).
    pub(super) event_fds: u32,
    pub(super) shared: Arc<AppShared>,
    /// It broke the protocol: its ring is not served any more; detached soon.
    pub(super) condemned: bool,
}

impl Proc {
    /// Drops socket `sock`'s event registration (its descriptors close once
    /// the notifier lets go of them).
    pub(super) fn unregister_events(&mut self, sock: u32) {
        if let Some(r) = self.events.remove(&sock) {
            self.event_fds -= r.descriptors();
        }
    }
}

pub(super) fn errno(e: i32) -> Option<i64> {
    Some(-i64::from(e))
}

impl Node {
    pub(super) fn attach(&mut self, app: Arc<AppShared>, cmds: Consumer) {
        app.region
            .header()
            .subnets_epoch
            .store(self.addrs_seen, Ordering::Release);
        self.proc_ids.push(app.id);
        self.procs.insert(
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

    /// A process leaves: everything it held is released (its listeners refuse
    /// their queues), its event descriptors are closed, and its region is
    /// marked closed.
    pub(super) fn detach(&mut self, now: Instant, id: u64) {
        self.detach_for(now, id, crate::wire::ResetReason::ProcessGone);
    }

    /// [`detach`](Self::detach), resetting its connections for `reason`.
    pub(super) fn detach_for(&mut self, now: Instant, id: u64, reason: crate::wire::ResetReason) {
        if reason == crate::wire::ResetReason::ProcessGone {
            self.closes_left_by(now, id);
        }
        if reason != crate::wire::ResetReason::Shutdown {
            // What it shares with other processes stays theirs.
            self.hand_over_all(now, id);
        }
        self.reset_streams_of(now, id, reason);
        self.proc_ids.retain(|p| *p != id);
        if let Some(p) = self.procs.remove(&id) {
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
                self.release(now, obj);
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
    fn closes_left_by(&mut self, now: Instant, id: u64) {
        // At most one ring's worth: a process still alive (a violator, or
        // one that shut its control socket) may keep pushing.
        let Some(bound) = self.procs.get(&id).map(|p| p.cmds.capacity()) else {
            return;
        };
        for _ in 0..bound {
            let Some(p) = self.procs.get_mut(&id) else {
                return;
            };
            let Ok(Some(slot)) = p.cmds.pop() else {
                return;
            };
            if let Ok(cmd) = Command::parse(&slot) {
                if matches!(cmd.op, Op::Close | Op::Abort) {
                    self.app_command(now, id, cmd);
                }
            }
        }
    }

    /// The process broke the channel's protocol: it is condemned (nothing
    /// more of its ring is served) and detached by [`Node::reap`] once no
    /// walk over the process list is under way; everyone else carries on.
    pub(super) fn violation(&mut self, _now: Instant, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if !p.condemned {
            p.condemned = true;
            self.local.app_protocol_violations += 1;
            self.condemned.push(id);
        }
    }

    /// Detaches the processes condemned since the last call. Returns
    /// whether there were any.
    pub(crate) fn reap(&mut self, now: Instant) -> bool {
        if self.condemned.is_empty() {
            return false;
        }
        let ids = std::mem::take(&mut self.condemned);
        for id in ids {
            self.detach(now, id);
        }
        true
    }

    /// Registers (replacing and closing any previous ones) the event
    /// descriptor of a process's socket and, if given, the descriptor
    /// FD_WRITE signals instead.
    ///
    /// # Errors
    /// ESRCH for an unknown process; EMFILE when its user (not root) would
    /// hold more than `uid_event_fds` event descriptors in the daemon.
    pub(super) fn set_event_fd(
        &mut self,
        id: u64,
        sock: u32,
        fd: OwnedFd,
        wfd: Option<OwnedFd>,
        direct: bool,
    ) -> Result<(), i32> {
        let Some(p) = self.procs.get(&id) else {
            return Err(libc::ESRCH);
        };
        let uid = p.shared.uid;
        let old = p.events.get(&sock).map_or(0, EventReg::descriptors);
        let new = 1 + u32::from(wfd.is_some());
        if uid != 0 && new > old {
            // The user's descriptors in every process (at most 64
            // attachments per user, so a short walk, only on registration).
            let held: u64 = self
                .procs
                .values()
                .filter(|q| q.shared.uid == uid)
                .map(|q| u64::from(q.event_fds))
                .sum();
            if held - u64::from(old) + u64::from(new) > u64::from(self.cfg.uid_event_fds) {
                self.local.quota_refusals[Quota::EventFds as usize] += 1;
                return Err(libc::EMFILE);
            }
        }
        let p = self.procs.get_mut(&id).expect("present");
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
    fn connections_full(&self, uid: u32) -> bool {
        self.quotas.connections_full(
            uid,
            self.streams.of_user(uid),
            self.cfg.proto.max_connections,
        )
    }

    /// Releases what a socket holds in the core.
    pub(super) fn release(&mut self, now: Instant, obj: SockObj) {
        match obj {
            SockObj::Listener { id, .. } => {
                self.groups.disband(&mut self.procs, id);
                let _ = self.ep.close_listener(now, id);
            }
            SockObj::Attempt { h, .. } | SockObj::Conn(h) => {
                self.conn_owner.remove(&h);
                let _ = self.ep.close(now, h);
            }
            SockObj::Ended | SockObj::Away(_) => {}
        }
    }

    /// Serves up to a burst of a process's commands. Returns whether there were any.
    pub(super) fn serve_app(&mut self, now: Instant, id: u64) -> bool {
        let mut busy = false;
        for _ in 0..crate::device::BURST {
            let Some(p) = self.procs.get_mut(&id).filter(|p| !p.condemned) else {
                return busy;
            };
            let slot = match p.cmds.pop() {
                Ok(Some(s)) => s,
                Ok(None) => return busy,
                Err(_) => {
                    self.violation(now, id);
                    return true;
                }
            };
            busy = true;
            match Command::parse(&slot) {
                Ok(cmd) => self.app_command(now, id, cmd),
                Err(e) => {
                    self.local.app_rejects[e.index()] += 1;
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

    fn app_command(&mut self, now: Instant, id: u64, cmd: Command) {
        let sock = cmd.sock;
        let app = self.procs[&id].shared.clone();
        let result = match cmd.op {
            Op::Listen {
                addr,
                backlog,
                area,
                bufs,
                takeover,
                reuse_port,
            } => self.app_listen(id, sock, addr, backlog, area, bufs, takeover, reuse_port),
            Op::Decide { key, verdict, .. } => self.app_decide(now, id, sock, key, verdict),
            Op::Connect {
                dst,
                src,
                src_port,
                nonblocking,
                bufs,
            } => self.app_connect(
                now,
                id,
                sock,
                cmd.seq,
                dst,
                (src, src_port),
                nonblocking,
                bufs,
            ),
            Op::Close | Op::Abort => {
                let abort = cmd.op == Op::Abort;
                let p = self.procs.get_mut(&id).expect("caller checked");
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
                    Some(SockObj::Conn(h)) if self.shared(h) && self.hand_back(now, h) => {}
                    Some(SockObj::Away(h)) => self.let_go(h, id, sock),
                    Some(SockObj::Conn(h)) if abort && self.abort_stream(now, h) => {}
                    Some(SockObj::Conn(h)) if !abort && self.close_stream(now, h) => {}
                    Some(obj) => self.release(now, obj),
                    None => {}
                }
                Some(0)
            }
            Op::Kick => {
                self.kick(now, id, sock);
                None
            }
            Op::Claim {
                from_app,
                from_sock,
                key,
            } => self.app_claim(now, id, sock, (from_app, from_sock), key),
            Op::EventSelect { mask } => {
                let p = self.procs.get_mut(&id).expect("caller checked");
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

    #[allow(clippy::too_many_arguments)]
    fn app_listen(
        &mut self,
        id: u64,
        sock: u32,
        addr: SocketAddrV4,
        backlog: i32,
        area: u16,
        bufs: Bufs,
        takeover: u32,
        reuse_port: bool,
    ) -> Option<i64> {
        let p = &self.procs[&id];
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
            self.local.listen_denials[1] += 1;
            return errno(libc::EACCES);
        }
        if let Some(set) = &self.cfg.proto.tcp_listening {
            let theirs = match set.owner(a.1) {
                PortOwner::Uid(u) => u != uid,
                PortOwner::Mixed => true,
                PortOwner::Nobody => false,
            };
            if theirs && uid != 0 {
                self.local.listen_denials[0] += 1;
                return errno(libc::EACCES);
            }
        }
        // A forked child takes the address over from its parent's listener
        // (checked: the listener belongs to an attachment of that pid, that
        // process, proven by its pidfd, was this process's parent when it
        // attached, and both are the same user).
        let from = (takeover != 0)
            .then(|| self.ep.listener_at(a))
            .flatten()
            .filter(|l| {
                self.groups
                    .owner(*l)
                    .and_then(|(owner, _)| self.procs.get(&owner))
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
            if let Some(l) = self.ep.listener_at(a).filter(|l| {
                (takeover != 0 && self.groups.may_join(&self.procs, *l, id, takeover))
                    || (reuse_port && self.groups.may_share(&self.procs, *l, id))
            }) {
                let cap = self.ep.backlog(l).map_or(1, |b| b.1);
                let p = self.procs.get_mut(&id).expect("present");
                let Ok(ring) = p.shared.region.format_backlog(usize::from(area), cap) else {
                    return errno(libc::EINVAL);
                };
                p.backlogs.insert(sock, ring);
                p.socks
                    .insert(sock, SockObj::Listener { id: l, area, bufs });
                self.groups.join(l, id, sock);
                self.local.listener_joins += 1;
                return Some(cap as i64);
            }
        }
        // One user's share of the host's listeners.
        if !self.quotas.take_listener(uid) {
            self.local.quota_refusals[Quota::Listeners as usize] += 1;
            return errno(libc::EMFILE);
        }
        let listened = match from {
            Some(f) => self.ep.listen_over(a, i64::from(backlog), f),
            None => self.ep.listen(a, i64::from(backlog)),
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
        let cap = self.ep.backlog(l).map_or(1, |b| b.1);
        let p = self.procs.get_mut(&id).expect("present");
        // The area is not in use by another listener of this process (checked above).
        let ring = match p.shared.region.format_backlog(usize::from(area), cap) {
            Ok(r) => r,
            Err(_) => {
                let _ = self.ep.close_listener(Instant::ZERO, l);
                return errno(libc::EINVAL);
            }
        };
        p.backlogs.insert(sock, ring);
        p.socks
            .insert(sock, SockObj::Listener { id: l, area, bufs });
        self.groups.listen(l, id, sock, reuse_port);
        Some(cap as i64)
    }

    fn app_decide(
        &mut self,
        now: Instant,
        id: u64,
        sock: u32,
        key: RequestKey,
        verdict: Verdict,
    ) -> Option<i64> {
        self.trace.stamp(key.conn_id, super::Hop::DecisionSeen);
        let p = &self.procs[&id];
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
        if d == Decision::Accept && self.connections_full(p.shared.uid) {
            self.local.quota_refusals[Quota::Connections as usize] += 1;
            return errno(libc::ENOBUFS);
        }
        let offer = self.cfg.proto.offer(bufs.rcv as u32);
        match self.ep.decide_with(now, l, key, d, offer) {
            Ok(Some(h)) => {
                let new_sock = new_sock.expect("accepted");
                let params = self
                    .ep
                    .connection(h)
                    .expect("just accepted")
                    .stream_params();
                let p = self.procs.get_mut(&id).expect("present");
                p.socks.insert(new_sock, SockObj::Conn(h));
                self.conn_owner.insert(h, (id, new_sock));
                self.open_stream(now, h, id, new_sock, bufs, params);
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
    fn app_connect(
        &mut self,
        now: Instant,
        id: u64,
        sock: u32,
        seq: u32,
        dst: SocketAddrV4,
        (src, src_port): (Option<std::net::Ipv4Addr>, u16),
        nonblocking: bool,
        bufs: Bufs,
    ) -> Option<i64> {
        match self.procs[&id].socks.get(&sock) {
            Some(SockObj::Attempt { .. }) => return errno(libc::EALREADY),
            Some(SockObj::Conn(_)) => return errno(libc::EISCONN),
            Some(SockObj::Listener { .. }) => return errno(libc::EINVAL),
            _ => {}
        }
        // A source port below 1024 needs the right, as a kernel bind does.
        if src_port != 0 && src_port < 1024 && !self.procs[&id].shared.low_ports {
            return errno(libc::EACCES);
        }
        // One user's share of the host's connect attempts (EAGAIN, as a
        // kernel out of local ports answers).
        let uid = self.procs[&id].shared.uid;
        if self.connections_full(uid) {
            self.local.quota_refusals[Quota::Connections as usize] += 1;
            return errno(libc::EAGAIN);
        }
        if !self.quotas.take_attempt(uid) {
            self.local.quota_refusals[Quota::Attempts as usize] += 1;
            return errno(libc::EAGAIN);
        }
        let offer = self.cfg.proto.offer(bufs.rcv as u32);
        let h = match self
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
                        self.local.quota_refusals[Quota::Resolutions as usize] += 1;
                        errno(libc::EAGAIN)
                    }
                    _ => errno(libc::EAGAIN),
                };
            }
        };
        let p = self.procs.get_mut(&id).expect("present");
        let s = p.shared.region.sock(sock as usize);
        s.connect_state.store(0, Ordering::Relaxed);
        if let Some((local, _, _)) = self.ep.attempt(h) {
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
        self.conn_owner.insert(h, (id, sock));
        if self.trace.on() {
            if let Some((_, _, wire_id)) = self.ep.attempt(h) {
                self.trace.connect(h, wire_id);
            }
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
    pub(super) fn revoke_foreign_listeners(&mut self, now: Instant) {
        let Some(set) = self.cfg.proto.tcp_listening.clone() else {
            return;
        };
        let v = set.version();
        if v == self.owners_seen {
            return;
        }
        self.owners_seen = v;
        let mut foreign: Vec<(ListenerId, u64, u32)> = Vec::new();
        for (l, addr, _, _) in self.ep.listeners() {
            let Some((pid, sock)) = self.groups.owner(l) else {
                continue;
            };
            let Some(p) = self.procs.get(&pid) else {
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
            self.local.listen_denials[2] += 1;
            // Its sibling workers' sockets learn it too.
            for (mpid, msock) in self.groups.disband(&mut self.procs, l) {
                if let Some(p) = self.procs.get(&mpid) {
                    let sh = p.shared.region.sock(msock as usize);
                    sh.accept_error.store(-libc::EACCES, Ordering::Release);
                    if !raise(sh, p.events.get(&msock), FD_ACCEPT) {
                        self.local.event_signal_failed += 1;
                    }
                }
            }
            let _ = self.ep.close_listener(now, l);
            if let Some(p) = self.procs.get_mut(&pid) {
                if let Some(o) = p.socks.remove(&sock) {
                    let uid = p.shared.uid;
                    self.quotas.release(uid, &o);
                }
                let Some(p) = self.procs.get_mut(&pid) else {
                    continue;
                };
                p.backlogs.remove(&sock);
                let sh = p.shared.region.sock(sock as usize);
                sh.accept_error.store(-libc::EACCES, Ordering::Release);
                if !raise(sh, p.events.get(&sock), FD_ACCEPT) {
                    self.local.event_signal_failed += 1;
                }
            }
        }
    }
}
