//! Listeners shared by forked workers (nginx, gunicorn, pre-fork servers):
//! a parent listens, forks workers, and every worker accepts; and by
//! processes of one user that each listen on the address with SO_REUSEPORT
//! (the first one's listener is joined by the others).
//!
//! The first worker to use the inherited listener takes the SAN address over
//! from its parent (`Op::Listen`'s take-over pid; the parent, often a
//! master that never accepts, gets no more requests). Each later worker of
//! the same parent *joins* that listener: it gets a backlog ring of its own
//! in its region, and the requests that arrive are handed to the group's
//! members in turn (a member whose ring is full is skipped). A member that
//! leaves takes only its own ring with it; when the owner leaves, a member
//! becomes the owner, and the listener closes with its last member.

use super::procs::{Proc, SockObj};
use crate::proto::ListenerId;
use std::collections::{HashMap, HashSet};

/// Which sockets serve each SAN listener: its owner, the members that
/// joined it, whose turn it is, and which listeners were made with
/// SO_REUSEPORT.
#[derive(Default)]
pub(super) struct Groups {
    owner: HashMap<ListenerId, (u64, u32)>,
    /// The members besides the owner.
    joined: HashMap<ListenerId, Vec<(u64, u32)>>,
    turns: HashMap<ListenerId, usize>,
    reuse_port: HashSet<ListenerId>,
    /// Scratch for a request's candidate sockets (kept: no allocation per
    /// request).
    buf: Vec<(u64, u32)>,
}

type ProcMap = HashMap<u64, Proc>;

impl Groups {
    /// The socket that owns listener `l`.
    pub(super) fn owner(&self, l: ListenerId) -> Option<(u64, u32)> {
        self.owner.get(&l).copied()
    }

    /// Socket `sock` of process `id` made listener `l` (with SO_REUSEPORT
    /// if `reuse_port`).
    pub(super) fn listen(&mut self, l: ListenerId, id: u64, sock: u32, reuse_port: bool) {
        self.owner.insert(l, (id, sock));
        if reuse_port {
            self.reuse_port.insert(l);
        }
    }

    /// Whether process `id` (whose parent is `ppid`) may join listener `l`:
    /// its owner is a sibling (the same parent, proven by pidfds where there
    /// are), not the process itself, of the same user.
    pub(super) fn may_join(&self, procs: &ProcMap, l: ListenerId, id: u64, ppid: u32) -> bool {
        let Some(me) = procs.get(&id) else {
            return false;
        };
        self.owner
            .get(&l)
            .filter(|(owner, _)| *owner != id)
            .and_then(|(owner, _)| procs.get(owner))
            .is_some_and(|o| {
                o.shared.uid == me.shared.uid
                    && o.shared.lineage.ppid == ppid
                    && me.shared.lineage.sibling_of(&o.shared.lineage)
            })
    }

    /// Whether process `id` may join listener `l` with SO_REUSEPORT: the
    /// listener was made with it, and its owner is another process of the
    /// same user (as the kernel groups TCP listeners: same address, the
    /// option on every socket, one effective user).
    pub(super) fn may_share(&self, procs: &ProcMap, l: ListenerId, id: u64) -> bool {
        let Some(me) = procs.get(&id) else {
            return false;
        };
        self.reuse_port.contains(&l)
            && self
                .owner
                .get(&l)
                .filter(|(owner, _)| *owner != id)
                .and_then(|(owner, _)| procs.get(owner))
                .is_some_and(|o| o.shared.uid == me.shared.uid)
    }

    /// Socket `sock` of process `id` is a member of listener `l` now.
    pub(super) fn join(&mut self, l: ListenerId, id: u64, sock: u32) {
        self.joined.entry(l).or_default().push((id, sock));
    }

    /// Every socket requests for `l` may go to, in the order to try them
    /// (the owner, then the members, turning by one each time). Give the
    /// list back with [`Groups::done_with`] (no allocation once it has
    /// grown).
    pub(super) fn members(&mut self, l: ListenerId) -> Vec<(u64, u32)> {
        let mut out = std::mem::take(&mut self.buf);
        out.clear();
        let Some(owner) = self.owner.get(&l).copied() else {
            return out;
        };
        out.push(owner);
        if let Some(more) = self.joined.get(&l).filter(|m| !m.is_empty()) {
            out.extend_from_slice(more);
            let turn = self.turns.entry(l).or_insert(0);
            let start = *turn % out.len();
            *turn = turn.wrapping_add(1);
            out.rotate_left(start);
        }
        out
    }

    /// The list [`Groups::members`] gave.
    pub(super) fn done_with(&mut self, members: Vec<(u64, u32)>) {
        self.buf = members;
    }

    /// Socket `sock` of process `id`, a socket of listener `l`, leaves the
    /// group. True if the listener lives on (with its other members: an
    /// owner that leaves hands the listener to one); false if `sock` was
    /// its only socket (the caller closes it).
    fn leave(&mut self, l: ListenerId, id: u64, sock: u32) -> bool {
        let Some(members) = self.joined.get_mut(&l) else {
            return false;
        };
        let was_member = members.contains(&(id, sock));
        members.retain(|m| *m != (id, sock));
        let owner_left = self.owner.get(&l) == Some(&(id, sock));
        let next = if owner_left { members.pop() } else { None };
        if members.is_empty() {
            self.joined.remove(&l);
            self.turns.remove(&l);
        }
        if let Some(n) = next {
            self.owner.insert(l, n);
            return true;
        }
        was_member
    }

    /// Listener `l` closes: it has no owner any more, and its members'
    /// sockets (in `procs`) learn it (the owner's is the caller's
    /// business). Returns the members.
    pub(super) fn disband(&mut self, procs: &mut ProcMap, l: ListenerId) -> Vec<(u64, u32)> {
        self.owner.remove(&l);
        self.turns.remove(&l);
        self.reuse_port.remove(&l);
        let members = self.joined.remove(&l).unwrap_or_default();
        for (pid, sock) in &members {
            if let Some(p) = procs.get_mut(pid) {
                p.socks.remove(sock);
                p.backlogs.remove(sock);
            }
        }
        members
    }

    /// Whether `obj` of process `id`'s socket `sock` is a listener that
    /// lives on without it (see [`Groups::leave`]); closes nothing.
    pub(super) fn left_group(&mut self, id: u64, sock: u32, obj: &SockObj) -> bool {
        match obj {
            SockObj::Listener { id: l, .. } => self.leave(*l, id, sock),
            _ => false,
        }
    }
}
