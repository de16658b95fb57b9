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
//! the socket it came from is then *away* ([`SockObj::Away`](super::procs::SockObj::Away), its block
//! marked `ST_MOVED`; its next call takes the connection back). When the
//! serving socket lets go (close, abort, exit) the connection moves to a
//! socket still holding it; with none left but a life still held (a child
//! that has not claimed it yet) it is an *orphan*: its socket slot lingers
//! with its rings until a claim takes it or the life hangs up, and only
//! then does it close. So a connection ends with its last holder, as a TCP
//! socket shared across fork does.

use crate::proto::ConnHandle;
use crate::time::Instant;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
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
struct Life {
    fd: OwnedFd,
    owner: u64,
    ino: u64,
}

/// Who else holds each connection: the sockets that hold it from afar,
/// its life, its claim key, and the orphans. The moves themselves (rings
/// from one socket to another) are [`super::streams`]'; the claims and
/// hand-backs that decide them are [`super::apps`]'.
pub(super) struct Shares {
    /// Connections also held by sockets other than the one serving them
    /// (their rings moved away: a forked child claimed the connection):
    /// those sockets, by connection. Empty unless processes share one.
    away: HashMap<ConnHandle, Vec<(u64, u32)>>,
    /// The keys of every connection's claim key (see [`Shares::claim_key`]).
    keys: RandomState,
    /// Connections that processes may share: their lives ...
    life: HashMap<ConnHandle, Life>,
    /// ... and their claim keys.
    claimable: HashMap<u64, ConnHandle>,
    /// Connections no socket holds any more while a life still does.
    orphans: Vec<ConnHandle>,
    orphan_check_at: Instant,
}

impl Default for Shares {
    fn default() -> Shares {
        Shares {
            away: HashMap::new(),
            keys: RandomState::new(),
            life: HashMap::new(),
            claimable: HashMap::new(),
            orphans: Vec::new(),
            orphan_check_at: Instant::ZERO,
        }
    }
}

impl Shares {
    /// The claim key of connection `h`: SipHash of its handle under the
    /// daemon's random keys (nothing stored per connection; a process
    /// learns it only from a stream block the connection had in its region).
    pub(super) fn claim_key(&self, h: ConnHandle) -> u64 {
        self.keys.hash_one((h.slot(), h.tag()))
    }

    /// Whether other sockets or processes may hold `h` (one holds it from
    /// afar, or it has a life): its serving socket's close hands it back.
    pub(super) fn shared(&self, h: ConnHandle) -> bool {
        self.away.contains_key(&h) || self.life.contains_key(&h)
    }

    /// Whether `h` has a life.
    pub(super) fn has_life(&self, h: ConnHandle) -> bool {
        self.life.contains_key(&h)
    }

    /// Whether a process other than the one letting go still holds `h`
    /// (its life has not hung up).
    pub(super) fn life_held(&self, h: ConnHandle) -> bool {
        self.life.get(&h).is_some_and(|l| held(&l.fd))
    }

    /// `h`'s life is the pipe `fd` (inode `ino`), registered by process
    /// `owner`: `h` may be claimed from now on.
    pub(super) fn add_life(&mut self, h: ConnHandle, fd: OwnedFd, owner: u64, ino: u64) {
        self.life.insert(h, Life { fd, owner, ino });
        let key = self.claim_key(h);
        self.claimable.insert(key, h);
    }

    /// The connection claim key `key` names.
    pub(super) fn by_key(&self, key: u64) -> Option<ConnHandle> {
        self.claimable.get(&key).copied()
    }

    /// The connection whose life is the pipe with inode `ino` (a walk over
    /// the lives, only on a holder's request).
    pub(super) fn by_life(&self, ino: u64) -> Option<ConnHandle> {
        self.life
            .iter()
            .find(|(_, l)| l.ino == ino)
            .map(|(h, _)| *h)
    }

    /// Connection `h` ended: its life and claim key go, and it is no
    /// orphan. Returns the process that registered the life (its share of
    /// event descriptors counted it).
    pub(super) fn forget(&mut self, h: ConnHandle) -> Option<u64> {
        let owner = self.life.remove(&h).map(|Life { owner, .. }| {
            let key = self.claim_key(h);
            self.claimable.remove(&key);
            owner
        });
        self.orphans.retain(|o| *o != h);
        owner
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

    /// The next socket holding `h` from afar, taken off its list (the
    /// last one pushed first).
    pub(super) fn next_holder(&mut self, h: ConnHandle) -> Option<(u64, u32)> {
        self.away.get_mut(&h).and_then(Vec::pop)
    }

    /// `h` moved to a holder: its list goes if it is empty now.
    pub(super) fn tidy(&mut self, h: ConnHandle) {
        if self.away.get(&h).is_some_and(Vec::is_empty) {
            self.away.remove(&h);
        }
    }

    /// Nobody holds `h` from afar any more; returns who did.
    pub(super) fn take_away(&mut self, h: ConnHandle) -> Option<Vec<(u64, u32)>> {
        self.away.remove(&h)
    }

    /// `claimer` claimed `h`: it holds it from afar no more, and `previous`
    /// (the socket that served it, unless it was an orphan) does now.
    pub(super) fn claimed(
        &mut self,
        h: ConnHandle,
        claimer: (u64, u32),
        previous: Option<(u64, u32)>,
    ) {
        let list = self.away.entry(h).or_default();
        list.retain(|x| *x != claimer);
        if let Some(p) = previous {
            list.push(p);
        }
        if list.is_empty() {
            self.away.remove(&h);
        }
        self.orphans.retain(|o| *o != h);
    }

    /// `h` is an orphan now: no socket holds it, its life does.
    pub(super) fn orphan(&mut self, h: ConnHandle) {
        self.orphans.push(h);
    }

    /// Orphans whose life hung up (every holder is gone without claiming
    /// them), taken off the list: they close now, as their last holder's
    /// close would have. Looked at every [`ORPHAN_CHECK`].
    pub(super) fn hung_up_orphans(&mut self, now: Instant) -> Vec<ConnHandle> {
        if self.orphans.is_empty() || now < self.orphan_check_at {
            return Vec::new();
        }
        self.orphan_check_at = now + ORPHAN_CHECK;
        let gone: Vec<ConnHandle> = self
            .orphans
            .iter()
            .copied()
            .filter(|h| !self.life_held(*h))
            .collect();
        self.orphans.retain(|o| !gone.contains(o));
        gone
    }

    /// When the orphans are next looked at.
    pub(super) fn next_orphan_check(&self) -> Option<Instant> {
        (!self.orphans.is_empty()).then_some(self.orphan_check_at)
    }
}
