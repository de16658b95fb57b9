//! The node's counters: kept as plain fields by the lcore, published on the
//! drain tick as one [`Counters`] snapshot that every report (Prometheus,
//! DPDK telemetry, `dsanctl status` / `stats`) renders from.

use crate::proto::ProtoStats;
use crate::wire::{Kind, Message, RejectReason};
use std::sync::{Arc, Mutex};

/// Number of message kinds counted (every kind the wire format declares).
pub const KINDS: usize = Kind::COUNT;
/// Names of the kinds, by counter index (the declaration order of [`Kind`]).
pub const KIND_NAMES: [&str; KINDS] = Kind::NAMES;

/// The counter index of a message.
pub fn kind_index(m: &Message) -> usize {
    m.kind().index().expect("a message's kind is declared")
}

/// Labels of [`Counters::rejected`], in order (the declaration order of
/// [`RejectReason`]).
pub const REJECT_REASONS: [&str; RejectReason::COUNT] = RejectReason::NAMES;
/// Labels of [`Counters::resets`], in order: why SAN connections were reset
/// (by this host, or by the peer: `peer`).
pub const RESET_REASONS: [&str; 6] = [
    "process_gone",
    "aborted",
    "timed_out",
    "shutdown",
    "protocol",
    "peer",
];
/// Labels of [`Counters::attempts`], in order.
pub const ATTEMPT_RESULTS: [&str; 4] = ["connected", "refused", "reset", "timed_out"];
/// Labels of [`Counters::app_rejects`], in order (a message that failed to
/// parse, by [`dsan_channel::msg::ParseError::reason`]).
pub use dsan_channel::msg::PARSE_REASONS as APP_REJECT_REASONS;

/// Every counter of the node, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// SAN frames received, by kind index (see [`kind_index`]).
    pub rx_by_kind: [u64; KINDS],
    /// SAN frames sent, by kind index.
    pub tx_by_kind: [u64; KINDS],
    /// Frames dropped: not the SAN EtherType.
    pub drop_not_san: u64,
    /// Frames dropped: truncated or malformed.
    pub drop_malformed: u64,
    /// Frames dropped: unsupported version.
    pub drop_version: u64,
    /// Frames dropped: addressed to an IP or MAC that is not ours.
    pub drop_not_ours: u64,
    /// Frames dropped: replies nobody waited for (late or duplicate).
    pub drop_unexpected: u64,
    /// Frames dropped: wrong token.
    pub drop_bad_token: u64,
    /// Messages from applications that failed to parse, by reason
    /// ([`APP_REJECT_REASONS`]).
    pub app_rejects: [u64; 4],
    /// Processes detached for breaking the channel's protocol (an impossible
    /// ring index).
    pub app_protocol_violations: u64,
    /// SAN listens refused because the port's kernel TCP listener belongs to
    /// another user, or the port is below 1024 and the process may not bind
    /// it ([`LISTEN_DENIALS`]: index 0 and 1), and SAN listeners revoked
    /// because a kernel TCP listener of another user took the port (2).
    pub listen_denials: [u64; 3],
    /// Listens, connects, accepts and event registrations refused because
    /// their user's share was used up ([`QUOTAS`], indexed by [`Quota`]).
    pub quota_refusals: [u64; QUOTAS.len()],
    /// Resolution replies that contradicted a learned entry (which was
    /// dropped, so that the address is resolved again).
    pub resolve_conflicts: u64,
    /// Event signals that could not be delivered (the application's eventfd
    /// was full or gone).
    pub event_signal_failed: u64,
    /// Readiness tokens the lcore sent to processes' wake sockets itself
    /// (`dsan_channel::wake`: no notifier thread in between).
    pub wake_tokens: u64,
    /// Processes attached now.
    pub attached: u64,
    /// Connect requests received (the protocol core's count).
    pub requests_received: u64,
    /// Requests accepted.
    pub accepted: u64,
    /// Requests refused, by [`REJECT_REASONS`].
    pub rejected: [u64; RejectReason::COUNT],
    /// Requests that waited longer than the connect budget and were dropped.
    pub expired: u64,
    /// Pending requests displaced by a newer one from the same source.
    pub displaced: u64,
    /// Requests for a port with no listener known that no fresh scan of
    /// the kernel's TCP listeners answered in time (answered "TCP only").
    pub unsure_to_tcp: u64,
    /// Decisions for requests no longer pending (ignored).
    pub stale_decisions: u64,
    /// Connects failed at once: the destination did not answer resolution a
    /// moment before (ETIMEDOUT at once, so the switch goes to TCP at once).
    pub unresolved_fast: u64,
    /// Connect attempts finished, by [`ATTEMPT_RESULTS`].
    pub attempts: [u64; 4],
    /// Successful connect durations per bucket of `proto::CONNECT_BUCKETS_S` (+ overflow).
    pub connect_buckets: [u64; 19],
    /// Their sum, ns.
    pub connect_sum_ns: u64,
    /// Stream payload bytes sent (retransmissions included).
    pub san_bytes_tx: u64,
    /// Stream payload bytes delivered in order to applications.
    pub san_bytes_rx: u64,
    /// Data frames sent again (go-back-N after a loss).
    pub frames_retransmitted: u64,
    /// Times a sender had bytes but no credit.
    pub credit_stalls: u64,
    /// SAN connections moved between the sockets holding them (a forked
    /// child's claim; a hand-back when the serving socket lets go).
    pub handovers: u64,
    /// Claims refused for a wrong claim key.
    pub claims_refused: u64,
    /// Forked workers that joined a sibling's SAN listener.
    pub listener_joins: u64,
    /// Established SAN connections with a stream now.
    pub connections: u64,
    /// Connections reset, by [`RESET_REASONS`].
    pub resets: [u64; 6],
    /// SAN frames dropped by the fault injector (lab only).
    pub drop_injected: u64,
}

impl Counters {
    /// Application messages refused, all reasons.
    pub fn bad_commands(&self) -> u64 {
        self.app_rejects.iter().sum()
    }
}

/// The published counters: the lcore replaces the snapshot on its tick
/// (with `try_lock`, so it never waits for a reader); readers copy it.
#[derive(Debug, Default)]
pub struct NodeStats(Mutex<Counters>);

impl NodeStats {
    /// A copy of the last published counters.
    pub fn snapshot(&self) -> Counters {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn publish(&self, c: &Counters) {
        if let Ok(mut g) = self.0.try_lock() {
            g.clone_from(c);
        }
    }
}

/// A user's share of something the host has a limited number of (root has
/// none): the index of its refusals in [`Counters::quota_refusals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// SAN listeners (EMFILE).
    Listeners,
    /// Connect attempts in progress (EAGAIN).
    Attempts,
    /// The daemon's descriptors, as event descriptors and lives (EMFILE).
    EventFds,
    /// Connections and attempts together (accept: ENOBUFS, the request
    /// stays queued; connect: EAGAIN).
    Connections,
    /// Address resolutions in progress (connect: EAGAIN).
    Resolutions,
}

/// Labels of [`Counters::quota_refusals`], in [`Quota`]'s order.
pub const QUOTAS: [&str; 5] = [
    "listeners",
    "attempts",
    "event_fds",
    "connections",
    "resolutions",
];

const _: () = assert!(Quota::Resolutions as usize + 1 == QUOTAS.len());

/// Labels of [`Counters::listen_denials`].
pub const LISTEN_DENIALS: [&str; 3] = ["other_user", "privileged_port", "revoked"];

/// What the lcore counts itself (the protocol core counts the rest).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Local {
    pub(super) rx: [u64; KINDS],
    pub(super) tx: [u64; KINDS],
    pub(super) not_san: u64,
    pub(super) malformed: u64,
    pub(super) version: u64,
    pub(super) not_ours: u64,
    pub(super) unexpected: u64,
    pub(super) app_rejects: [u64; 4],
    pub(super) app_protocol_violations: u64,
    pub(super) listen_denials: [u64; 3],
    pub(super) quota_refusals: [u64; QUOTAS.len()],
    pub(super) event_signal_failed: u64,
    pub(super) wake_tokens: u64,
    pub(super) bytes_tx: u64,
    pub(super) bytes_rx: u64,
    pub(super) retransmitted: u64,
    pub(super) handovers: u64,
    pub(super) claims_refused: u64,
    pub(super) listener_joins: u64,
    pub(super) resets: [u64; 6],
    pub(super) injected: u64,
}

/// The last snapshot the lcore rendered, and where reports read it.
pub(super) struct Publisher {
    stats: Arc<NodeStats>,
    counters: Counters,
}

/// What the lcore's other parts contribute to a snapshot besides
/// [`Local`] and the core's counters.
pub(super) struct Contributions {
    /// The resolver's conflicting replies.
    pub(super) resolve_conflicts: u64,
    /// Signals the attached processes' notifiers skipped (their eventfds full).
    pub(super) notifier_skipped: u64,
    /// Attached processes.
    pub(super) attached: u64,
    /// Established connections with a stream.
    pub(super) connections: u64,
}

impl Publisher {
    pub(super) fn new(stats: Arc<NodeStats>) -> Publisher {
        Publisher {
            stats,
            counters: Counters::default(),
        }
    }

    /// Renders and publishes the counters (on the drain tick). The wake-up
    /// counts of the pass-end signals are taken into `l` first.
    pub(super) fn publish(&mut self, l: &mut Local, ps: &ProtoStats, more: Contributions) {
        let (sent, failed) = super::notify::take_wake_counts();
        l.wake_tokens += sent;
        l.event_signal_failed += failed;
        let c = &mut self.counters;
        c.rx_by_kind = l.rx;
        c.tx_by_kind = l.tx;
        c.drop_not_san = l.not_san;
        c.drop_malformed = l.malformed;
        c.drop_version = l.version;
        c.drop_not_ours = l.not_ours + ps.not_ours;
        c.drop_unexpected = l.unexpected + ps.late_replies + ps.no_stream;
        c.drop_bad_token = ps.bad_token;
        c.app_rejects = l.app_rejects;
        c.app_protocol_violations = l.app_protocol_violations;
        c.listen_denials = l.listen_denials;
        c.quota_refusals = l.quota_refusals;
        c.resolve_conflicts = more.resolve_conflicts;
        // Signals the lcore could not queue, and those the processes'
        // notifiers skipped (their eventfds full), attached processes only.
        c.event_signal_failed = l.event_signal_failed + more.notifier_skipped;
        c.wake_tokens = l.wake_tokens;
        c.attached = more.attached;
        c.requests_received = ps.requests_received;
        c.accepted = ps.accepted;
        c.rejected = ps.rejected;
        c.expired = ps.expired;
        c.displaced = ps.displaced;
        c.unsure_to_tcp = ps.unsure_to_tcp;
        c.stale_decisions = ps.stale_decisions;
        c.unresolved_fast = ps.unresolved_fast;
        c.attempts = ps.attempts;
        c.connect_buckets = ps.connect_duration_buckets;
        c.connect_sum_ns = ps.connect_duration_sum_ns;
        c.san_bytes_tx = l.bytes_tx;
        c.san_bytes_rx = l.bytes_rx;
        c.frames_retransmitted = l.retransmitted;
        c.credit_stalls = ps.credit_stalls;
        c.handovers = l.handovers;
        c.claims_refused = l.claims_refused;
        c.listener_joins = l.listener_joins;
        c.connections = more.connections;
        c.resets = l.resets;
        c.drop_injected = l.injected;
        self.stats.publish(&self.counters);
    }
}
