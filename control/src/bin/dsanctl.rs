//! dsanctl: administers a running dsand and brings the NIC-less lab up and down.
#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use control::{ctl, lab};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// dsanctl: talk to a running dsand, and run the NIC-less lab.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The daemon's control socket (default: $DSAN_SOCKET, else /run/dsan/dsand.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The daemon's identity, port and dataplane counters.
    Status,
    /// Echo probes through the dataplane to a SAN address (the one-frame round trip).
    Ping {
        /// Destination SAN address.
        dst: String,
        /// Number of probes.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Pause between a reply and the next probe, microseconds.
        #[arg(long, default_value_t = 0)]
        interval_us: u64,
        /// Wait for each reply at most this long, milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Listening SAN sockets: address, port, owner pid, backlog capacity and depth.
    Listeners,
    /// Established SAN connections: role, local and peer address, owner pid.
    Connections,
    /// The daemon's counters: connects by result and reason, frames, drops.
    Stats,
    /// The NIC-less lab.
    #[command(subcommand)]
    Lab(LabCmd),
}

#[derive(Subcommand, Debug)]
enum LabCmd {
    /// Create the namespaces, veths and daemons, and print each host.
    Up {
        /// Number of emulated hosts (at least 2).
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Port kind: af_packet (default) or memif.
        #[arg(long, default_value = "af_packet")]
        mode: lab::Mode,
        /// Idle policy of the daemons: adaptive (default) or poll.
        #[arg(long, default_value = "adaptive")]
        idle: String,
        /// The dsand binary (default: next to dsanctl).
        #[arg(long)]
        dsand: Option<PathBuf>,
        /// Fault injection: each daemon drops this fraction of the SAN
        /// frames it receives (0..1; counted as dropped, reason injected).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Fault injection: fraction of received SAN frames delivered twice.
        #[arg(long, default_value_t = 0.0)]
        dup: f64,
        /// Fault injection: fraction held back 0.1-2 ms, so later ones overtake them.
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        /// Seed of the fault injector (host i uses seed + i).
        #[arg(long, default_value_t = 1)]
        fault_seed: u64,
        /// MTU of the lab links, 576 to 61346 (default: 61346 on af_packet,
        /// the fastest; 1500 on memif, its only one).
        #[arg(long)]
        mtu: Option<u16>,
    },
    /// Remove everything the lab created (idempotent; also after a crash).
    Down,
    /// Run a command inside a host's namespace with DSAN_SOCKET set.
    Exec {
        /// h0, h1, ...
        host: String,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Stop one host's daemon.
    Stop {
        /// h0, h1, ...
        host: String,
    },
    /// Start one host's daemon again.
    Start {
        /// h0, h1, ...
        host: String,
    },
    /// List the lab's hosts.
    Status,
}

fn main() {
    let args: Args = control::parse_args("dsanctl");
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("dsanctl: error: {e}");
            std::process::exit(1);
        }
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn print_hosts(hosts: &[lab::HostInfo]) {
    println!(
        "{:<5} {:<10} {:<16} {:<18} {:<30} metrics",
        "host", "namespace", "address", "mac", "control socket"
    );
    for h in hosts {
        println!(
            "{:<5} {:<10} {:<16} {:<18} {:<30} {}",
            h.name, h.netns, h.address, h.mac, h.control_socket, h.metrics
        );
    }
}

fn run(args: Args) -> Result<i32, String> {
    let sock = ctl::socket_path(args.socket.as_deref());
    match args.cmd {
        Cmd::Status => {
            let v = ctl::request(&sock, &json!({"cmd": "status"}), Duration::from_secs(5))?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "host {} pid {} port {} ({}) mac {} idle {} lcore {}",
                    v["host"], v["pid"], v["port"], v["pmd"], v["mac"], v["idle"], v["lcore"]
                );
                println!("san addresses {}", v["san_addrs"]);
                println!("dataplane {}", v["lcore_stats"]);
                println!("frames received {}", v["frames_received"]);
                println!("frames sent {}", v["frames_sent"]);
                println!("drops {}", v["drops"]);
                println!("port {}", v["port_stats"]);
            }
            Ok(0)
        }
        Cmd::Ping {
            dst,
            count,
            interval_us,
            timeout_ms,
        } => {
            let wait = ctl::ping_budget(count, interval_us, timeout_ms)
                .map_err(|e| format!("ping: {e}"))?
                + Duration::from_secs(5);
            let req = json!({"cmd": "ping", "dst": dst, "count": count, "interval_us": interval_us, "timeout_ms": timeout_ms});
            let v = ctl::request(&sock, &req, wait)?;
            if args.json {
                println!("{v}");
            } else {
                print_ping(&v);
            }
            Ok(
                if v["received"] == v["sent"] && v["sent"].as_u64() == Some(count) {
                    0
                } else {
                    1
                },
            )
        }
        Cmd::Listeners => {
            let v = ctl::request(&sock, &json!({"cmd": "listeners"}), Duration::from_secs(5))?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "{:<16} {:>6} {:>8} {:>9} {:>7} {:>9}",
                    "address", "port", "pid", "capacity", "depth", "accepted"
                );
                for l in v["listeners"].as_array().into_iter().flatten() {
                    let n = |k: &str| l[k].as_u64().unwrap_or(0);
                    println!(
                        "{:<16} {:>6} {:>8} {:>9} {:>7} {:>9}",
                        l["address"].as_str().unwrap_or(""),
                        n("port"),
                        n("pid"),
                        n("backlog_capacity"),
                        n("backlog_depth"),
                        n("accepted_waiting")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Connections => {
            let v = ctl::request(
                &sock,
                &json!({"cmd": "connections"}),
                Duration::from_secs(5),
            )?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "{:<7} {:<22} {:<22} {:>8} {:<16} state",
                    "role", "local", "peer", "pid", "program"
                );
                for c in v["connections"].as_array().into_iter().flatten() {
                    println!(
                        "{:<7} {:<22} {:<22} {:>8} {:<16} {}",
                        c["role"].as_str().unwrap_or(""),
                        c["local"].as_str().unwrap_or(""),
                        c["peer"].as_str().unwrap_or(""),
                        c["pid"].as_u64().unwrap_or(0),
                        c["program"].as_str().unwrap_or(""),
                        if c["closing"] == json!(true) {
                            "closing"
                        } else {
                            "established"
                        }
                    );
                }
            }
            Ok(0)
        }
        Cmd::Stats => {
            let mut v = ctl::request(&sock, &json!({"cmd": "stats"}), Duration::from_secs(5))?;
            if args.json {
                println!("{v}");
            } else {
                if let Some(o) = v.as_object_mut() {
                    o.remove("ok");
                }
                print_tree("", &v);
            }
            Ok(0)
        }
        Cmd::Lab(l) => run_lab(l, args.json),
    }
}

/// Prints nested counters as `a.b.c value` lines.
fn print_tree(prefix: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_tree(&p, x);
            }
        }
        other => println!("{prefix} {other}"),
    }
}

fn print_ping(v: &Value) {
    let mut rtts: Vec<u64> = v["rtt_ns"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    rtts.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    match v["mac"].as_str() {
        Some(mac) => println!(
            "{} is at {} (resolved in {:.1} us)",
            v["dst"].as_str().unwrap_or(""),
            mac,
            us(v["resolve_ns"].as_u64().unwrap_or(0))
        ),
        None => println!(
            "{}: no answer to address resolution",
            v["dst"].as_str().unwrap_or("")
        ),
    }
    println!("{} probes sent, {} replies", v["sent"], v["received"]);
    if !rtts.is_empty() {
        println!(
            "round trip through both dataplanes: p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            us(percentile(&rtts, 0.5)),
            us(percentile(&rtts, 0.9)),
            us(percentile(&rtts, 0.99)),
            us(percentile(&rtts, 0.999)),
            us(*rtts.last().unwrap())
        );
    }
}

fn run_lab(cmd: LabCmd, json_out: bool) -> Result<i32, String> {
    match cmd {
        LabCmd::Up {
            hosts,
            mode,
            idle,
            dsand,
            loss,
            dup,
            reorder,
            fault_seed,
            mtu,
        } => {
            let mtu = mtu.unwrap_or(lab::default_mtu(mode));
            if mode == lab::Mode::Memif && mtu != 1500 {
                return Err(format!("--mtu {mtu}: memif links have an MTU of 1500"));
            }
            if !(576..=control::lab::MAX_MTU).contains(&mtu) {
                return Err(format!(
                    "--mtu must be between 576 and {}, not {mtu}",
                    control::lab::MAX_MTU
                ));
            }
            idle.parse::<dataplane::engine::IdlePolicy>()?;
            for (what, p) in [("--loss", loss), ("--dup", dup), ("--reorder", reorder)] {
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("{what} must be between 0 and 1, not {p}"));
                }
            }
            let dsand = match dsand.or_else(|| std::env::var_os("DSAN_DSAND").map(Into::into)) {
                Some(p) => p,
                None => std::env::current_exe()
                    .map_err(|e| e.to_string())?
                    .with_file_name("dsand"),
            };
            let hs = lab::up(&lab::UpOptions {
                hosts,
                mode,
                idle,
                dsand,
                faults: dataplane::node::Faults {
                    loss,
                    dup,
                    reorder,
                    seed: fault_seed,
                },
                mtu,
            })?;
            if json_out {
                println!("{}", serde_json::to_string(&hs).unwrap());
            } else {
                print_hosts(&hs);
            }
            Ok(0)
        }
        LabCmd::Down => {
            lab::down()?;
            if !json_out {
                println!("lab is down");
            }
            Ok(0)
        }
        LabCmd::Exec { host, cmd } => lab::exec(&host, &cmd),
        LabCmd::Stop { host } => {
            lab::stop(&host)?;
            println!("dsand of {host} stopped");
            Ok(0)
        }
        LabCmd::Start { host } => {
            let pid = lab::start(&host)?;
            println!("dsand of {host} started (pid {pid})");
            Ok(0)
        }
        LabCmd::Status => {
            let hs = lab::hosts()?;
            if json_out {
                println!("{}", serde_json::to_string(&hs).unwrap());
            } else {
                print_hosts(&hs);
            }
            Ok(0)
        }
    }
}
