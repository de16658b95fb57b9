//! Tombstones: what became of finished requests, so that a retransmitted
//! request gets the same answer as the first (never a second backlog entry),
//! and of connections a client reset, so that a retransmitted Accept learns
//! the reset again.

use crate::time::Instant;
use crate::wire::{RejectReason, ResetReason};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Entries forgotten when their time is up, and the oldest first when the
/// table is full.
pub(super) struct Expiring<K, V> {
    map: HashMap<K, (V, Instant)>,
    /// (key, expiry) in the order remembered; an entry whose key was
    /// remembered again later is skipped when it comes up.
    order: VecDeque<(K, Instant)>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Copy + Eq + Hash, V> Expiring<K, V> {
    /// Remembers `v` for `key` until `expiry`, forgetting the oldest entry
    /// first if `max` are held. Returns whether one was forgotten so.
    pub(super) fn remember(&mut self, key: K, v: V, expiry: Instant, max: usize) -> bool {
        let mut evicted = false;
        if self.map.len() >= max {
            if let Some((old, exp)) = self.order.pop_front() {
                self.forget_if(old, exp);
                evicted = true;
            }
        }
        self.map.insert(key, (v, expiry));
        self.order.push_back((key, expiry));
        evicted
    }

    fn forget_if(&mut self, key: K, expiry: Instant) {
        if self.map.get(&key).is_some_and(|t| t.1 == expiry) {
            self.map.remove(&key);
        }
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Forgets the entries whose time is up at `now`.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(key, exp)) = self.order.front() {
            if exp > now {
                break;
            }
            self.order.pop_front();
            self.forget_if(key, exp);
        }
    }

    /// When the next entry's time is up.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|(_, e)| *e)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What a finished request's retransmissions are answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tomb {
    /// It was refused (or expired): replay the refusal.
    Refused {
        client_token: u64,
        reason: RejectReason,
    },
    /// It was accepted and the connection has since ended: replay the accept
    /// and how it ended (a Close, or a Reset with its reason), so the client
    /// learns both; a reset is never replayed as a clean close.
    Closed {
        client_token: u64,
        server_token: u64,
        reset: Option<ResetReason>,
        /// Its client never confirmed it (it was forgotten without a Close).
        unconfirmed: bool,
    },
}

impl Tomb {
    pub(super) fn client_token(&self) -> u64 {
        match *self {
            Tomb::Refused { client_token, .. } | Tomb::Closed { client_token, .. } => client_token,
        }
    }
}
