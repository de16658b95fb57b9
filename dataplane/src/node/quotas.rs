//! One user's shares of what the host has a limited number of: SAN
//! listeners, connect attempts in progress and, with the streams each user
//! serves, connections (root has no share: it is never refused here).

use super::procs::SockObj;
use std::collections::HashMap;

/// SAN listeners one user (other than root) may hold at once, in all its
/// processes: a quarter of the host's (`max_listeners`, 4,096), so that one
/// user cannot take every listener of the host.
pub const UID_LISTENERS: u32 = 1024;
/// Connect attempts in progress one user (other than root) may have at
/// once: a quarter of the host's (`max_attempts`, 65,536).
pub const UID_ATTEMPTS: u32 = 16384;

/// Per user (not root): SAN listeners and connect attempts held, against
/// [`UID_LISTENERS`] and [`UID_ATTEMPTS`].
#[derive(Default)]
pub(super) struct Quotas {
    listeners: HashMap<u32, u32>,
    attempts: HashMap<u32, u32>,
}

impl Quotas {
    /// Takes one of `uid`'s listeners: false when its share is used up.
    pub(super) fn take_listener(&mut self, uid: u32) -> bool {
        take(&mut self.listeners, uid, UID_LISTENERS)
    }

    /// Gives one of `uid`'s listeners back.
    pub(super) fn give_listener(&mut self, uid: u32) {
        sub(&mut self.listeners, uid);
    }

    /// Takes one of `uid`'s connect attempts: false when its share is used up.
    pub(super) fn take_attempt(&mut self, uid: u32) -> bool {
        take(&mut self.attempts, uid, UID_ATTEMPTS)
    }

    /// An attempt of `uid`'s ended.
    pub(super) fn give_attempt(&mut self, uid: u32) {
        sub(&mut self.attempts, uid);
    }

    /// Whether user `uid` (not root), serving `connections` connections,
    /// holds with its attempts in progress as many as its share of the
    /// host's `max_connections` (a quarter) allows.
    pub(super) fn connections_full(
        &self,
        uid: u32,
        connections: u32,
        max_connections: usize,
    ) -> bool {
        let held = connections + self.attempts.get(&uid).copied().unwrap_or(0);
        uid != 0 && held as usize >= (max_connections / 4).max(1)
    }

    /// A socket of a process of user `uid` goes: its counts drop.
    pub(super) fn release(&mut self, uid: u32, obj: &SockObj) {
        match obj {
            SockObj::Listener { .. } => self.give_listener(uid),
            SockObj::Attempt { .. } => self.give_attempt(uid),
            _ => {}
        }
    }
}

/// One fewer of a user's count (root has none).
fn sub(m: &mut HashMap<u32, u32>, uid: u32) {
    if let Some(n) = m.get_mut(&uid) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(&uid);
        }
    }
}

/// Takes one of a user's share (root has none): false when it is used up.
fn take(m: &mut HashMap<u32, u32>, uid: u32, max: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let n = m.entry(uid).or_insert(0);
    if *n >= max {
        return false;
    }
    *n += 1;
    true
}
