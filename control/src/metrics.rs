//! The Prometheus endpoint (text format 0.0.4, the `prometheus` crate).
//!
//! The dataplane counts in plain per-lcore fields and publishes them on its
//! drain tick; this module copies the published values into the registry when
//! a scrape arrives, so the hot path never touches a label or a lock.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::lcore::Lcore;
use dataplane::node::{Counters, APP_REJECT_REASONS, KINDS, KIND_NAMES, RESET_REASONS};
pub use dataplane::node::{ATTEMPT_RESULTS, REJECT_REASONS};

/// Where port counters come from (DPDK in the daemon).
pub type PortStatsFn = Box<dyn Fn() -> Option<(u64, u64, u64)> + Send>;
/// Where the listener table comes from (a round trip to the lcore).
pub type ListenersFn = Box<dyn Fn() -> Vec<dataplane::node::ListenerInfo> + Send>;

/// Where the metric values come from.
pub struct Sources {
    /// The lcore (poll counters, the node's counters).
    pub lcore: Lcore,
    /// Port counters.
    pub port: PortStatsFn,
    /// The listener table.
    pub listeners: ListenersFn,
    /// Switch fallbacks reported by applications.
    pub fallbacks: Arc<Fallbacks>,
}

/// The metric set of one daemon.
pub struct Metrics {
    registry: Registry,
    port_rx: IntCounter,
    port_tx: IntCounter,
    port_rx_dropped: IntCounter,
    polls: IntCounterVec,
    sleeps: IntCounter,
    frames_rx: IntCounterVec,
    frames_tx: IntCounterVec,
    dropped: IntCounterVec,
    requests: IntCounter,
    accepted: IntCounter,
    rejected: IntCounterVec,
    attempts: IntCounterVec,
    expired: IntCounter,
    displaced: IntCounter,
    app_rejects: IntCounterVec,
    app_protocol_violations: IntCounter,
    listen_denials: IntCounterVec,
    quota_refusals: IntCounterVec,
    resolve_conflicts: IntCounter,
    event_signals_failed: IntCounter,
    wake_tokens: IntCounter,
    fallbacks_metric: IntCounterVec,
    listen_failures_metric: IntCounterVec,
    attached: prometheus::IntGauge,
    backlog_capacity: IntGaugeVec,
    backlog_depth: IntGaugeVec,
    backlog_accepted: IntGaugeVec,
    bytes: IntCounterVec,
    retransmitted: IntCounter,
    credit_stalls: IntCounter,
    handovers: IntCounter,
    claims_refused: IntCounter,
    listener_joins: IntCounter,
    resets: IntCounterVec,
    connections: prometheus::IntGauge,
    lcore: Lcore,
    port: PortStatsFn,
    listeners: ListenersFn,
    fallbacks: Arc<Fallbacks>,
}

/// Why the switch moved a connect to kernel TCP
/// (`dsan_switch_fallbacks_total{reason}`), and why a switch listener
/// serves kernel TCP only (`dsan_switch_san_listen_failures_total{reason}`),
/// as applications report them: declared once, with their wire codes, in
/// the contract (`dsan_channel::ctl`).
pub use dsan_channel::ctl::{
    FallbackReason, ListenFailure, FALLBACK_REASONS, LISTEN_FAILURE_REASONS,
};

/// Switch fallbacks by reason ([`FALLBACK_REASONS`]), and failed SAN
/// listens by reason ([`LISTEN_FAILURE_REASONS`]).
#[derive(Debug, Default)]
pub struct Fallbacks(
    [std::sync::atomic::AtomicU64; FALLBACK_REASONS.len()],
    [std::sync::atomic::AtomicU64; LISTEN_FAILURE_REASONS.len()],
);

impl Fallbacks {
    /// Counts one for `reason`.
    pub fn add(&self, reason: FallbackReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// The count for reason `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
    /// All reasons together.
    pub fn total(&self) -> u64 {
        (0..self.0.len()).map(|i| self.get(i)).sum()
    }
    /// Counts a failed SAN listen for `reason`.
    pub fn add_listen_failure(&self, reason: ListenFailure) {
        self.1[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Failed SAN listens for reason `i`.
    pub fn listen_failures(&self, i: usize) -> u64 {
        self.1[i].load(Ordering::Relaxed)
    }
}

fn set(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v >= cur {
        c.inc_by(v - cur);
    } else {
        c.reset();
        c.inc_by(v);
    }
}

impl Metrics {
    /// Registers every metric.
    ///
    /// # Panics
    /// Only on a programming error (duplicate metric names).
    pub fn new(host: &str, idle: &str, pmd: &str, src: Sources) -> Metrics {
        let Sources {
            lcore,
            port,
            listeners,
            fallbacks,
        } = src;
        let registry = Registry::new();
        let c = |name: &str, help: &str| {
            let m = IntCounter::with_opts(Opts::new(name, help)).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "dsan_build_info",
                "Build and run-time facts of this dsand; always 1.",
            ),
            &["version", "host", "idle_policy", "pmd"],
        )
        .unwrap();
        registry.register(Box::new(build.clone())).unwrap();
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), host, idle, pmd])
            .set(1);
        let gv = |name: &str, help: &str| {
            let m = IntGaugeVec::new(Opts::new(name, help), &["address", "port", "pid"]).unwrap();
            registry.register(Box::new(m.clone())).unwrap();
            m
        };
        let attached = prometheus::IntGauge::with_opts(Opts::new(
            "dsan_attached_processes",
            "Processes attached to this daemon through the provider library.",
        ))
        .unwrap();
        registry.register(Box::new(attached.clone())).unwrap();
        let connections = prometheus::IntGauge::with_opts(Opts::new(
            "dsan_san_connections",
            "Established SAN connections with a byte stream on this host.",
        ))
        .unwrap();
        registry.register(Box::new(connections.clone())).unwrap();
        Metrics {
            port_rx: c(
                "dsan_port_rx_packets_total",
                "Packets received by the DPDK port.",
            ),
            port_tx: c(
                "dsan_port_tx_packets_total",
                "Packets transmitted by the DPDK port.",
            ),
            port_rx_dropped: c(
                "dsan_port_rx_dropped_total",
                "Packets the port dropped on receive (missed, errors, no mbuf).",
            ),
            polls: cv(
                "dsan_lcore_polls_total",
                "Dataplane loop passes, by whether they found work.",
                &["state"],
            ),
            sleeps: c(
                "dsan_lcore_sleeps_total",
                "Times the adaptive dataplane loop went to sleep.",
            ),
            frames_rx: cv(
                "dsan_san_frames_received_total",
                "SAN frames received, by message kind.",
                &["kind"],
            ),
            frames_tx: cv(
                "dsan_san_frames_sent_total",
                "SAN frames sent, by message kind.",
                &["kind"],
            ),
            dropped: cv("dsan_frames_dropped_total", "Frames dropped by the dataplane, by reason.", &["reason"]),
            requests: c("dsan_san_connect_requests_received_total", "SAN connect requests received (retransmissions included)."),
            accepted: c("dsan_san_connects_accepted_total", "SAN connect requests accepted by an application."),
            rejected: cv("dsan_san_connects_rejected_total", "SAN connect requests refused, by reason.", &["reason"]),
            attempts: cv("dsan_san_connect_attempts_total", "SAN connect attempts made from this host, by result.", &["result"]),
            expired: c("dsan_san_requests_expired_total", "SAN connect requests dropped unanswered after the connect budget (their clients had given up)."),
            displaced: c("dsan_san_requests_displaced_total", "SAN connect requests forgotten unanswered to make room for a newer request from the same source address, whose share of pending requests was full (their clients retransmit)."),
            app_rejects: cv("dsan_app_messages_rejected_total", "Messages from attached processes that failed to parse, by reason.", &["reason"]),
            app_protocol_violations: c("dsan_app_protocol_violations_total", "Processes detached for breaking the shared-memory protocol."),
            resolve_conflicts: c("dsan_resolve_conflicts_total", "Resolution replies that named another MAC for a learned SAN address (the entry is dropped and the address resolved again)."),
            quota_refusals: cv("dsan_app_quota_refusals_total", "Listens (EMFILE), connects (EAGAIN), accepts (ENOBUFS) and event descriptor registrations (EMFILE) refused because their user's share was used up: of the host's SAN listeners (1,024), connect attempts (16,384), connections with attempts (a quarter of max_connections), address resolutions in progress (256) or the daemon's descriptors (a quarter); root has no share.", &["what"]),
            listen_denials: cv("dsan_san_listens_denied_total", "SAN listens refused (the port's kernel TCP listener belongs to another user; a port below 1024 without the right to bind it) and SAN listeners revoked (a kernel TCP listener of another user took the port), by reason.", &["reason"]),
            event_signals_failed: c("dsan_app_event_signals_failed_total", "Event signals an application's event descriptor could not take."),
            wake_tokens: c("dsan_app_wake_tokens_total", "Readiness tokens the lcore sent to applications' wake sockets itself (no notifier thread in between)."),
            fallbacks_metric: cv("dsan_switch_fallbacks_total", "Connects the switch moved from the SAN to kernel TCP, by reason: the SAN attempt timed out, the port has only a kernel TCP listener, or no SAN socket could be set up.", &["reason"]),
            listen_failures_metric: cv("dsan_switch_san_listen_failures_total", "Listens the switch serves on kernel TCP only because their SAN side could not be set up, by reason (reported by applications).", &["reason"]),
            backlog_capacity: gv("dsan_backlog_capacity", "Backlog capacity of each SAN listener."),
            backlog_depth: gv("dsan_backlog_depth", "Connect requests queued on each SAN listener."),
            backlog_accepted: gv("dsan_backlog_accepted", "Connections the switch accepted on the application's behalf, waiting for its accept, per SAN listener."),
            bytes: cv("dsan_san_bytes_total", "SAN stream payload bytes: sent (tx, retransmissions included) and delivered in order to applications (rx).", &["direction"]),
            retransmitted: c("dsan_san_frames_retransmitted_total", "SAN Data frames sent again after a loss (go-back-N)."),
            credit_stalls: c("dsan_san_credit_stalls_total", "Times a SAN sender had bytes to send but no credit from its receiver."),
            handovers: c("dsan_san_connection_handovers_total", "SAN connections moved between the processes holding them (a forked child claimed one; a holder let go and another took it back)."),
            claims_refused: c("dsan_san_connection_claims_refused_total", "Claims of a SAN connection refused for a wrong claim key."),
            listener_joins: c("dsan_san_listener_joins_total", "Forked workers that joined a sibling's SAN listener (requests are shared among the workers)."),
            resets: cv("dsan_san_connections_reset_total", "SAN connections reset, by reason (peer: reset by the other host).", &["reason"]),
            connections,
            attached,
            listeners,
            fallbacks,
            registry,
            lcore,
            port,
        }
    }

    /// Copies the published counters into the registry and encodes it.
    pub fn render(&self) -> String {
        if let Some((rx, tx, drop)) = (self.port)() {
            set(&self.port_rx, rx);
            set(&self.port_tx, tx);
            set(&self.port_rx_dropped, drop);
        }
        let s = &self.lcore.engine.stats;
        set(
            &self.polls.with_label_values(&["busy"]),
            s.busy_polls.load(Ordering::Relaxed),
        );
        set(
            &self.polls.with_label_values(&["idle"]),
            s.idle_polls.load(Ordering::Relaxed),
        );
        set(&self.sleeps, s.sleeps.load(Ordering::Relaxed));
        let n = self.lcore.counters();
        for (i, name) in KIND_NAMES.iter().enumerate().take(KINDS) {
            set(&self.frames_rx.with_label_values(&[name]), n.rx_by_kind[i]);
            set(&self.frames_tx.with_label_values(&[name]), n.tx_by_kind[i]);
        }
        for (reason, v) in [
            ("not_san", n.drop_not_san),
            ("malformed", n.drop_malformed),
            ("version", n.drop_version),
            ("not_ours", n.drop_not_ours),
            ("unexpected", n.drop_unexpected),
            ("tx_full", s.tx_dropped.load(Ordering::Relaxed)),
            ("no_mbuf", s.alloc_failed.load(Ordering::Relaxed)),
            ("bad_token", n.drop_bad_token),
            ("bad_command", n.bad_commands()),
            ("injected", n.drop_injected),
        ] {
            set(&self.dropped.with_label_values(&[reason]), v);
        }
        set(&self.requests, n.requests_received);
        set(&self.accepted, n.accepted);
        for (i, r) in REJECT_REASONS.iter().enumerate() {
            set(&self.rejected.with_label_values(&[r]), n.rejected[i]);
        }
        for (i, r) in ATTEMPT_RESULTS.iter().enumerate() {
            set(&self.attempts.with_label_values(&[r]), n.attempts[i]);
        }
        set(&self.expired, n.expired);
        set(&self.displaced, n.displaced);
        for (i, r) in APP_REJECT_REASONS.iter().enumerate() {
            set(&self.app_rejects.with_label_values(&[r]), n.app_rejects[i]);
        }
        set(&self.app_protocol_violations, n.app_protocol_violations);
        set(&self.resolve_conflicts, n.resolve_conflicts);
        for (i, r) in dataplane::node::QUOTAS.iter().enumerate() {
            set(
                &self.quota_refusals.with_label_values(&[r]),
                n.quota_refusals[i],
            );
        }
        for (i, r) in dataplane::node::LISTEN_DENIALS.iter().enumerate() {
            set(
                &self.listen_denials.with_label_values(&[r]),
                n.listen_denials[i],
            );
        }
        set(&self.event_signals_failed, n.event_signal_failed);
        set(&self.wake_tokens, n.wake_tokens);
        for (i, r) in LISTEN_FAILURE_REASONS.iter().enumerate() {
            set(
                &self.listen_failures_metric.with_label_values(&[r]),
                self.fallbacks.listen_failures(i),
            );
        }
        for (i, r) in FALLBACK_REASONS.iter().enumerate() {
            set(
                &self.fallbacks_metric.with_label_values(&[r]),
                self.fallbacks.get(i),
            );
        }
        self.attached.set(n.attached as i64);
        self.connections.set(n.connections as i64);
        set(&self.bytes.with_label_values(&["tx"]), n.san_bytes_tx);
        set(&self.bytes.with_label_values(&["rx"]), n.san_bytes_rx);
        set(&self.retransmitted, n.frames_retransmitted);
        set(&self.credit_stalls, n.credit_stalls);
        set(&self.handovers, n.handovers);
        set(&self.claims_refused, n.claims_refused);
        set(&self.listener_joins, n.listener_joins);
        for (i, r) in RESET_REASONS.iter().enumerate() {
            set(&self.resets.with_label_values(&[r]), n.resets[i]);
        }
        self.backlog_capacity.reset();
        self.backlog_depth.reset();
        self.backlog_accepted.reset();
        for l in (self.listeners)() {
            let labels = [l.ip.to_string(), l.port.to_string(), l.pid.to_string()];
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.backlog_capacity
                .with_label_values(&labels)
                .set(l.capacity as i64);
            self.backlog_depth
                .with_label_values(&labels)
                .set(l.depth as i64);
            self.backlog_accepted
                .with_label_values(&labels)
                .set(l.accepted_waiting as i64);
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        let mut text = String::from_utf8(buf).unwrap_or_default();
        render_connect_histogram(&n, &mut text);
        text
    }
}

/// `dsan_san_connect_duration_seconds`, from the lcore's fixed buckets (the
/// registry's histograms cannot take pre-counted buckets).
fn render_connect_histogram(n: &Counters, out: &mut String) {
    use std::fmt::Write as _;
    let name = "dsan_san_connect_duration_seconds";
    let _ = writeln!(out, "# HELP {name} Time from a SAN connect request to its accept, connecting side (successful connects).");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cum = 0u64;
    for (i, ub) in dataplane::proto::CONNECT_BUCKETS_S.iter().enumerate() {
        cum += n.connect_buckets[i];
        let _ = writeln!(out, "{name}_bucket{{le=\"{ub}\"}} {cum}");
    }
    cum += n.connect_buckets[dataplane::proto::CONNECT_BUCKETS_S.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(out, "{name}_sum {}", n.connect_sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count {cum}");
}

/// Scrapes served at once; a connection beyond that is closed at once.
const MAX_CLIENTS: usize = 16;
/// A client has this long to send its request head, and the whole exchange
/// twice as long.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest request head read (request line and headers; hyper's minimum).
const MAX_REQUEST: usize = 8 * 1024;

/// Serves `GET /metrics` on `listener` until the process exits, with hyper
/// (HTTP/1.1) on a single-threaded tokio runtime: every connection is a task
/// of its own, at most `MAX_CLIENTS` at once (more are closed at once), a
/// request head must arrive within `DEADLINE` and fit `MAX_REQUEST`, and
/// the whole exchange ends within twice that. A slow or silent client holds
/// only its own task, never another scrape. Rendering runs on tokio's
/// blocking pool.
pub fn serve(listener: TcpListener, metrics: Arc<Mutex<Metrics>>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return,
    };
    rt.block_on(async move {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let Ok((stream, _)) = l.accept().await else {
                // Out of descriptors (or memory): wait a little instead of
                // spinning on the error.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(req, metrics).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(DEADLINE)
                    .max_buf_size(MAX_REQUEST)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(DEADLINE * 2, conn).await;
            });
        }
    });
}

type Body = http_body_util::Full<hyper::body::Bytes>;

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    metrics: Arc<Mutex<Metrics>>,
) -> hyper::Response<Body> {
    let (status, ctype, body) =
        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
            let body = tokio::task::spawn_blocking(move || {
                metrics.lock().map(|m| m.render()).unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            (
                hyper::StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        } else {
            (
                hyper::StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics\n".to_string(),
            )
        };
    let mut r = hyper::Response::new(Body::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}
