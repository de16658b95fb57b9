//! dsand, the dsan appliance daemon: one per SAN host.
//!
//! Start-up order: read the configuration (file, then flags), bind the metrics
//! endpoint (in the namespace dsand was started in, so the lab's endpoints are
//! reachable from the root namespace), enter the configured network namespace,
//! check everything that can be checked before DPDK starts (privileges, lcores,
//! vdevs, interfaces, hugepages), bring up EAL and the port, start the control
//! and metrics threads, and run the dataplane loop on the main lcore until
//! SIGTERM or SIGINT.

//!
//! | file | job |
//! |---|---|
//! | `main.rs` | command line, start-up order |
//! | `checks.rs` | configuration merge and host checks (`--check`) |
//! | `bringup.rs` | EAL, port, node, threads, the loop |
//! | `ctl_server.rs` | the control socket (applications' typed requests, the operator's queries) |
//! | `telemetry.rs` | DPDK telemetry commands |
#![deny(unsafe_code)] // only the modules that need it allow it

mod bringup;
mod checks;
mod ctl_server;
mod telemetry;

use anyhow::{bail, Context, Result};
use clap::Parser;
use control::config::Cidr;
use control::os;
use std::net::TcpListener;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub(crate) struct Args {
    /// Configuration file (TOML); flags below override it.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// Validate the configuration and the host, print what is wrong, and exit.
    #[arg(long)]
    pub(crate) check: bool,
    /// Host name for status and metrics.
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// Network namespace to enter before starting DPDK.
    #[arg(long)]
    pub(crate) netns: Option<String>,
    /// Kernel interface: source of the SAN addresses and, without --vdev, the
    /// af_packet port.
    #[arg(long)]
    pub(crate) iface: Option<String>,
    /// A SAN address with its prefix (repeatable), e.g. 198.18.0.1/24.
    #[arg(long = "san-addr")]
    pub(crate) san_addrs: Vec<Cidr>,
    /// EAL lcore list (-l), e.g. 1 or 0,1.
    #[arg(long, short = 'l')]
    pub(crate) lcores: Option<String>,
    /// EAL virtual device (repeatable), e.g. net_af_packet0,iface=san0.
    #[arg(long)]
    pub(crate) vdev: Vec<String>,
    /// EAL --no-huge (run without hugepages).
    #[arg(long)]
    pub(crate) no_huge: bool,
    /// EAL --no-pci (NIC-less hosts).
    #[arg(long)]
    pub(crate) no_pci: bool,
    /// EAL -m, MiB of memory.
    #[arg(long)]
    pub(crate) memory_mb: Option<u32>,
    /// EAL --file-prefix.
    #[arg(long)]
    pub(crate) file_prefix: Option<String>,
    /// Idle policy: poll or adaptive.
    #[arg(long)]
    pub(crate) idle: Option<String>,
    /// Control socket path.
    #[arg(long)]
    pub(crate) control_socket: Option<PathBuf>,
    /// Prometheus endpoint, e.g. 127.0.0.1:9450.
    #[arg(long)]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Limit: listeners on this host.
    #[arg(long)]
    pub(crate) max_listeners: Option<usize>,
    /// Limit: connect requests queued in all backlogs together.
    #[arg(long)]
    pub(crate) max_half_open: Option<usize>,
    /// Limit: a SAN connect gives up after this long (ETIMEDOUT), ms.
    #[arg(long)]
    pub(crate) connect_budget_ms: Option<u64>,
    /// The SAN link's MTU (default 1500; larger frames up to 61346).
    #[arg(long)]
    pub(crate) mtu: Option<u16>,
    /// Lab fault injection: drop this fraction of received SAN frames.
    #[arg(long)]
    pub(crate) fault_loss: Option<f64>,
    /// Lab fault injection: deliver this fraction of received SAN frames twice.
    #[arg(long)]
    pub(crate) fault_dup: Option<f64>,
    /// Lab fault injection: hold this fraction back 0.1-2 ms (reordering).
    #[arg(long)]
    pub(crate) fault_reorder: Option<f64>,
    /// Lab fault injection: the injector's seed.
    #[arg(long)]
    pub(crate) fault_seed: Option<u64>,
    /// SAN EtherType (decimal or 0x-hex).
    #[arg(long, value_parser = parse_u16)]
    pub(crate) ethertype: Option<u16>,
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 16-bit number"))
}

/// Bytes an mbuf needs for one frame of `mtu` as the af_packet port hands it over.
pub(crate) fn lab_frame_room(mtu: u16) -> usize {
    control::lab::frame_size(mtu)
}

pub(crate) fn log(level: &str, msg: &str) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "ts={}.{:06} level={level} msg={msg:?}",
        t.as_secs(),
        t.subsec_micros()
    );
}

fn main() {
    let args: Args = control::parse_args("dsand");
    if let Err(e) = run(args) {
        eprintln!("dsand: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let cfg = checks::merge(&args)?;
    // The metrics endpoint is bound before entering the namespace.
    let metrics_listener = match cfg.metrics_addr {
        Some(a) if !args.check => Some(
            TcpListener::bind(a).with_context(|| format!("cannot listen for metrics on {a}"))?,
        ),
        _ => None,
    };
    if let Some(ns) = &cfg.netns {
        os::enter_netns(ns)?;
    }
    let (eff, problems) = checks::validate(cfg);
    if args.check {
        if problems.is_empty() {
            let e = eff.expect("no problems means a configuration");
            println!(
                "ok: configuration and host are ready; EAL arguments: {}",
                e.eal.to_args("dsand").join(" ")
            );
            return Ok(());
        }
        for p in &problems {
            println!("problem: {p}");
        }
        bail!("{} problem(s) found", problems.len());
    }
    let Some(eff) = eff else {
        bail!("{}", problems[0]);
    };
    // Every attached process's event descriptors and control connection
    // are the daemon's: use what the hard limit allows (the unit sets it).
    if let Err(e) = os::raise_nofile_limit() {
        eprintln!("dsand: warning: cannot raise the descriptor limit: {e}");
    }
    bringup::serve(eff, metrics_listener)
}
