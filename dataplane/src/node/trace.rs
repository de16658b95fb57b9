//! Connection-setup tracing (off unless asked for): the lcore stamps each
//! hop of a connect or refusal that passes through it with the host's
//! monotonic clock and the wire connection id, so that `dsan-bench` can
//! line up both daemons' hops with the application's own stamps (one
//! clock on one machine; between two machines, hops compare within a host
//! only). Off, it costs one branch per hop.

use crate::proto::ConnHandle;
use crate::wire::Message;
use dsan_channel::sys::monotonic_ns;
use std::collections::HashMap;

/// Where in the daemon a connection setup was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hop {
    /// Client side: the lcore took the process's connect command.
    ClientCommand,
    /// Client side: the ConnectRequest frame was built for the port.
    RequestSent,
    /// Server side: the ConnectRequest frame was parsed.
    RequestReceived,
    /// Server side: the request is in the listener's backlog ring and the
    /// process was signalled (FD_ACCEPT).
    Queued,
    /// Server side: the lcore took the process's decision.
    DecisionSeen,
    /// Server side: the Accept frame was built.
    AcceptSent,
    /// Server side: a Reject frame was built (backlog full, no listener,
    /// the application refused).
    RejectSent,
    /// Client side: the Accept frame was parsed.
    AcceptReceived,
    /// Client side: the Reject frame was parsed.
    RejectReceived,
    /// Client side: the outcome was posted to the process.
    Completed,
}

impl Hop {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Hop::ClientCommand => "client_command",
            Hop::RequestSent => "request_sent",
            Hop::RequestReceived => "request_received",
            Hop::Queued => "queued",
            Hop::DecisionSeen => "decision_seen",
            Hop::AcceptSent => "accept_sent",
            Hop::RejectSent => "reject_sent",
            Hop::AcceptReceived => "accept_received",
            Hop::RejectReceived => "reject_received",
            Hop::Completed => "completed",
        }
    }
}

/// One stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEvent {
    /// The wire connection id (chosen by the client).
    pub conn_id: u64,
    /// The hop.
    pub hop: Hop,
    /// CLOCK_MONOTONIC, nanoseconds.
    pub t_ns: u64,
}

/// What a trace command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceAction {
    /// Start a new trace (the stamps so far are dropped).
    Start,
    /// Return the stamps and stop tracing.
    Stop,
}

/// At most this many stamps are kept (about 1.5 MiB); later ones are
/// counted, not kept.
pub const TRACE_CAPACITY: usize = 1 << 16;

#[derive(Debug, Default)]
struct Tracer {
    events: Vec<TraceEvent>,
    /// Client side: the wire id of each connect attempt traced, until its outcome.
    ids: HashMap<ConnHandle, u64>,
    dropped: u64,
}

impl Tracer {
    fn push(&mut self, conn_id: u64, hop: Hop) {
        if self.events.len() < TRACE_CAPACITY {
            self.events.push(TraceEvent {
                conn_id,
                hop,
                t_ns: monotonic_ns(),
            });
        } else {
            self.dropped += 1;
        }
    }
}

/// Connection-setup tracing: off (nothing kept, one test per stamp) until
/// started.
#[derive(Debug, Default)]
pub(super) struct Trace(Option<Box<Tracer>>);

impl Trace {
    /// Starts or stops tracing; a stop returns the stamps and how many did
    /// not fit.
    pub(super) fn control(&mut self, a: TraceAction) -> (Vec<TraceEvent>, u64) {
        match a {
            TraceAction::Start => {
                self.0 = Some(Box::default());
                (Vec::new(), 0)
            }
            TraceAction::Stop => self
                .0
                .take()
                .map_or((Vec::new(), 0), |t| (t.events, t.dropped)),
        }
    }

    /// Whether tracing is on.
    #[inline]
    pub(super) fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Stamps `hop` of connection `conn_id`.
    #[inline]
    pub(super) fn stamp(&mut self, conn_id: u64, hop: Hop) {
        if let Some(t) = self.0.as_mut() {
            t.push(conn_id, hop);
        }
    }

    /// Stamps a setup frame going out or coming in.
    #[inline]
    pub(super) fn frame(&mut self, m: &Message, sent: bool) {
        if self.0.is_none() {
            return;
        }
        let (id, hop) = match (m, sent) {
            (Message::ConnectRequest { conn_id, .. }, true) => (*conn_id, Hop::RequestSent),
            (Message::ConnectRequest { conn_id, .. }, false) => (*conn_id, Hop::RequestReceived),
            (Message::Accept { conn_id, .. }, true) => (*conn_id, Hop::AcceptSent),
            (Message::Accept { conn_id, .. }, false) => (*conn_id, Hop::AcceptReceived),
            (Message::Reject { conn_id, .. }, true) => (*conn_id, Hop::RejectSent),
            (Message::Reject { conn_id, .. }, false) => (*conn_id, Hop::RejectReceived),
            _ => return,
        };
        self.stamp(id, hop);
    }

    /// Client side: the lcore took a connect command for attempt `h`, whose
    /// wire id is `id`.
    pub(super) fn connect(&mut self, h: ConnHandle, id: u64) {
        if let Some(t) = self.0.as_mut() {
            t.ids.insert(h, id);
            t.push(id, Hop::ClientCommand);
        }
    }

    /// Client side: the outcome of attempt `h` was posted.
    pub(super) fn completed(&mut self, h: ConnHandle) {
        if let Some(t) = self.0.as_mut() {
            if let Some(id) = t.ids.remove(&h) {
                t.push(id, Hop::Completed);
            }
        }
    }
}
