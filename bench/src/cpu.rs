//! CPU time by class over a measured interval, so that a faster stack and a
//! cheaper one can be told apart on a shared machine:
//!
//! * `daemons`: both lab daemons, every thread (`/proc/PID/task/*/schedstat`,
//!   nanoseconds);
//! * `server`: the benchmark's server threads (each adds its own thread CPU
//!   clock when it ends, [`server_thread_done`]);
//! * `client`: the rest of this process: the connecting threads, the
//!   provider's and the switch's threads (`CLOCK_PROCESS_CPUTIME_ID`, which
//!   keeps the time of threads that ended, minus `server`);
//! * machine-wide from `/proc/stat` (ticks of 10 ms): `system` (kernel time
//!   in process context, including the system part of the classes above),
//!   `softirq` (network receive processing, charged to no process), `idle`
//!   and `steal` (time the hypervisor gave to others: a run with much steal
//!   measured a busy host, not the stack).
#![allow(unsafe_code)]

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static SERVER_NS: AtomicU64 = AtomicU64::new(0);

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a live out-parameter.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A server thread is ending: its CPU time joins the `server` class.
pub(crate) fn server_thread_done() {
    SERVER_NS.fetch_add(clock_ns(libc::CLOCK_THREAD_CPUTIME_ID), Ordering::Relaxed);
}

/// Both lab daemons' CPU time so far, ns.
fn daemons_ns() -> u64 {
    let mut total = 0u64;
    for h in ["h0", "h1"] {
        let pid =
            std::fs::read_to_string(format!("/run/dsan/lab/{h}/dsand.pid")).unwrap_or_default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", pid.trim())) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(st) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += st
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// The machine's `/proc/stat` totals, ns: system (+irq), softirq, idle
/// (+iowait), steal.
fn machine_ns() -> [u64; 4] {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ns = |ticks: u64| ticks * 1_000_000_000 / hz;
    // user nice system idle iowait irq softirq steal
    [ns(at(2) + at(5)), ns(at(6)), ns(at(3) + at(4)), ns(at(7))]
}

/// The counters at one moment.
#[derive(Clone, Copy)]
pub(crate) struct Snap {
    at: Instant,
    daemons: u64,
    process: u64,
    server: u64,
    machine: [u64; 4],
}

/// Now.
pub(crate) fn snap() -> Snap {
    Snap {
        at: Instant::now(),
        daemons: daemons_ns(),
        process: clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID),
        server: SERVER_NS.load(Ordering::Relaxed),
        machine: machine_ns(),
    }
}

/// CPU time per class over an interval, ns.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Use {
    pub(crate) daemons: u64,
    pub(crate) server: u64,
    pub(crate) client: u64,
    pub(crate) system: u64,
    pub(crate) softirq: u64,
    pub(crate) idle: u64,
    pub(crate) steal: u64,
    pub(crate) wall: u64,
}

/// The names of [`Use`]'s classes, in the order of [`Use::classes`].
pub(crate) const CLASSES: [&str; 7] = [
    "daemons", "server", "client", "system", "softirq", "idle", "steal",
];

impl Snap {
    /// What was used from `self` to now (call after the server threads
    /// ended, so that their time is in).
    pub(crate) fn used(&self) -> Use {
        let n = snap();
        let process = n.process.saturating_sub(self.process);
        let server = n.server.saturating_sub(self.server);
        Use {
            daemons: n.daemons.saturating_sub(self.daemons),
            server,
            client: process.saturating_sub(server),
            system: n.machine[0].saturating_sub(self.machine[0]),
            softirq: n.machine[1].saturating_sub(self.machine[1]),
            idle: n.machine[2].saturating_sub(self.machine[2]),
            steal: n.machine[3].saturating_sub(self.machine[3]),
            wall: n.at.duration_since(self.at).as_nanos() as u64,
        }
    }
}

impl Use {
    /// The classes' values, as [`CLASSES`] names them.
    pub(crate) fn classes(&self) -> [u64; 7] {
        [
            self.daemons,
            self.server,
            self.client,
            self.system,
            self.softirq,
            self.idle,
            self.steal,
        ]
    }

    /// The CPU the measured processes used (daemons, server, client), ns.
    pub(crate) fn processes(&self) -> u64 {
        self.daemons + self.server + self.client
    }

    /// Per operation, microseconds, by class (and `processes`, their
    /// sum); `steal_pct` of the wall time of all CPUs.
    pub(crate) fn per_op(&self, ops: u64, cpus: usize) -> Value {
        if ops == 0 {
            return Value::Null;
        }
        let per = |ns: u64| ns as f64 / 1000.0 / ops as f64;
        let mut m = serde_json::Map::new();
        for (name, v) in CLASSES.iter().zip(self.classes()) {
            m.insert(format!("{name}_us"), json!(per(v)));
        }
        m.insert("processes_us".into(), json!(per(self.processes())));
        m.insert("steal_pct".into(), json!(self.steal_pct(cpus)));
        Value::Object(m)
    }

    /// Steal time over the interval, percent of all CPUs' wall time.
    pub(crate) fn steal_pct(&self, cpus: usize) -> f64 {
        if self.wall == 0 {
            return 0.0;
        }
        self.steal as f64 * 100.0 / (self.wall as f64 * cpus.max(1) as f64)
    }
}

/// The machine's steal time over a whole run, from its start.
pub(crate) struct RunMeter(Snap);

impl RunMeter {
    /// Starts measuring.
    pub(crate) fn start() -> RunMeter {
        RunMeter(snap())
    }
    /// The run's idle and steal, percent of all CPUs' time.
    pub(crate) fn summary(&self) -> Value {
        let u = self.0.used();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let all = (u.wall as f64 * cpus as f64).max(1.0);
        json!({"wall_s": u.wall as f64 / 1e9, "steal_pct": u.steal as f64 * 100.0 / all,
               "idle_pct": u.idle as f64 * 100.0 / all, "softirq_pct": u.softirq as f64 * 100.0 / all})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_shows_in_the_client_class_and_a_server_in_its_own() {
        let s = snap();
        let spin = |ms: u64| {
            let end = Instant::now() + std::time::Duration::from_millis(ms);
            let mut x = 0u64;
            while Instant::now() < end {
                x = x.wrapping_add(1);
            }
            std::hint::black_box(x);
        };
        spin(50);
        std::thread::spawn(move || {
            spin(30);
            server_thread_done();
        })
        .join()
        .unwrap();
        let u = s.used();
        assert!(u.server >= 25_000_000, "{u:?}");
        assert!(u.client >= 45_000_000, "{u:?}");
        assert!(u.wall >= 80_000_000, "{u:?}");
        let j = u.per_op(10, 2);
        assert!(j["processes_us"].as_f64().unwrap() >= 7000.0, "{j}");
    }
}
