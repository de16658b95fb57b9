//! Tombstones: what became of finished requests, so that a retransmitted
//! request gets the same answer as the first (never a second backlog entry).

use super::endpoint::Endpoint;
use super::rng::Rng;
use super::types::*;
use crate::time::Instant;
use crate::wire::{Message, RejectReason, ResetReason, SanHeader};

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
    fn client_token(&self) -> u64 {
        match *self {
            Tomb::Refused { client_token, .. } | Tomb::Closed { client_token, .. } => client_token,
        }
    }
}

impl<R: Rng> Endpoint<R> {
    pub(super) fn remember(&mut self, now: Instant, key: RequestKey, tomb: Tomb) {
        if self.tombstones.len() >= self.cfg.max_tombstones {
            if let Some((old, exp)) = self.tomb_order.pop_front() {
                if self.tombstones.get(&old).is_some_and(|t| t.1 == exp) {
                    self.tombstones.remove(&old);
                }
                self.stats.tombstones_evicted += 1;
            }
        }
        let exp = now + self.cfg.tombstone_ttl;
        self.tombstones.insert(key, (tomb, exp));
        self.tomb_order.push_back((key, exp));
    }

    /// Answers a retransmitted request from its tombstone. Returns whether
    /// there was one (a wrong token is counted and answered with nothing).
    pub(super) fn replay(&mut self, h: &SanHeader, key: RequestKey, client_token: u64) -> bool {
        let Some(&(tomb, _)) = self.tombstones.get(&key) else {
            return false;
        };
        if tomb.client_token() != client_token {
            self.stats.bad_token += 1;
            return true;
        }
        let conn_id = key.conn_id;
        match tomb {
            Tomb::Refused { reason, .. } => {
                self.stats.replayed_rejects += 1;
                self.reply(
                    h,
                    Message::Reject {
                        conn_id,
                        client_token,
                        reason,
                    },
                );
            }
            Tomb::Closed {
                server_token,
                reset,
                ..
            } => {
                self.stats.replayed_accepts += 1;
                self.reply(
                    h,
                    Message::Accept {
                        conn_id,
                        client_token,
                        server_token,
                        // Closed already: the close that follows ends it.
                        offer: crate::wire::Offer::MIN,
                    },
                );
                self.reply(
                    h,
                    match reset {
                        None => Message::Close {
                            conn_id,
                            token: client_token,
                        },
                        Some(reason) => Message::Reset {
                            conn_id,
                            token: client_token,
                            reason,
                        },
                    },
                );
            }
        }
        true
    }

    /// Whether the server connection of request `key` ended because its
    /// client never confirmed it (so the client, if it exists, may still
    /// hold it until its keepalive or its next frame learns otherwise).
    pub fn forgot_unconfirmed(&self, key: RequestKey) -> bool {
        matches!(
            self.tombstones.get(&key),
            Some((
                Tomb::Closed {
                    unconfirmed: true,
                    ..
                },
                _
            ))
        )
    }

    pub(super) fn expire_tombstones(&mut self, now: Instant) {
        while let Some(&(key, exp)) = self.tomb_order.front() {
            if exp > now {
                break;
            }
            self.tomb_order.pop_front();
            if self.tombstones.get(&key).is_some_and(|t| t.1 == exp) {
                self.tombstones.remove(&key);
            }
        }
    }
}
