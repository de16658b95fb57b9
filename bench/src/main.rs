//! dsan-bench: measurements of dsan against kernel TCP on the same path.
//!
//! Today it has one mode, `frame-rtt`: the one-frame round trip between two lab
//! hosts through both dataplanes (echo request and reply over the SAN
//! EtherType), for each idle policy and port kind asked for. It brings the lab
//! up and down itself.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control::{ctl, lab};
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

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

fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::FrameRtt {
            count,
            idle,
            mode,
            json,
        } => frame_rtt(count, &idle, &mode, json),
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
        let doc = json!({"benchmark": "frame-rtt", "machine": {"cpus": cpus, "cpu_model": model}, "results": results});
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
