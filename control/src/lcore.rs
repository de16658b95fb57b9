//! The control side's handle to the dataplane lcore: the one way to ask it
//! something ([`Lcore::ask`]) or tell it something ([`Lcore::tell`]), with
//! the doorbell rung inside, and the one rendering of its counters.

use dataplane::engine::{EngineShared, LcoreStats};
use dataplane::node::{
    Command, Counters, NodeHandle, APP_REJECT_REASONS, ATTEMPT_RESULTS, KIND_NAMES, LISTEN_DENIALS,
    REJECT_REASONS, RESET_REASONS,
};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the lcore did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// Its command queue stayed full until the deadline.
    #[error("the dataplane's command queue is full; try again")]
    Busy,
    /// It took the command but did not answer before the deadline.
    #[error("the dataplane did not answer in time")]
    NoAnswer,
}

/// See the module documentation.
#[derive(Clone)]
pub struct Lcore {
    /// The loop's shared state (doorbell, stop flag, poll counters).
    pub engine: Arc<EngineShared>,
    /// The node's handle (command queue, counters, addresses).
    pub node: NodeHandle,
}

impl Lcore {
    /// Queues `cmd` and rings the doorbell. A full queue is retried until
    /// `deadline` passes (the lcore drains it every pass), so a command is
    /// dropped only if the lcore is stuck.
    ///
    /// # Errors
    /// [`AskError::Busy`].
    pub fn tell(&self, cmd: Command, timeout: Duration) -> Result<(), AskError> {
        let deadline = Instant::now() + timeout;
        let mut cmd = cmd;
        loop {
            match self.node.commands.push(cmd) {
                Ok(()) => {
                    self.engine.doorbell.ring();
                    return Ok(());
                }
                Err(back) => {
                    self.engine.doorbell.ring();
                    if Instant::now() >= deadline {
                        return Err(AskError::Busy);
                    }
                    cmd = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }

    /// Sends the command `make` builds around a reply channel and waits for
    /// the answer, all within `timeout`.
    ///
    /// # Errors
    /// [`AskError`].
    pub fn ask<T>(
        &self,
        make: impl FnOnce(Sender<T>) -> Command,
        timeout: Duration,
    ) -> Result<T, AskError> {
        let start = Instant::now();
        let (tx, rx) = channel();
        self.tell(make(tx), timeout)?;
        rx.recv_timeout(timeout.saturating_sub(start.elapsed()))
            .map_err(|_| AskError::NoAnswer)
    }

    /// The listener table, sorted by port and address (the lcore hands it
    /// over unsorted: listings cost it no more than a copy).
    ///
    /// # Errors
    /// [`AskError`].
    pub fn listeners(
        &self,
        timeout: Duration,
    ) -> Result<Vec<dataplane::node::ListenerInfo>, AskError> {
        let mut v = self.ask(Command::Listeners, timeout)?;
        v.sort_by_key(|l| (l.port, l.ip));
        Ok(v)
    }

    /// The established connections, sorted by local port and peer (sorted
    /// here, not on the lcore).
    ///
    /// # Errors
    /// [`AskError`].
    pub fn connections(
        &self,
        timeout: Duration,
    ) -> Result<Vec<dataplane::node::ConnInfo>, AskError> {
        let mut v = self.ask(Command::Connections, timeout)?;
        v.sort_by_key(|c| (c.local.1, c.peer));
        Ok(v)
    }

    /// The node's counters now: the lcore publishes them first (within
    /// 100 ms; a busy or stuck lcore gives its last published ones).
    pub fn counters(&self) -> Counters {
        let _ = self.ask(Command::Publish, Duration::from_millis(100));
        self.node.stats.snapshot()
    }
}

fn named(names: &[&str], values: &[u64]) -> Value {
    names
        .iter()
        .zip(values)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect::<Map<_, _>>()
        .into()
}

/// The counters as `dsanctl stats` shows them (and `status` in part).
pub fn counters_json(c: &Counters, l: &LcoreStats) -> Value {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "connect_requests_received": c.requests_received,
        "connects_accepted": c.accepted,
        "connects_rejected": named(&REJECT_REASONS, &c.rejected),
        "connect_requests_expired": c.expired,
        "connect_requests_displaced": c.displaced,
        "connect_requests_unsure_to_tcp": c.unsure_to_tcp,
        "connect_attempts_unresolved_fast": c.unresolved_fast,
        "connect_attempts": named(&ATTEMPT_RESULTS, &c.attempts),
        "frames_received": named(&KIND_NAMES, &c.rx_by_kind),
        "frames_sent": named(&KIND_NAMES, &c.tx_by_kind),
        "drops": {"not_san": c.drop_not_san, "malformed": c.drop_malformed, "version": c.drop_version,
                  "not_ours": c.drop_not_ours, "unexpected": c.drop_unexpected, "bad_token": c.drop_bad_token,
                  "bad_command": c.bad_commands(), "injected": c.drop_injected},
        "streams": {"connections": c.connections, "bytes_sent": c.san_bytes_tx, "bytes_received": c.san_bytes_rx,
                    "frames_retransmitted": c.frames_retransmitted, "credit_stalls": c.credit_stalls,
                    "handovers": c.handovers, "claims_refused": c.claims_refused,
                    "listener_joins": c.listener_joins,
                    "resets": named(&RESET_REASONS, &c.resets),
                    "state_bytes_per_connection": dataplane::node::STREAM_STATE_BYTES},
        "app_messages_rejected": named(&APP_REJECT_REASONS, &c.app_rejects),
        "app_protocol_violations": c.app_protocol_violations,
        "san_listens_denied": named(&LISTEN_DENIALS, &c.listen_denials),
        "app_quota_refusals": named(&dataplane::node::QUOTAS, &c.quota_refusals),
        "resolve_conflicts": c.resolve_conflicts,
        "app_event_signals_failed": c.event_signal_failed,
        "app_wake_tokens": c.wake_tokens,
        "attached_processes": c.attached,
        "lcore": {"busy_polls": ld(&l.busy_polls), "idle_polls": ld(&l.idle_polls), "sleeps": ld(&l.sleeps), "wake_sleeps": ld(&l.wake_sleeps), "rhythm_spins": ld(&l.rhythm_spins)},
    })
}

/// The same counters flattened to `name -> value` (DPDK telemetry's shape):
/// nested objects join their keys with `_`.
pub fn counters_flat(c: &Counters, l: &LcoreStats) -> Vec<(String, u64)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, u64)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}_{k}")
                    };
                    walk(&key, v, out);
                }
            }
            v => out.push((prefix.to_string(), v.as_u64().unwrap_or(0))),
        }
    }
    let mut out = Vec::new();
    walk("", &counters_json(c, l), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rendering_for_every_report() {
        let c = Counters {
            accepted: 3,
            rejected: [1, 2, 0, 0, 0, 0],
            app_rejects: [0, 4, 0, 1],
            ..Default::default()
        };
        let l = LcoreStats::default();
        let j = counters_json(&c, &l);
        assert_eq!(j["connects_accepted"], 3);
        assert_eq!(j["connects_rejected"]["no_listener"], 2);
        assert_eq!(j["drops"]["bad_command"], 5);
        let flat = counters_flat(&c, &l);
        assert!(flat.contains(&("connects_rejected_backlog_full".into(), 1)));
        assert!(flat.contains(&("app_messages_rejected_reserved".into(), 4)));
        assert!(flat.contains(&("connects_accepted".into(), 3)));
    }
}
