//! The accepting side: listeners, the requests pending on them, and the
//! application's decisions.
//!
//! A listener's queue belongs to the application (in dsand, the listener's
//! backlog ring in the process's shared region). The core keeps a count per
//! listener, which the capacity bounds, and each pending request by its
//! [`RequestKey`], so that an answer is matched by key and never by position.

use super::types::*;
use crate::time::Instant;
use crate::wire::SanHeader;
use std::collections::VecDeque;

#[derive(Debug)]
pub(super) struct Listener {
    pub(super) addr: SockAddr,
    pub(super) capacity: usize,
    /// Requests pending on it (handed to the application, not yet answered
    /// or expired).
    pub(super) live: usize,
}

/// Requests for a port with no listener at all, waiting for a fresh scan of
/// the kernel's TCP listeners before their answer (at most this many; more
/// are answered `TcpOnly` at once).
pub(super) const MAX_UNSURE: usize = 4096;
/// How long a request waits for that scan before it is answered `TcpOnly`
/// (the scanner is stuck or gone: TCP decides).
pub(super) const UNSURE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
/// How often those requests are looked at while they wait (a scan takes
/// about 0.1 ms).
pub(super) const UNSURE_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A request waiting for a fresh scan of the kernel's TCP listeners.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unsure {
    pub(super) header: SanHeader,
    pub(super) key: RequestKey,
    pub(super) client_token: u64,
    /// From [`super::config::PortSet::ask`].
    pub(super) ticket: u64,
    pub(super) arrived: Instant,
}

/// One source address's pending requests: how many, and their connection
/// ids in arrival order (answered ones are skipped lazily).
#[derive(Debug, Default)]
pub(super) struct SourceShare {
    pub(super) live: usize,
    pub(super) order: VecDeque<(u64, Instant)>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) listener: ListenerId,
    pub(super) inc: Incoming,
}
