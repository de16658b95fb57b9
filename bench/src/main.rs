//! dsan-bench: measurements of dsan against kernel TCP on the same path.
//!
//! Today it has one mode, `frame-rtt`: the one-frame round trip between two lab
//! hosts through both dataplanes (echo request and reply over the SAN
//! EtherType), for each idle policy and port kind asked for. It brings the lab
//! up and down itself.
#![deny(unsafe_code)] // only the modules that need it allow it

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control::{ctl, lab};
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

mod breakdown;
mod compare;
mod connect;
mod cpu;
mod data;
mod peer;
mod suite;
mod tables;

/// dsan-bench: dsan's benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One-frame round trip between two lab hosts through the dataplane.
    FrameRtt {
        /// Probes per configuration (after a warm-up of 10%).
        #[arg(long, default_value_t = 20000)]
        count: u64,
        /// Idle policies to measure (comma-separated: adaptive,poll).
        #[arg(long, default_value = "adaptive,poll")]
        idle: String,
        /// Port kinds to measure (comma-separated: af_packet,memif).
        #[arg(long, default_value = "af_packet,memif")]
        mode: String,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every scenario, dsan against kernel TCP in one run: connect latency
    /// (accepting thread spinning and waiting), reject latency into a full
    /// backlog, no-listener latency, closed-loop and open-loop setup rates,
    /// and byte streams (pingpong 64 B / 1 KiB / 16 KiB, a one-way stream,
    /// connect-request-response-close); for each idle policy. Writes a table, bench.hlog, *.hgrm, summary.json
    /// and bench.png.
    Suite {
        /// Connects per latency scenario.
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// Connectors of the closed-loop rate scenario.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Offered rate of the open-loop scenario, connects per second.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Length of each rate scenario, milliseconds.
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        /// Connections per second the overload scenario's application
        /// accepts (it is offered --rate per second).
        #[arg(long, default_value_t = 1000)]
        overload_accept: u64,
        /// How long a kernel TCP connect into a full backlog may stay pending
        /// before it counts as "not refused", milliseconds.
        #[arg(long, default_value_t = 1000)]
        reject_wait_ms: u64,
        /// Idle policies to measure (comma-separated: adaptive,poll).
        #[arg(long, default_value = "adaptive,poll")]
        idle: String,
        /// Output directory (default: `bench-out/suite-<time>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A seconds-long run of every scenario (as the test suite does).
        #[arg(long)]
        smoke: bool,
        /// Runs of the whole suite, the paths of each comparison in an order
        /// rotated per run; tables show the median ratio and its range.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// Byte streams, SAN against kernel TCP between the same two lab hosts
    /// in one run: pingpong (request/response latency, 64 B, 1 KiB, 16 KiB;
    /// netperf TCP_RR), stream (one-way Gbit/s; iperf3) and crr (connect,
    /// request, response, close; netperf TCP_CRR), for each idle policy.
    Data {
        /// Exchanges per pingpong and crr row (after a warm-up of 10%).
        #[arg(long, default_value_t = 20000)]
        count: u64,
        /// Bytes of the stream rows.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Idle policies to measure (comma-separated: adaptive,poll).
        #[arg(long, default_value = "adaptive")]
        idle: String,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write each latency row's .hgrm here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Link MTUs to measure (comma-separated; 9000: jumbo frames;
        /// 61346: the lab's default on af_packet, its largest).
        #[arg(long, default_value = "1500,9000,61346")]
        mtu: String,
        /// Port kinds to measure (comma-separated: af_packet,memif). memif
        /// joins the two daemons through shared memory, with no kernel on
        /// the SAN's path (as a NIC has none); kernel TCP stays on the veth,
        /// so its rows are not the same path (1500-byte MTU only).
        #[arg(long, default_value = "af_packet")]
        mode: String,
        /// Runs of each row, dsan and kernel TCP alternating, which goes
        /// first changing every run (rate: the median run; latencies: every
        /// run merged; dsan/tcp: the median of the runs' ratios, with their
        /// range).
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// Compares two `dsan-bench data --repeat N --json` files row by row:
    /// each row's change (median of the new runs over median of the old)
    /// with a 95 % bootstrap interval, for the rate and for the dsan/tcp
    /// ratio; "faster" or "slower" only when the interval excludes 1.0.
    Compare {
        /// The file before the change.
        old: PathBuf,
        /// The file after it.
        new: PathBuf,
    },
    /// The tables of docs/benchmarks.md, generated from the JSON under
    /// docs/bench (what scripts/bench.sh writes): --write replaces the
    /// doc's generated blocks, --check fails if one differs from the data,
    /// --print NAME prints one block.
    Tables {
        /// The data files' directory.
        #[arg(long, default_value = "docs/bench")]
        data: PathBuf,
        /// The document.
        #[arg(long, default_value = "docs/benchmarks.md")]
        doc: PathBuf,
        /// Rewrite the document's generated blocks.
        #[arg(long, conflicts_with_all = ["check", "print"])]
        write: bool,
        /// Check the document's generated blocks against the data.
        #[arg(long, conflicts_with = "print")]
        check: bool,
        /// Print one block (provenance, headline, suite, cpu, data, apps, hosts).
        #[arg(long)]
        print: Option<String>,
        /// An apps.json elsewhere than DATA/apps (bench/apps.sh --out).
        #[arg(long)]
        apps: Option<PathBuf>,
    },
    /// The commit and dirty flag this binary was built from, as JSON (the
    /// provenance the benchmark scripts record).
    Provenance,
    /// Two-host mode, server side: answers on the SAN (attached to this
    /// host's dsand) and on kernel TCP on --port, until killed; pair it
    /// with `dsan-bench run --peer` on another host.
    Serve {
        /// The port (SAN and kernel TCP); port + 1 stays closed (the
        /// no-listener scenario).
        #[arg(long, default_value_t = 31000)]
        port: u16,
        /// This host's dsand control socket (default: $DSAN_SOCKET, else /run/dsan/dsand.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        duration_s: Option<u64>,
    },
    /// Two-host mode, client side: connect latency, the no-listener
    /// refusal and the closed-loop setup rate against a `dsan-bench serve`
    /// on --peer, SAN (through the switch) and kernel TCP on the same wire;
    /// the suite's outputs (table, bench.hlog, *.hgrm, summary.json,
    /// bench.png). The lab suite stays the default benchmark.
    Run {
        /// The serving host's SAN address.
        #[arg(long)]
        peer: std::net::Ipv4Addr,
        /// The port `dsan-bench serve` answers on.
        #[arg(long, default_value_t = 31000)]
        port: u16,
        /// This host's dsand control socket (default: $DSAN_SOCKET, else /run/dsan/dsand.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Connects per latency scenario.
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// Connectors of the closed-loop rate scenario.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Length of the rate scenario, milliseconds.
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        /// Output directory (default: `bench-out/peer-<time>`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Connection set-up latency, SAN against kernel TCP between the same two
    /// lab hosts, with the accepting thread blocked and spinning, for each
    /// idle policy; and the provider's command round trip.
    Connect {
        /// Connects per configuration (after a warm-up of 10%).
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// Idle policies to measure (comma-separated: adaptive,poll).
        #[arg(long, default_value = "adaptive,poll")]
        idle: String,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e)
            if e.use_stderr()
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) =>
        {
            let t = e.render().to_string();
            eprintln!(
                "dsan-bench: error: {} (see dsan-bench --help)",
                t.lines().next().unwrap_or("").trim_start_matches("error: ")
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    if let Err(e) = run(args) {
        eprintln!("dsan-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Where a set of figures comes from: the build's commit (and whether its
/// tree had uncommitted changes), when and with which command line.
/// The machine a run was on.
pub(crate) fn machine() -> serde_json::Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
    })
}

pub(crate) fn provenance() -> serde_json::Value {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "commit": env!("DSAN_BUILD_COMMIT"),
        "dirty": match env!("DSAN_BUILD_DIRTY") {
            "true" => json!(true),
            "false" => json!(false),
            _ => serde_json::Value::Null,
        },
        "date": date,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Provenance => {
            println!("{}", provenance());
            Ok(())
        }
        Cmd::Tables {
            data,
            doc,
            write,
            check,
            print,
            apps,
        } => {
            let src = tables::Sources { dir: data, apps };
            if let Some(name) = print {
                print!("{}", tables::block(&name, &src)?);
            } else if check {
                tables::check(&doc, &src)?;
                println!("{}: every generated block matches the data", doc.display());
            } else if write {
                let text = std::fs::read_to_string(&doc)
                    .with_context(|| format!("reading {}", doc.display()))?;
                std::fs::write(&doc, tables::rewrite(&text, &src)?)
                    .with_context(|| format!("writing {}", doc.display()))?;
                println!("{}: generated blocks rewritten", doc.display());
            } else {
                bail!("tables: say --write, --check or --print NAME");
            }
            Ok(())
        }
        Cmd::FrameRtt {
            count,
            idle,
            mode,
            json,
        } => frame_rtt(count, &idle, &mode, json),
        Cmd::Connect { count, idle, json } => connect_bench(count, &idle, json),
        Cmd::Compare { old, new } => compare::run(&old, &new).map(|_| ()),
        Cmd::Data {
            count,
            bytes,
            idle,
            json,
            out,
            mtu,
            mode,
            repeat,
        } => data_bench(DataOpts {
            count,
            bytes,
            idle,
            mtus: mtu,
            modes: mode,
            repeat,
            json_path: json,
            out,
        }),
        Cmd::Serve {
            port,
            socket,
            duration_s,
        } => peer::serve(peer::ServeOpts {
            port,
            socket,
            duration: duration_s.map(Duration::from_secs),
        }),
        Cmd::Run {
            peer,
            port,
            socket,
            count,
            concurrency,
            duration_ms,
            out,
        } => {
            if count == 0 || concurrency == 0 || duration_ms == 0 {
                bail!("--count, --concurrency and --duration-ms must be positive");
            }
            peer::run(peer::RunOpts {
                peer,
                port,
                socket,
                count,
                concurrency,
                duration: Duration::from_millis(duration_ms),
                out: out.unwrap_or_else(|| {
                    suite::default_out().with_file_name(format!(
                        "peer-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0)
                    ))
                }),
            })
        }
        Cmd::Suite {
            count,
            concurrency,
            rate,
            duration_ms,
            overload_accept,
            reject_wait_ms,
            idle,
            out,
            smoke,
            repeat,
        } => {
            let mut o = suite::Opts {
                repeat,
                count,
                concurrency,
                rate,
                duration: Duration::from_millis(duration_ms),
                reject_wait: Duration::from_millis(reject_wait_ms),
                idle: idle.split(',').map(|s| s.trim().to_string()).collect(),
                out: out.unwrap_or_else(suite::default_out),
                stream_bytes: 256 << 20,
                overload_accept,
            };
            if smoke {
                o.count = o.count.min(40);
                o.rate = o.rate.min(1000);
                o.duration = o.duration.min(Duration::from_millis(300));
                o.reject_wait = o.reject_wait.min(Duration::from_millis(50));
                o.stream_bytes = 8 << 20;
                o.overload_accept = o.overload_accept.min(300);
                o.repeat = o.repeat.min(2);
            }
            if o.count == 0
                || o.concurrency == 0
                || o.rate == 0
                || o.duration.is_zero()
                || o.overload_accept == 0
                || o.repeat == 0
            {
                bail!("--count, --concurrency, --rate, --duration-ms, --overload-accept and --repeat must be positive");
            }
            suite::run(o)
        }
    }
}

fn frame_rtt(count: u64, idle: &str, mode: &str, json_path: Option<PathBuf>) -> Result<()> {
    let dsand = std::env::current_exe()?.with_file_name("dsand");
    let mut results = Vec::new();
    println!("one-frame round trip h0 -> h1 -> h0 through both dataplanes, {count} probes each");
    println!(
        "{:<10} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "port", "idle", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "lost"
    );
    for m in mode.split(',') {
        let m: lab::Mode = m.trim().parse().map_err(anyhow::Error::msg)?;
        for p in idle.split(',') {
            let p = p.trim();
            p.parse::<dataplane::engine::IdlePolicy>()
                .map_err(anyhow::Error::msg)?;
            lab::down().map_err(anyhow::Error::msg)?;
            eprintln!("  measuring {m:?} / {p} ...");
            let r = (|| -> Result<serde_json::Value> {
                lab::up(&lab::UpOptions {
                    hosts: 2,
                    mode: m,
                    idle: p.to_string(),
                    dsand: dsand.clone(),
                    faults: Default::default(),
                    mtu: 1500,
                })
                .map_err(anyhow::Error::msg)?;
                let sock = lab::socket_of("h0");
                let warm = (count / 10).max(10);
                ctl::request(
                    &sock,
                    &json!({"cmd": "ping", "dst": "198.18.0.2", "count": warm}),
                    Duration::from_secs(60),
                )
                .map_err(anyhow::Error::msg)?;
                let v = ctl::request(
                    &sock,
                    &json!({"cmd": "ping", "dst": "198.18.0.2", "count": count}),
                    Duration::from_secs(600),
                )
                .map_err(anyhow::Error::msg)?;
                Ok(v)
            })();
            lab::down().map_err(anyhow::Error::msg)?;
            let v = r.with_context(|| format!("{m:?} / {p}"))?;
            let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
            for x in v["rtt_ns"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_u64())
            {
                h.saturating_record(x);
            }
            if h.is_empty() {
                bail!("no replies at all ({m:?}, {p})");
            }
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            let lost = count - v["received"].as_u64().unwrap_or(0);
            let port = match m {
                lab::Mode::AfPacket => "af_packet",
                lab::Mode::Memif => "memif",
            };
            println!(
                "{:<10} {:<9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
                port,
                p,
                us(0.5),
                us(0.9),
                us(0.99),
                us(0.999),
                h.max() as f64 / 1000.0,
                lost
            );
            results.push(json!({"port": port, "idle": p, "count": h.len(), "lost": lost,
                "p50_ns": h.value_at_quantile(0.5), "p90_ns": h.value_at_quantile(0.9), "p99_ns": h.value_at_quantile(0.99),
                "p999_ns": h.value_at_quantile(0.999), "max_ns": h.max()}));
        }
    }
    if let Some(p) = json_path {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        });
        let doc = json!({"benchmark": "frame-rtt", "provenance": provenance(), "machine": {"cpus": cpus, "cpu_model": model}, "results": results});
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({"count": h.len(), "p50_ns": h.value_at_quantile(0.5), "p90_ns": h.value_at_quantile(0.9), "p99_ns": h.value_at_quantile(0.99),
           "p999_ns": h.value_at_quantile(0.999), "max_ns": h.max()})
}

fn connect_bench(count: u64, idle: &str, json_path: Option<PathBuf>) -> Result<()> {
    use connect::AcceptMode;
    let dsand = std::env::current_exe()?.with_file_name("dsand");
    let mut results = Vec::new();
    println!("connection set-up h0 -> h1, {count} connects per row (us); dsan = SAN provider through both dataplanes, tcp = kernel TCP on the same veth");
    println!(
        "{:<9} {:<9} {:<5} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>6}",
        "idle",
        "accept",
        "path",
        "conn p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "acc p50",
        "p99",
        "p99.9",
        "errors"
    );
    let mut port = 20000u16;
    for p in idle.split(',') {
        let p = p.trim();
        p.parse::<dataplane::engine::IdlePolicy>()
            .map_err(anyhow::Error::msg)?;
        lab::down().map_err(anyhow::Error::msg)?;
        eprintln!("  lab up ({p}) ...");
        lab::up(&lab::UpOptions {
            hosts: 2,
            mode: lab::Mode::AfPacket,
            idle: p.to_string(),
            dsand: dsand.clone(),
            faults: Default::default(),
            mtu: 1500,
        })
        .map_err(anyhow::Error::msg)?;
        let (s0, s1) = (
            lab::socket_of("h0").display().to_string(),
            lab::socket_of("h1").display().to_string(),
        );
        let r = (|| -> Result<()> {
            let rtt = connect::command_rtt(&s0, count.max(1000) * 5)?;
            println!("{:<9} provider command round trip (library -> lcore -> library): p50 {:.2} us  p99 {:.2} us  p99.9 {:.2} us", p, us(&rtt, 0.5), us(&rtt, 0.99), us(&rtt, 0.999));
            results.push(json!({"idle": p, "what": "command_rtt", "latency": summary(&rtt)}));
            {
                port += 1;
                eprintln!("  {p} / switch ...");
                connect::san_via_switch(&s0, &s1, port, (count / 10).max(10))?;
                port += 1;
                let r = connect::san_via_switch(&s0, &s1, port, count)?;
                println!(
                    "{:<9} {:<9} {:<5} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} | {:>8.1} {:>8.1} {:>8.1} {:>6}",
                    p, "switch", "dsan",
                    us(&r.connected, 0.5), us(&r.connected, 0.9), us(&r.connected, 0.99), us(&r.connected, 0.999), r.connected.max() as f64 / 1000.0,
                    us(&r.accepted, 0.5), us(&r.accepted, 0.99), us(&r.accepted, 0.999), r.errors
                );
                results.push(
                    json!({"idle": p, "accept": "switch", "path": "dsan", "errors": r.errors,
                    "connected": summary(&r.connected), "accepted": summary(&r.accepted)}),
                );
            }
            for mode in [AcceptMode::Blocked, AcceptMode::Spinning] {
                for path in ["dsan", "tcp"] {
                    port += 1;
                    let warm = (count / 10).max(10);
                    eprintln!("  {p} / {} / {path} ...", mode.name());
                    let run = |n| {
                        if path == "dsan" {
                            connect::san(&s0, &s1, port, n, mode)
                        } else {
                            connect::tcp(port, n, mode)
                        }
                    };
                    run(warm)?;
                    port += 1;
                    let r = if path == "dsan" {
                        connect::san(&s0, &s1, port, count, mode)?
                    } else {
                        connect::tcp(port, count, mode)?
                    };
                    println!(
                        "{:<9} {:<9} {:<5} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} | {:>8.1} {:>8.1} {:>8.1} {:>6}",
                        p, mode.name(), path,
                        us(&r.connected, 0.5), us(&r.connected, 0.9), us(&r.connected, 0.99), us(&r.connected, 0.999), r.connected.max() as f64 / 1000.0,
                        us(&r.accepted, 0.5), us(&r.accepted, 0.99), us(&r.accepted, 0.999), r.errors
                    );
                    results.push(
                        json!({"idle": p, "accept": mode.name(), "path": path, "errors": r.errors,
                        "connected": summary(&r.connected), "accepted": summary(&r.accepted)}),
                    );
                }
            }
            Ok(())
        })();
        lab::down().map_err(anyhow::Error::msg)?;
        r?;
    }
    if let Some(path) = json_path {
        let doc = json!({"benchmark": "connect", "provenance": provenance(), "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)}, "results": results});
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The median of `v` (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// What `dsan-bench data` was asked for.
struct DataOpts {
    count: u64,
    bytes: u64,
    idle: String,
    mtus: String,
    modes: String,
    repeat: u32,
    json_path: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn data_bench(o: DataOpts) -> Result<()> {
    let DataOpts {
        count,
        bytes,
        idle,
        mtus,
        modes,
        repeat,
        json_path,
        out,
    } = o;
    let (idle, mtus) = (idle.as_str(), mtus.as_str());
    if count == 0 || bytes == 0 || repeat == 0 {
        bail!("--count, --bytes and --repeat must be positive");
    }
    let modes: Vec<lab::Mode> = modes
        .split(',')
        .map(|m| m.trim().parse::<lab::Mode>().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let dsand = std::env::current_exe()?.with_file_name("dsand");
    let mut results = Vec::new();
    let meter = cpu::RunMeter::start();
    if let Some(o) = &out {
        std::fs::create_dir_all(o).with_context(|| format!("creating {}", o.display()))?;
    }
    println!("byte streams h0 -> h1; dsan = SAN provider through both dataplanes, tcp = kernel TCP (TCP_NODELAY) on the same veth");
    if repeat > 1 {
        println!("{repeat} runs per row, dsan and tcp alternating (who goes first changes every run): rate = the median run, latencies = all runs merged, dsan/tcp = the median of the runs' ratios (min-max)");
    }
    println!("memif rows: the SAN over shared memory between the daemons, kernel TCP over the veth: not the same path, so no ratio");
    println!(
        "{:<9} {:<9} {:<5} {:<15} {:<5} {:>10} {:>9} {:>9} {:>9} {:>12} {:>9} {:>16} {:>9}",
        "idle",
        "port",
        "mtu",
        "test",
        "path",
        "p50 us",
        "p90",
        "p99",
        "p99.9",
        "rate",
        "cpu us",
        "dsan/tcp",
        "cpu d/t"
    );
    let mut port = 21000u16;
    let runs: Vec<(String, lab::Mode, u16)> = idle
        .split(',')
        .flat_map(|p| {
            modes.iter().flat_map(move |&mode| {
                mtus.split(',')
                    .map(move |m| (p.trim().to_string(), mode, m.trim().to_string()))
            })
        })
        .map(|(p, mode, m)| Ok((p, mode, m.parse::<u16>().context("--mtu")?)))
        .collect::<Result<_>>()?;
    for (p, mode, mtu) in runs {
        let p = p.as_str();
        p.parse::<dataplane::engine::IdlePolicy>()
            .map_err(anyhow::Error::msg)?;
        // The port kind's name, and its part of the .hgrm file names (none
        // for af_packet, the default).
        let (port_kind, file_kind) = match mode {
            lab::Mode::AfPacket => ("af_packet", ""),
            lab::Mode::Memif => ("memif", "memif-"),
        };
        if mode == lab::Mode::Memif && mtu != 1500 {
            eprintln!("  {p} / memif / mtu {mtu}: skipped (the memif lab has 1500-byte frames)");
            continue;
        }
        lab::down().map_err(anyhow::Error::msg)?;
        eprintln!("  lab up ({p}, {port_kind}, mtu {mtu}) ...");
        lab::up(&lab::UpOptions {
            hosts: 2,
            mode,
            idle: p.to_string(),
            dsand: dsand.clone(),
            faults: Default::default(),
            mtu,
        })
        .map_err(anyhow::Error::msg)?;
        let (s0, s1) = (
            lab::socket_of("h0").display().to_string(),
            lab::socket_of("h1").display().to_string(),
        );
        let r = (|| -> Result<()> {
            let san = data::San::attach(&s0, &s1)?;
            let tests: Vec<(String, &str)> = vec![
                ("pingpong-64".into(), "rr"),
                ("pingpong-1024".into(), "rr"),
                ("pingpong-16384".into(), "rr"),
                ("stream".into(), "stream"),
                ("crr".into(), "crr"),
            ];
            for (name, kind) in tests {
                let size: usize = name
                    .strip_prefix("pingpong-")
                    .map_or(64, |s| s.parse().unwrap_or(64));
                let n = if kind == "crr" {
                    (count / 4).max(100)
                } else {
                    count
                };
                let unit = if kind == "stream" { "Gbit/s" } else { "/s" };
                // Per path (dsan, tcp): every run's rate, latencies merged,
                // measured time.
                let mut rates: [Vec<f64>; 2] = [vec![], vec![]];
                // CPU per exchange (per MiB for the stream), per run: the
                // measured processes' total and each class's.
                let mut cpus: [Vec<f64>; 2] = [vec![], vec![]];
                let mut cpu_runs: [Vec<serde_json::Value>; 2] = [vec![], vec![]];
                let mut lats: [Option<Histogram<u64>>; 2] = [None, None];
                let mut elapsed = [0f64; 2];
                let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
                for run in 0..repeat {
                    // dsan first in even runs, kernel TCP first in odd ones.
                    let turn = if run % 2 == 0 { [0, 1] } else { [1, 0] };
                    for i in turn {
                        let path = ["dsan", "tcp"][i];
                        if repeat > 1 {
                            eprintln!(
                                "  {p} / {port_kind} / {name} / {path} ({}/{repeat}) ...",
                                run + 1
                            );
                        } else {
                            eprintln!("  {p} / {port_kind} / {name} / {path} ...");
                        }
                        let mut go = |n: u64, b: u64| -> Result<data::Res> {
                            port += 1;
                            match (kind, path) {
                                ("rr", "dsan") => san.pingpong(port, size, n),
                                ("rr", _) => data::tcp_pingpong(port, size, n),
                                ("stream", "dsan") => san.stream(port, b),
                                ("stream", _) => data::tcp_stream(port, b),
                                (_, "dsan") => san.crr(port, n),
                                _ => data::tcp_crr(port, n),
                            }
                        };
                        if run == 0 {
                            go((n / 10).max(10), (bytes / 10).max(1 << 20))?; // warm-up
                        }
                        let c0 = cpu::snap();
                        let r = go(n, bytes)?;
                        let used = c0.used();
                        let ops = if kind == "stream" {
                            r.units >> 20
                        } else {
                            r.units
                        };
                        cpus[i].push(used.processes() as f64 / 1000.0 / ops.max(1) as f64);
                        cpu_runs[i].push(used.per_op(ops, ncpu));
                        rates[i].push(if kind == "stream" {
                            r.units as f64 * 8.0 / r.elapsed.as_secs_f64() / 1e9
                        } else {
                            r.units as f64 / r.elapsed.as_secs_f64()
                        });
                        elapsed[i] += r.elapsed.as_secs_f64();
                        match &mut lats[i] {
                            Some(h) => h
                                .add(&r.lat)
                                .map_err(|e| anyhow::anyhow!("merging latencies: {e:?}"))?,
                            None => lats[i] = Some(r.lat),
                        }
                    }
                }
                let ratios: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(a, b)| a / b).collect();
                let cpu_ratios: Vec<f64> =
                    cpus[0].iter().zip(&cpus[1]).map(|(a, b)| a / b).collect();
                // Over different paths (memif against the veth) no ratio is
                // a dsan-against-TCP comparison: none is given.
                let same_path = mode == lab::Mode::AfPacket;
                for (i, path) in ["dsan", "tcp"].into_iter().enumerate() {
                    let rate = median(&rates[i]);
                    let cpu_us = median(&cpus[i]);
                    let lat = lats[i].take().expect("at least one run");
                    let (ratio, cpu_ratio) = if path == "tcp" && !same_path {
                        ("other path".to_string(), String::new())
                    } else if path == "tcp" {
                        let (m, lo, hi) =
                            suite::spread(&ratios).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                        let c = suite::spread(&cpu_ratios)
                            .map_or(String::new(), |c| format!("{:.2}x", c.0));
                        if ratios.len() > 1 {
                            (format!("{m:.2}x ({lo:.2}-{hi:.2})"), c)
                        } else {
                            (format!("{m:.2}x"), c)
                        }
                    } else {
                        (String::new(), String::new())
                    };
                    if kind == "stream" {
                        println!(
                            "{:<9} {:<9} {:<5} {:<15} {:<5} {:>10} {:>9} {:>9} {:>9} {:>12} {:>9} {:>16} {:>9}",
                            p,
                            port_kind,
                            mtu,
                            name,
                            path,
                            "-",
                            "-",
                            "-",
                            "-",
                            format!("{rate:.2} {unit}"),
                            format!("{cpu_us:.0}/MiB"),
                            ratio,
                            cpu_ratio
                        );
                    } else {
                        println!(
                            "{:<9} {:<9} {:<5} {:<15} {:<5} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>12} {:>9} {:>16} {:>9}",
                            p,
                            port_kind,
                            mtu,
                            name,
                            path,
                            us(&lat, 0.5),
                            us(&lat, 0.9),
                            us(&lat, 0.99),
                            us(&lat, 0.999),
                            format!("{rate:.0} {unit}"),
                            format!("{cpu_us:.1}"),
                            ratio,
                            cpu_ratio
                        );
                        if let Some(o) = &out {
                            std::fs::write(
                                o.join(format!("{p}-{file_kind}{mtu}-{name}-{path}.hgrm")),
                                suite::hgrm(&lat),
                            )?;
                        }
                    }
                    results.push(
                        json!({"idle": p, "port": port_kind, "mtu": mtu, "test": name, "path": path,
                        "paths": if same_path { "same veth" } else { "dsan over memif, tcp over the veth: not comparable" },
                        "rate": rate, "rate_unit": unit, "rates": rates[i], "elapsed_s": elapsed[i],
                        "cpu_us": cpu_us, "cpu_unit": if kind == "stream" { "per MiB" } else { "per exchange" },
                        "cpu_runs": cpu_runs[i],
                        "ratio_to_tcp_runs": if path == "dsan" && same_path { json!(ratios) } else { json!(null) },
                        "ratio_to_tcp": if path == "dsan" && same_path { suite::spread(&ratios).map_or(json!(null), |(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})) } else { json!(null) },
                        "cpu_ratio_to_tcp_runs": if path == "dsan" && same_path { json!(cpu_ratios) } else { json!(null) },
                        "latency": if kind == "stream" { json!(null) } else { summary(&lat) }}),
                    );
                }
            }
            Ok(())
        })();
        lab::down().map_err(anyhow::Error::msg)?;
        r?;
    }
    if let Some(path) = json_path {
        let doc = json!({"benchmark": "data", "provenance": provenance(), "machine": machine(), "machine_during_run": meter.summary(),
                         "order": "dsan first in odd runs, kernel TCP first in even ones", "runs": repeat, "cpu_classes": cpu::CLASSES, "results": results});
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }
}
