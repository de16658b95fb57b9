//! The process table: what the lcore knows of each attached process (its
//! region, command ring, sockets and what each is in the protocol core,
//! its event descriptors), and the signals to its sockets.

use super::signal::{raise, EventReg};
use crate::proto::{ConnHandle, ListenerId};
use dsan_channel::msg::Bufs;
use dsan_channel::region::Region;
use dsan_channel::ring::{Consumer, Producer};
use dsan_channel::sys::EventFd;
use std::collections::HashMap;
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

/// The attached processes, by attachment id, and the order the loop walks
/// them in.
#[derive(Default)]
pub(super) struct Procs {
    pub(super) map: HashMap<u64, Proc>,
    /// The keys of `map`, for the loop to walk without allocating.
    pub(super) ids: Vec<u64>,
    /// Processes that broke the channel's protocol, detached by
    /// [`Apps::reap`](super::apps::Apps::reap) once nothing walks the process list (never from
    /// inside a walk: a detach changes `ids`).
    pub(super) condemned: Vec<u64>,
}

impl Procs {
    pub(super) fn get(&self, id: u64) -> Option<&Proc> {
        self.map.get(&id)
    }
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Proc> {
        self.map.get_mut(&id)
    }
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
    pub(super) fn values(&self) -> impl Iterator<Item = &Proc> {
        self.map.values()
    }
    /// The attachments, in the order they attached.
    pub(super) fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Raises event `bit` on socket `sock` of process `pid`. False if a
    /// selected event descriptor could not be signalled (a process that is
    /// gone has nothing to signal: true).
    pub(super) fn signal(&self, pid: u64, sock: u32, bit: u32) -> bool {
        self.map.get(&pid).is_none_or(|p| {
            raise(
                p.shared.region.sock(sock as usize),
                p.events.get(&sock),
                bit,
            )
        })
    }

    /// Event descriptors (and lives) the processes of user `uid` hold in
    /// the daemon (at most 64 attachments per user: a short walk, only on
    /// registration).
    pub(super) fn user_event_fds(&self, uid: u32) -> u64 {
        self.map
            .values()
            .filter(|q| q.shared.uid == uid)
            .map(|q| u64::from(q.event_fds))
            .sum()
    }
}
