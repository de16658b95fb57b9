//! DPDK telemetry commands.

use super::log;
use control::lcore::{counters_flat, Lcore};
use dataplane::dpdk;
use std::sync::Arc;
use std::time::Duration;

/// DPDK telemetry commands: `/dsan/listeners`, `/dsan/connections`,
/// `/dsan/stats` (read with `dpdk-telemetry.py -f <file-prefix>`).
pub(crate) fn register_telemetry(
    eal: &dpdk::Eal,
    lcore: &Lcore,
    fallbacks: &Arc<control::metrics::Fallbacks>,
) {
    use dpdk::TelemetryValue;
    let l1 = lcore.clone();
    let listeners: dpdk::TelemetryFn = Box::new(move || {
        let v = l1.listeners(Duration::from_secs(2)).unwrap_or_default();
        TelemetryValue::Strings(
            v.iter()
                // Telemetry names allow letters, digits and '_' only.
                .map(|l| {
                    (
                        format!("port_{}_{}", l.port, l.ip.to_string().replace('.', "_")),
                        format!(
                            "address {} port {} pid {} backlog_capacity {} backlog_depth {} accepted_waiting {}",
                            l.ip, l.port, l.pid, l.capacity, l.depth, l.accepted_waiting
                        ),
                    )
                })
                .collect(),
        )
    });
    let l2 = lcore.clone();
    let connections: dpdk::TelemetryFn = Box::new(move || {
        let v = l2.connections(Duration::from_secs(2)).unwrap_or_default();
        TelemetryValue::Strings(
            v.iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("c{i}"),
                        format!(
                            "{} {}:{} -> {}:{} pid {}{}",
                            c.role,
                            c.local.0,
                            c.local.1,
                            c.peer.0,
                            c.peer.1,
                            c.pid,
                            if c.closing { " closing" } else { "" }
                        ),
                    )
                })
                .collect(),
        )
    });
    let (l3, f3) = (lcore.clone(), fallbacks.clone());
    let stats: dpdk::TelemetryFn = Box::new(move || {
        let mut v = counters_flat(&l3.counters(), &l3.engine.stats);
        v.push(("switch_fallbacks".to_string(), f3.total()));
        TelemetryValue::Numbers(v)
    });
    for (cmd, help, f) in [
        (
            "/dsan/listeners",
            "SAN listeners: address:port -> owner pid, backlog capacity and depth",
            listeners,
        ),
        (
            "/dsan/connections",
            "Established SAN connections",
            connections,
        ),
        (
            "/dsan/stats",
            "dsan counters: connects by reason and result, switch fallbacks, polls",
            stats,
        ),
    ] {
        if let Err(e) = dpdk::register_telemetry(eal, cmd, help, f) {
            log(
                "warn",
                &format!("telemetry command {cmd} not registered: {e}"),
            );
        }
    }
}
