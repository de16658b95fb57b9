//! The protocol core's vocabulary: handles, decisions, events, errors and counters.

use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Offer, RejectReason, SanHeader};

/// The request a decision answers: the peer's address and the connection id
/// it chose (unique per peer while the request lives). The process names a
/// request by it too (`dsan_channel::msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// Peer IPv4.
    pub peer_ip: std::net::Ipv4Addr,
    /// Wire connection id.
    pub conn_id: u64,
}

/// A request waiting for the application's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// The connecting peer.
    pub peer: SockAddr,
    /// The local address it asked for.
    pub local: SockAddr,
    /// Its MAC.
    pub peer_mac: EthernetAddress,
    /// Wire connection id.
    pub conn_id: u64,
    /// The client's token.
    pub client_token: u64,
    /// When it arrived.
    pub arrived: Instant,
    /// The client's receive window and frame size.
    pub offer: Offer,
}

impl Incoming {
    /// The key the application answers it by.
    pub fn key(&self) -> RequestKey {
        RequestKey {
            peer_ip: self.peer.0,
            conn_id: self.conn_id,
        }
    }

    /// The header the request arrived with (to answer it as `reject` does).
    pub(super) fn header(&self, my_mac: EthernetAddress) -> SanHeader {
        SanHeader {
            dst_mac: my_mac,
            src_mac: self.peer_mac,
            src_ip: self.peer.0,
            src_port: self.peer.1,
            dst_ip: self.local.0,
            dst_port: self.local.1,
        }
    }
}

/// A listener, as the application names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

/// A connection or connect attempt, as the application names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnHandle(pub u64);

/// An IPv4 address and port.
pub type SockAddr = (Ipv4, u16);

/// The accepting side's answer to a queued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Accept: the peer's connect succeeds.
    Accept,
    /// Refuse: the peer's connect fails with ECONNREFUSED.
    Reject,
    /// Leave the request where it is (the application keeps it at the head
    /// of its view of the backlog).
    Defer,
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused: backlog full, refused by the application, no resources, or the
    /// listener closed. ECONNREFUSED; the switch does not fall back.
    Refused(RejectReason),
    /// Nobody listens on that port. ECONNRESET (WSD's code); no fallback.
    Reset,
    /// No answer to resolution or to the request within the budget. ETIMEDOUT;
    /// the switch falls back to TCP.
    TimedOut,
}

impl ConnectFailure {
    /// The errno the provider reports.
    pub fn errno(&self) -> i32 {
        match self {
            ConnectFailure::Refused(RejectReason::TcpOnly) => libc::EPROTONOSUPPORT,
            ConnectFailure::Refused(_) => libc::ECONNREFUSED,
            ConnectFailure::Reset => libc::ECONNRESET,
            ConnectFailure::TimedOut => libc::ETIMEDOUT,
        }
    }
}

/// What the application learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request was queued on this listener (FD_ACCEPT).
    Incoming {
        /// The listener.
        listener: ListenerId,
        /// The request, to be put at the tail of the application's backlog ring.
        request: Incoming,
    },
    /// A connect attempt succeeded (FD_CONNECT, no error).
    Connected {
        /// The connection (same handle as the attempt).
        conn: ConnHandle,
        /// What its byte stream starts from. Carried here because the
        /// connection may be gone from the core by the time the event is
        /// handled (the peer's Close can arrive in the same burst as its
        /// Accept); the edge still opens the stream, and the `Closed` or
        /// `Reset` event that follows ends it.
        params: StreamParams,
    },
    /// A connect attempt failed (FD_CONNECT with an error).
    ConnectFailed {
        /// The attempt.
        conn: ConnHandle,
        /// Why.
        error: ConnectFailure,
    },
    /// The peer closed an established connection.
    Closed {
        /// The connection.
        conn: ConnHandle,
    },
    /// The peer reset an established connection (not one the application
    /// closed: that one ends silently).
    Reset {
        /// The connection.
        conn: ConnHandle,
        /// Why (as the peer said).
        reason: crate::wire::ResetReason,
    },
    /// This host reset an established connection on its own: its peer
    /// stopped answering (`TimedOut`), or bytes arrived after the
    /// application closed its socket (`Aborted`). A Reset went to the peer
    /// and the stream is forgotten; the application's socket reads
    /// ECONNRESET.
    Aborted {
        /// The connection.
        conn: ConnHandle,
        /// Why.
        reason: crate::wire::ResetReason,
    },
    /// A closed socket's stream delivered its last bytes and FIN (all
    /// acknowledged): the connection's Close handshake runs and the stream
    /// is forgotten, so the socket's rings are free.
    StreamDone {
        /// The connection.
        conn: ConnHandle,
    },
}

/// What a Data or Ack frame brought to a stream (see
/// [`Endpoint::handle_frame`](super::Endpoint::handle_frame)): the edge
/// copies `payload[skip..skip + take]` into the receive ring at stream
/// position `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The connection.
    pub conn: ConnHandle,
    /// Where the taken bytes go: the bytes received before this frame.
    pub at: u64,
    /// Payload bytes to pass over (received before).
    pub skip: usize,
    /// Payload bytes taken (within the credit given).
    pub take: usize,
    /// Bytes we sent were acknowledged (the send ring's head moved).
    pub acked: bool,
    /// The peer's FIN came with this frame: the end of the stream follows
    /// the bytes received.
    pub eof: bool,
}

/// What became of a stream whose application closed its socket (see
/// [`Endpoint::close_stream`](super::Endpoint::close_stream)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamClose {
    /// No such stream.
    Unknown,
    /// Bytes the application never read were there (or its indices were
    /// impossible): the connection is reset, as TCP does; the stream is
    /// forgotten.
    Reset,
    /// Nothing is left to deliver (nothing was written, or every byte and
    /// the FIN are acknowledged): the Close handshake runs; the stream is
    /// forgotten.
    Closed,
    /// Its last bytes and FIN are still to be delivered: the stream lingers
    /// until they are ([`Event::StreamDone`]).
    Lingering,
}

/// Errors of [`Endpoint::listen`](super::Endpoint::listen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The port is already listened on for that address (or the wildcard).
    #[error("address in use")]
    AddrInUse,
    /// The address is neither one of this host's SAN addresses nor the wildcard.
    #[error("address not available on this host")]
    AddrNotAvailable,
    /// The listener limit is reached.
    #[error("too many listeners")]
    TooManyListeners,
}

/// Errors of [`Endpoint::decide`](super::Endpoint::decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// No such listener (never created, or closed).
    #[error("unknown listener")]
    UnknownListener,
    /// No such request waits on this listener: it was decided already, it
    /// expired (queued longer than the connect budget), or it never was.
    /// Nothing changed.
    #[error("no such pending connection request")]
    Stale,
    /// The connection limit is reached; the request stays queued.
    #[error("too many connections")]
    TooManyConnections,
}

/// Errors of [`Endpoint::connect`](super::Endpoint::connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The destination is in no SAN subnet (EHOSTUNREACH; no fallback).
    #[error("destination in no SAN subnet")]
    HostUnreachable,
    /// This host has no SAN address to connect from.
    #[error("no local SAN address")]
    NoLocalAddress,
    /// Too many attempts in progress.
    #[error("too many connect attempts in progress")]
    TooManyAttempts,
    /// The destination is unresolved and the caller's owner has its share
    /// of the resolutions in progress (see `Resolver::over_share`).
    #[error("too many address resolutions in progress for this user")]
    ResolutionShare,
}

/// Errors of [`Endpoint::close`](super::Endpoint::close) and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// No such connection, attempt or listener.
    #[error("unknown handle")]
    Unknown,
}

/// Counters, every drop by its reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtoStats {
    /// Connect requests received (duplicates included).
    pub requests_received: u64,
    /// Requests accepted by the application.
    pub accepted: u64,
    /// Requests refused, by reason: backlog full, no listener, refused, no resources, listener closed.
    pub rejected: [u64; RejectReason::COUNT],
    /// Attempts finished: connected, refused, reset, timed out.
    pub attempts: [u64; 4],
    /// Duplicate requests for a queued entry (ignored).
    pub duplicate_requests: u64,
    /// Accepts replayed for retransmitted requests.
    pub replayed_accepts: u64,
    /// Refusals replayed from tombstones.
    pub replayed_rejects: u64,
    /// Replies for attempts that had already finished (or never existed).
    pub late_replies: u64,
    /// Frames dropped because their token did not match.
    pub bad_token: u64,
    /// Frames for an address that is not this host's.
    pub not_ours: u64,
    /// Frames of a kind the endpoint does not handle (echo is the node's).
    pub unhandled: u64,
    /// Stream frames for a connection that has no stream (yet, or any more).
    pub no_stream: u64,
    /// Times a stream's peer ran out of credit for it (once per stall).
    pub credit_stalls: u64,
    /// Resets sent (aborted connections, frames for unknown connections).
    pub resets_sent: u64,
    /// Resets received and honoured.
    pub resets_received: u64,
    /// Tombstones evicted early because the table was full.
    pub tombstones_evicted: u64,
    /// Requests that waited in a backlog longer than the connect budget (their
    /// client had given up) and were dropped.
    pub expired: u64,
    /// Decisions for requests that were no longer pending (ignored).
    pub stale_decisions: u64,
    /// Pending requests dropped (silently: their client retransmits) to make
    /// room for a newer request from the same source address, whose share
    /// (`max_half_open_per_source`) was full.
    pub displaced: u64,
    /// Requests for a port with no listener known that no scan of the
    /// kernel's TCP listeners answered in time: answered `TcpOnly`.
    pub unsure_to_tcp: u64,
    /// Accepted connections whose client never confirmed (presumed gone).
    pub unconfirmed: u64,
    /// Connect attempts failed at once because their destination had not
    /// answered resolution a moment before (the negative cache).
    pub unresolved_fast: u64,
    /// Durations of successful connects (connecting side), per bucket of
    /// [`CONNECT_BUCKETS_S`] (not cumulative; the last counts the overflow).
    pub connect_duration_buckets: [u64; CONNECT_BUCKETS_S.len() + 1],
    /// Sum of the durations above, nanoseconds.
    pub connect_duration_sum_ns: u64,
}

/// Upper bounds (seconds) of the connect-duration histogram buckets.
pub const CONNECT_BUCKETS_S: [f64; 18] = [
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

impl ProtoStats {
    /// Index of a reject reason in [`ProtoStats::rejected`].
    #[inline]
    pub fn reason_index(r: RejectReason) -> usize {
        // (An unknown reason counts as the listener's going away.)
        r.index()
            .or(RejectReason::ListenerClosed.index())
            .expect("declared")
    }
}

/// What a connection's byte stream starts from, fixed at set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamParams {
    /// Largest segment payload both sides accept.
    pub mss: u16,
    /// The peer's receive window as offered at set-up (our first credit).
    pub peer_window: u32,
}
