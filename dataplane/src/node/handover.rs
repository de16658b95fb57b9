//! A connection held by more than one process: a socket inherited across
//! fork (`docs/architecture.md`, "Sockets shared across fork").
//!
//! Before a process forks, each of its SAN connections gets a *life*: the
//! read end of a pipe that the daemon holds, while the process holds the
//! write end (close-on-exec) beside the socket, so that every process that
//! inherits the socket inherits the write end too. The kernel counts the
//! holders: the read end hangs up once the last copy of the write end is
//! gone (closed, or its process exited, died or exec'd), whoever held it.
//!
//! One socket serves the connection at a time (its rings are the
//! connection's). A process that can read the connection's claim key (from
//! its parent's region, which a forked child has mapped) moves the
//! connection to a socket of its own ([`Op::Claim`](dsan_channel::msg::Op::Claim));
//! the socket it came from is then *away* ([`SockObj::Away`], its block
//! marked `ST_MOVED`; its next call takes the connection back). When the
//! serving socket lets go (close, abort, exit) the connection moves to a
//! socket still holding it; with none left but a life still held (a child
//! that has not claimed it yet) it is an *orphan*: its socket slot lingers
//! with its rings until a claim takes it or the life hangs up, and only
//! then does it close. So a connection ends with its last holder, as a TCP
//! socket shared across fork does.

use super::apps::{errno, SockObj};
use super::counters::Quota;
use super::Node;
use crate::proto::ConnHandle;
use crate::time::Instant;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// How often orphans' lives are looked at (a child that exits without
/// claiming or closing its copy: its connection closes this much later).
const ORPHAN_CHECK: Duration = Duration::from_millis(10);

/// Whether some process still holds the write end of the pipe whose read
/// end is `fd` (no hang-up reported).
fn held(fd: &OwnedFd) -> bool {
    !dsan_channel::sys::hung_up(fd.as_raw_fd())
}

/// A connection's life: the read end the daemon holds, the process that
/// registered it (its share of event descriptors counts it), and the
/// pipe's inode (which names the life to a holder of a write end).
#[derive(Debug)]
pub(super) struct Life {
    fd: OwnedFd,
    owner: u64,
    ino: u64,
}

impl Node {
    /// Registers the life of the connection socket `sock` of process `app`
    /// holds (see the module docs). One per connection: a second is
    /// dropped. Counted against the user's share of event descriptors.
    ///
    /// # Errors
    /// ESRCH (no such process), ENOTCONN (no connection there), EMFILE
    /// (the user's share is used up).
    pub(super) fn set_life(&mut self, app: u64, sock: u32, fd: OwnedFd) -> Result<(), i32> {
        let p = self.procs.get(&app).ok_or(libc::ESRCH)?;
        let h = match p.socks.get(&sock) {
            Some(SockObj::Conn(h) | SockObj::Away(h)) => *h,
            _ => return Err(libc::ENOTCONN),
        };
        if self.streams.get(&h).is_none() {
            return Err(libc::ENOTCONN);
        }
        if self.life.contains_key(&h) {
            return Ok(());
        }
        let uid = p.shared.uid;
        if uid != 0 {
            let used: u64 = self
                .procs
                .values()
                .filter(|q| q.shared.uid == uid)
                .map(|q| u64::from(q.event_fds))
                .sum();
            if used + 1 > u64::from(self.cfg.uid_event_fds) {
                self.local.quota_refusals[Quota::EventFds as usize] += 1;
                return Err(libc::EMFILE);
            }
        }
        let Some(ino) = dsan_channel::sys::pipe_inode(fd.as_raw_fd()) else {
            return Err(libc::EINVAL);
        };
        self.procs.get_mut(&app).expect("present").event_fds += 1;
        self.life.insert(
            h,
            Life {
                fd,
                owner: app,
                ino,
            },
        );
        let key = self.claim_key(h);
        self.claimable.insert(key, h);
        Ok(())
    }

    /// Whether other sockets or processes may hold `h` (one holds it from
    /// afar, or it has a life): its serving socket's close hands it back.
    pub(super) fn shared(&self, h: ConnHandle) -> bool {
        self.away.contains_key(&h) || self.life.contains_key(&h)
    }

    /// Whether a process other than the one letting go still holds `h`
    /// (its life has not hung up).
    fn life_held(&self, h: ConnHandle) -> bool {
        self.life.get(&h).is_some_and(|l| held(&l.fd))
    }

    /// Connection `h` ended: its life and claim key go.
    pub(super) fn forget_shared(&mut self, h: ConnHandle) {
        if let Some(Life { owner, .. }) = self.life.remove(&h) {
            if let Some(p) = self.procs.get_mut(&owner) {
                p.event_fds = p.event_fds.saturating_sub(1);
            }
            let key = self.claim_key(h);
            self.claimable.remove(&key);
        }
        self.orphans.retain(|o| *o != h);
    }

    /// The claim key of the connection whose life is the pipe `ino`, for
    /// process `app`, which holds a write end of it (the control thread
    /// took the inode from the descriptor the process sent): a socket
    /// received in an `SCM_RIGHTS` message comes with its life, and a
    /// holder of the life holds the connection. The claim itself is then
    /// [`Node::app_claim`]'s (which checks the user again). A walk over the
    /// lives, only on such a request.
    ///
    /// # Errors
    /// ESRCH (no such process), ENOTCONN (no such life: the connection
    /// ended), EACCES (another user's connection; counted as a refused
    /// claim).
    pub(super) fn life_key(&mut self, app: u64, ino: u64) -> Result<u64, i32> {
        let uid = self.procs.get(&app).ok_or(libc::ESRCH)?.shared.uid;
        let h = self
            .life
            .iter()
            .find(|(_, l)| l.ino == ino)
            .map(|(h, _)| *h)
            .ok_or(libc::ENOTCONN)?;
        let (_, _, suid, _) = self.serving(h).ok_or(libc::ENOTCONN)?;
        if uid != 0 && uid != suid {
            self.local.claims_refused += 1;
            return Err(libc::EACCES);
        }
        Ok(self.claim_key(h))
    }

    /// Socket `sock` of process `id` claims the connection whose claim key
    /// is `key`; `from` names the socket it knew it by (itself, for a
    /// socket taking back a connection that moved away). Checked: the key
    /// names a connection that someone may share (it has a life), of the
    /// claimer's user (or the claimer is root), and `sock` is free (or is
    /// that very socket, away).
    pub(super) fn app_claim(
        &mut self,
        now: Instant,
        id: u64,
        sock: u32,
        from: (u64, u32),
        key: u64,
    ) -> Option<i64> {
        let Some(&h) = self.claimable.get(&key) else {
            self.local.claims_refused += 1;
            return errno(libc::EBADF);
        };
        let Some((spid, ssock, suid, orphan)) = self.serving(h) else {
            return errno(libc::ENOTCONN);
        };
        let me = &self.procs[&id];
        if me.shared.uid != 0 && me.shared.uid != suid {
            self.local.claims_refused += 1;
            return errno(libc::EACCES);
        }
        match me.socks.get(&sock) {
            None if from != (id, sock) => {}
            Some(SockObj::Away(x)) if from == (id, sock) && *x == h => {}
            Some(SockObj::Conn(x)) if *x == h => return Some(0),
            _ => return errno(libc::EINVAL),
        }
        if !self.move_stream(now, h, id, sock) {
            return errno(libc::ENOTCONN);
        }
        let list = self.away.entry(h).or_default();
        list.retain(|x| *x != (id, sock));
        if !orphan {
            list.push((spid, ssock));
        }
        if list.is_empty() {
            self.away.remove(&h);
        }
        if !orphan {
            if let Some(p) = self.procs.get_mut(&spid) {
                p.socks.insert(ssock, SockObj::Away(h));
            }
        }
        self.orphans.retain(|o| *o != h);
        if let Some(p) = self.procs.get_mut(&id) {
            p.socks.insert(sock, SockObj::Conn(h));
        }
        Some(0)
    }

    /// Socket `sock` of process `id`, which held `h` from afar, lets go of it.
    pub(super) fn let_go(&mut self, h: ConnHandle, id: u64, sock: u32) {
        if let Some(list) = self.away.get_mut(&h) {
            list.retain(|x| *x != (id, sock));
            if list.is_empty() {
                self.away.remove(&h);
            }
        }
    }

    /// The socket serving `h` lets go of it (its close, or its process
    /// leaving): true if the connection stays open, moved to another socket
    /// holding it or kept as an orphan for a process that holds it without
    /// having claimed it yet; false when nobody else holds it.
    pub(super) fn hand_back(&mut self, now: Instant, h: ConnHandle) -> bool {
        while let Some(next) = self.away.get_mut(&h).and_then(Vec::pop) {
            let holds = self.procs.get(&next.0).is_some_and(|p| {
                !p.condemned && matches!(p.socks.get(&next.1), Some(SockObj::Away(x)) if *x == h)
            });
            if holds && self.move_stream(now, h, next.0, next.1) {
                if let Some(p) = self.procs.get_mut(&next.0) {
                    p.socks.insert(next.1, SockObj::Conn(h));
                }
                if self.away.get(&h).is_some_and(Vec::is_empty) {
                    self.away.remove(&h);
                }
                return true;
            }
        }
        self.away.remove(&h);
        if self.life_held(h) && self.orphan_stream(h) {
            self.orphans.push(h);
            return true;
        }
        false
    }

    /// Process `id` leaves: the sockets through which it held connections
    /// from afar let go, and the connections it served stay with their
    /// other holders. Returns the sockets done with here (the caller
    /// releases the rest).
    pub(super) fn hand_over_all(&mut self, now: Instant, id: u64) -> Vec<u32> {
        let Some(p) = self.procs.get(&id) else {
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
                    self.let_go(h, id, sock);
                    done.push(sock);
                }
                SockObj::Conn(h) if self.shared(h) && self.hand_back(now, h) => {
                    done.push(sock);
                }
                _ => {}
            }
        }
        if let Some(p) = self.procs.get_mut(&id) {
            for s in &done {
                p.socks.remove(s);
            }
        }
        done
    }

    /// Orphans whose life hung up (every holder is gone without claiming
    /// them) close now, as their last holder's close would have. Looked at
    /// every [`ORPHAN_CHECK`].
    pub(super) fn check_orphans(&mut self, now: Instant) {
        if self.orphans.is_empty() || now < self.orphan_check_at {
            return;
        }
        self.orphan_check_at = now + ORPHAN_CHECK;
        let gone: Vec<ConnHandle> = self
            .orphans
            .iter()
            .copied()
            .filter(|h| !self.life_held(*h))
            .collect();
        for h in gone {
            self.orphans.retain(|o| *o != h);
            self.close_orphan(now, h);
        }
    }

    /// When the orphans are next looked at.
    pub(super) fn next_orphan_check(&self) -> Option<Instant> {
        (!self.orphans.is_empty()).then_some(self.orphan_check_at)
    }
}
