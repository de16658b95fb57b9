//! Tombstones: what became of finished requests, so that a retransmitted
//! request gets the same answer as the first (never a second backlog entry).

use crate::wire::{RejectReason, ResetReason};

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
