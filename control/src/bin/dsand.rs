//! dsand, the dsan appliance daemon: one per SAN host.
//!
//! Start-up order: read the configuration (file, then flags), bind the metrics
//! endpoint (in the namespace dsand was started in, so the lab's endpoints are
//! reachable from the root namespace), enter the configured network namespace,
//! check everything that can be checked before DPDK starts (privileges, lcores,
//! vdevs, interfaces, hugepages), bring up EAL and the port, start the control
//! and metrics threads, and run the dataplane loop on the main lcore until
//! SIGTERM or SIGINT.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use control::config::{self, Cidr, Config};
use control::{metrics, os};
use dataplane::dpdk::{self, DpdkDevice, EalConfig, Mempool, Port};
use dataplane::engine::{self, EngineConfig, EngineShared, IdlePolicy};
use dataplane::node::{AppShared, Command, Node, NodeConfig, NodeHandle, PingRequest, KIND_NAMES};
use dataplane::proto::{ProtoConfig, Subnet};
use dataplane::time::Clock;
use dataplane::wire::Ipv4;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// dsand: the dsan appliance daemon (one per SAN host).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Configuration file (TOML); flags below override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Validate the configuration and the host, print what is wrong, and exit.
    #[arg(long)]
    check: bool,
    /// Host name for status and metrics.
    #[arg(long)]
    host: Option<String>,
    /// Network namespace to enter before starting DPDK.
    #[arg(long)]
    netns: Option<String>,
    /// Kernel interface: source of the SAN addresses and, without --vdev, the
    /// af_packet port.
    #[arg(long)]
    iface: Option<String>,
    /// A SAN address with its prefix (repeatable), e.g. 198.18.0.1/24.
    #[arg(long = "san-addr")]
    san_addrs: Vec<Cidr>,
    /// EAL lcore list (-l), e.g. 1 or 0,1.
    #[arg(long, short = 'l')]
    lcores: Option<String>,
    /// EAL virtual device (repeatable), e.g. net_af_packet0,iface=san0.
    #[arg(long)]
    vdev: Vec<String>,
    /// EAL --no-huge (run without hugepages).
    #[arg(long)]
    no_huge: bool,
    /// EAL --no-pci (NIC-less hosts).
    #[arg(long)]
    no_pci: bool,
    /// EAL -m, MiB of memory.
    #[arg(long)]
    memory_mb: Option<u32>,
    /// EAL --file-prefix.
    #[arg(long)]
    file_prefix: Option<String>,
    /// Idle policy: poll or adaptive.
    #[arg(long)]
    idle: Option<String>,
    /// Control socket path.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Prometheus endpoint, e.g. 127.0.0.1:9450.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Limit: listeners on this host.
    #[arg(long)]
    max_listeners: Option<usize>,
    /// Limit: connect requests queued in all backlogs together.
    #[arg(long)]
    max_half_open: Option<usize>,
    /// Limit: a SAN connect gives up after this long (ETIMEDOUT), ms.
    #[arg(long)]
    connect_budget_ms: Option<u64>,
    /// SAN EtherType (decimal or 0x-hex).
    #[arg(long, value_parser = parse_u16)]
    ethertype: Option<u16>,
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 16-bit number"))
}

fn log(level: &str, msg: &str) {
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
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                e.exit()
            }
            _ => {
                let text = e.render().to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("bad arguments")
                    .trim_start_matches("error: ");
                eprintln!("dsand: error: {first} (see dsand --help)");
                std::process::exit(2);
            }
        },
    };
    if let Err(e) = run(args) {
        eprintln!("dsand: error: {e:#}");
        std::process::exit(1);
    }
}

/// The effective configuration after merging file and flags and applying defaults.
struct Effective {
    cfg: Config,
    host: String,
    eal: EalConfig,
    idle: IdlePolicy,
    socket: PathBuf,
    lcores: Vec<u32>,
    /// The SAN addresses are the interface's, followed at run time.
    addrs_from_iface: bool,
}

fn merge(args: &Args) -> Result<Config> {
    let mut c = match &args.config {
        Some(p) => Config::load(p).map_err(|e| anyhow!(e))?,
        None => Config::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if args.$f.is_some() { c.$f = args.$f.clone(); } )* };
    }
    over!(
        host,
        netns,
        iface,
        idle,
        control_socket,
        metrics_addr,
        ethertype
    );
    if !args.san_addrs.is_empty() {
        c.san_addrs = args.san_addrs.clone();
    }
    if args.lcores.is_some() {
        c.eal.lcores = args.lcores.clone();
    }
    if !args.vdev.is_empty() {
        c.eal.vdev = args.vdev.clone();
    }
    if args.no_huge {
        c.eal.no_huge = true;
    }
    if args.no_pci {
        c.eal.no_pci = true;
    }
    if args.max_listeners.is_some() {
        c.limits.max_listeners = args.max_listeners;
    }
    if args.max_half_open.is_some() {
        c.limits.max_half_open = args.max_half_open;
    }
    if args.connect_budget_ms.is_some() {
        c.limits.connect_budget_ms = args.connect_budget_ms;
    }
    if args.memory_mb.is_some() {
        c.eal.memory_mb = args.memory_mb;
    }
    if args.file_prefix.is_some() {
        c.eal.file_prefix = args.file_prefix.clone();
    }
    Ok(c)
}

/// Everything that can be wrong before EAL starts, in the namespace we run in.
fn validate(mut cfg: Config) -> (Option<Effective>, Vec<String>) {
    let mut problems = Vec::new();
    if !os::can_use_raw_sockets() {
        problems.push(
            "dsand must run as root (or with CAP_NET_RAW, CAP_NET_ADMIN and CAP_IPC_LOCK)"
                .to_string(),
        );
    }
    let host = cfg.host.clone().unwrap_or_else(os::hostname);
    let idle = match cfg.idle_policy() {
        Ok(p) => p,
        Err(e) => {
            problems.push(e);
            IdlePolicy::ADAPTIVE_DEFAULT
        }
    };
    let allowed = os::allowed_cpus();
    let lcore_list = cfg
        .eal
        .lcores
        .clone()
        .unwrap_or_else(|| allowed.first().copied().unwrap_or(0).to_string());
    let lcores = match config::parse_lcores(&lcore_list) {
        Ok(l) => {
            for lc in &l {
                if !allowed.contains(lc) {
                    let avail: Vec<String> = allowed.iter().map(u32::to_string).collect();
                    problems.push(format!(
                        "lcore {lc} does not exist on this machine (available cpus: {})",
                        avail.join(",")
                    ));
                }
            }
            l
        }
        Err(e) => {
            problems.push(e);
            vec![]
        }
    };
    if cfg.eal.vdev.is_empty() && cfg.eal.allow.is_empty() {
        match &cfg.iface {
            Some(i) => cfg.eal.vdev.push(format!("net_af_packet0,iface={i},qdisc_bypass=1")),
            None => problems.push("no port configured: give a vdev (e.g. --vdev net_af_packet0,iface=eth1), a PCI allow-list, or --iface".into()),
        }
    }
    let ns = cfg
        .netns
        .clone()
        .map(|n| format!("network namespace {n:?}"))
        .unwrap_or_else(|| "this network namespace".into());
    for v in &cfg.eal.vdev {
        let drv = config::vdev_driver(v);
        if !config::KNOWN_VDEV_DRIVERS.contains(&drv) {
            problems.push(format!(
                "unknown vdev driver {drv:?} in {v:?} (known: {})",
                config::KNOWN_VDEV_DRIVERS.join(", ")
            ));
            continue;
        }
        if drv == "net_af_packet" {
            match config::vdev_arg(v, "iface") {
                None => problems.push(format!("vdev {v:?} needs iface=<interface>")),
                Some(i) if !os::interface_exists(i) => {
                    problems.push(format!("interface {i:?} does not exist in {ns}"))
                }
                _ => {}
            }
        }
        if drv == "net_memif" {
            if let Some(sock) = config::vdev_arg(v, "socket") {
                if let Some(dir) = Path::new(sock).parent() {
                    if !dir.as_os_str().is_empty() && !dir.is_dir() {
                        problems.push(format!(
                            "memif socket directory {} does not exist",
                            dir.display()
                        ));
                    }
                }
            }
        }
    }
    // A PCI NIC must be bound to a driver DPDK can use (vfio-pci, or a
    // bifurcated driver such as mlx5_core).
    for dev in &cfg.eal.allow {
        let pci = dev.split(',').next().unwrap_or("");
        let path = std::path::Path::new("/sys/bus/pci/devices").join(pci);
        if !path.exists() {
            problems.push(format!("PCI device {pci} does not exist"));
            continue;
        }
        let driver = std::fs::read_link(path.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        match driver.as_deref() {
            Some("vfio-pci" | "igb_uio" | "uio_pci_generic" | "mlx5_core" | "mlx4_core") => {}
            Some(d) => problems.push(format!("PCI device {pci} is bound to {d}; bind it to vfio-pci (dpdk-devbind.py -b vfio-pci {pci})")),
            None => problems.push(format!("PCI device {pci} is bound to no driver; bind it to vfio-pci (dpdk-devbind.py -b vfio-pci {pci})")),
        }
    }
    let addrs_from_iface = cfg.san_addrs.is_empty();
    if cfg.san_addrs.is_empty() {
        match &cfg.iface {
            Some(i) => match os::iface_addrs(i) {
                Some(a) if !a.is_empty() => {
                    cfg.san_addrs = a
                        .iter()
                        .map(|a| Cidr {
                            addr: a.addr,
                            prefix: a.prefix,
                        })
                        .collect()
                }
                Some(_) => problems.push(format!(
                    "interface {i:?} has no IPv4 address to use as SAN address; set san_addrs"
                )),
                None => problems.push(format!("interface {i:?} does not exist in {ns}")),
            },
            None => problems.push(
                "no SAN address: set san_addrs (e.g. --san-addr 198.18.0.1/24) or iface".into(),
            ),
        }
    }
    if !cfg.eal.no_huge && hugepages_free() == 0 {
        problems.push(
            "no free hugepages: reserve some (dpdk-hugepages.py --setup 1G) or set no_huge = true"
                .into(),
        );
    }
    let socket = cfg
        .control_socket
        .clone()
        .unwrap_or_else(|| config::DEFAULT_SOCKET.into());
    if let Some(dir) = socket.parent() {
        if !dir.is_dir() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                problems.push(format!(
                    "cannot create control socket directory {}: {e}",
                    dir.display()
                ));
            }
        }
    }
    if UnixStream::connect(&socket).is_ok() {
        problems.push(format!("another dsand already serves {}", socket.display()));
    }
    problems.dedup();
    if !problems.is_empty() {
        return (None, problems);
    }
    let eal = EalConfig {
        lcores: lcore_list,
        main_lcore: cfg.eal.main_lcore,
        vdevs: cfg.eal.vdev.clone(),
        allow: cfg.eal.allow.clone(),
        no_pci: cfg.eal.no_pci,
        no_huge: cfg.eal.no_huge,
        memory_mb: cfg
            .eal
            .memory_mb
            .or(if cfg.eal.no_huge { Some(256) } else { None }),
        file_prefix: cfg
            .eal
            .file_prefix
            .clone()
            .unwrap_or_else(|| format!("dsand-{host}")),
        extra: if cfg.eal.extra.iter().any(|a| a.starts_with("--log-level")) {
            cfg.eal.extra.clone()
        } else {
            let mut e = vec!["--log-level=notice".to_string()];
            e.extend(cfg.eal.extra.iter().cloned());
            e
        },
    };
    (
        Some(Effective {
            cfg,
            host,
            eal,
            idle,
            socket,
            lcores,
            addrs_from_iface,
        }),
        vec![],
    )
}

fn hugepages_free() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn run(args: Args) -> Result<()> {
    let cfg = merge(&args)?;
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
    let (eff, problems) = validate(cfg);
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
    serve(eff, metrics_listener)
}

fn serve(eff: Effective, metrics_listener: Option<TcpListener>) -> Result<()> {
    let eal_args = eff.eal.to_args("dsand");
    log(
        "info",
        &format!(
            "starting host={} idle={} eal={:?}",
            eff.host,
            eff.idle.name(),
            eal_args
        ),
    );
    let eal = dpdk::Eal::init(&eal_args)?;
    let ports = eal.ports();
    let (port_id, port_name) = ports
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("DPDK found no port (check the vdev or PCI allow-list)"))?;
    let mbufs = eff.cfg.mbufs.unwrap_or(4095);
    let pool = Mempool::new(&eal, "dsan_mbufs", mbufs, 128, 2048 + 128)?;
    let port = Port::start(&eal, port_id, &pool, 512, 512)?;
    let mac = port.mac()?;
    let pmd = port_name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string();
    let addrs: Vec<Ipv4> = eff.cfg.san_addrs.iter().map(|c| c.addr).collect();
    log(
        "info",
        &format!(
            "port {} ({port_name}) up mac={mac} san_addrs={:?} lcore={}",
            port_id.0,
            addrs,
            eff.lcores.first().copied().unwrap_or(0)
        ),
    );

    let shared = EngineShared::new(eff.idle)?;
    let mut proto = ProtoConfig {
        subnets: eff
            .cfg
            .san_addrs
            .iter()
            .map(|c| Subnet {
                addr: c.addr,
                prefix: c.prefix,
            })
            .collect(),
        ..Default::default()
    };
    let lim = &eff.cfg.limits;
    if let Some(v) = lim.max_listeners {
        proto.max_listeners = v;
    }
    if let Some(v) = lim.max_half_open {
        proto.max_half_open = v;
    }
    if let Some(v) = lim.max_attempts {
        proto.max_attempts = v;
    }
    if let Some(ms) = lim.connect_budget_ms {
        proto.connect_budget = Duration::from_millis(ms);
        proto.tombstone_ttl = Duration::from_millis(ms * 2);
    }
    let node_cfg = NodeConfig {
        ethertype: eff
            .cfg
            .ethertype
            .unwrap_or(dataplane::wire::DEFAULT_ETHERTYPE),
        proto,
    };
    let (mut node, handle) = Node::new(node_cfg, mac, addrs);

    // Signals stop the loop, after the node has released every process (their
    // queued requests are refused to the peers, their regions marked closed).
    {
        let shared = shared.clone();
        let handle = handle.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log(
                        "info",
                        &format!("signal {sig}: releasing attached processes, then stopping"),
                    );
                    let (tx, rx) = std::sync::mpsc::channel();
                    if handle.commands.push(Command::Shutdown(tx)).is_ok() {
                        shared.doorbell.ring();
                        let _ = rx.recv_timeout(Duration::from_secs(2));
                        // Let the loop transmit the refusals.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    shared.request_stop();
                }
            })?;
    }

    let fallbacks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    register_telemetry(&eal, &shared, &handle, &fallbacks);
    let info = Arc::new(json!({
        "host": eff.host, "pid": std::process::id(), "mac": mac.to_string(),
        "san_addrs": eff.cfg.san_addrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "idle": eff.idle.name(), "pmd": pmd, "port": port_name,
        "lcore": eff.lcores.first().copied().unwrap_or(0),
        "netns": eff.cfg.netns, "metrics_addr": eff.cfg.metrics_addr.map(|a| a.to_string()),
        "control_socket": eff.socket.display().to_string(),
    }));

    if let Some(l) = metrics_listener {
        let pid = port_id;
        let m = metrics::Metrics::new(
            &eff.host,
            eff.idle.name(),
            &pmd,
            metrics::Sources {
                engine: shared.clone(),
                node: handle.clone(),
                port: Box::new(move || {
                    dpdk::stats_of(pid)
                        .ok()
                        .map(|s| (s.ipackets, s.opackets, s.imissed + s.ierrors + s.rx_nombuf))
                }),
                listeners: {
                    let (shared, handle) = (shared.clone(), handle.clone());
                    Box::new(move || {
                        let (tx, rx) = std::sync::mpsc::channel();
                        if handle.commands.push(Command::Listeners(tx)).is_err() {
                            return Vec::new();
                        }
                        shared.doorbell.ring();
                        rx.recv_timeout(Duration::from_millis(500))
                            .unwrap_or_default()
                    })
                },
                fallbacks: fallbacks.clone(),
            },
        );
        let m = Arc::new(Mutex::new(m));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                dataplane::sys::unpin_current_thread();
                metrics::serve(l, m)
            })?;
    }

    let _ = std::fs::remove_file(&eff.socket);
    let listener = UnixListener::bind(&eff.socket)
        .with_context(|| format!("cannot bind control socket {}", eff.socket.display()))?;
    // Applications of the socket's group may attach (the deploy guide makes it `dsan`).
    let _ = std::fs::set_permissions(
        &eff.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o660),
    );
    let socket_gid = Arc::new(
        std::fs::metadata(&eff.socket)
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
            .unwrap_or(0),
    );
    {
        let shared = shared.clone();
        let handle = handle.clone();
        let info = info.clone();
        let fallbacks = fallbacks.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                dataplane::sys::unpin_current_thread();
                for conn in listener.incoming().flatten() {
                    let (shared, handle, info) = (shared.clone(), handle.clone(), info.clone());
                    let port = port_id;
                    let socket_gid = socket_gid.clone();
                    let fallbacks = fallbacks.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            dataplane::sys::unpin_current_thread();
                            serve_conn(conn, &shared, &handle, &info, port, *socket_gid, &fallbacks)
                        });
                }
            })?;
    }

    // Follow the interface's addresses at run time (the lab's hosts, and hosts
    // configured with `iface` and no `san_addrs`).
    if let (true, Some(iface)) = (eff.addrs_from_iface, eff.cfg.iface.clone()) {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("addrs".into())
            .spawn(move || {
                dataplane::sys::unpin_current_thread();
                let mut last: Vec<(Ipv4, u8)> = handle
                    .subnets
                    .read()
                    .map(|v| v.iter().map(|s| (s.addr, s.prefix)).collect())
                    .unwrap_or_default();
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let Some(now) = os::iface_addrs(&iface) else {
                        continue;
                    };
                    let now: Vec<(Ipv4, u8)> = now.iter().map(|a| (a.addr, a.prefix)).collect();
                    if now != last {
                        log(
                            "info",
                            &format!("SAN addresses of {iface} changed: {now:?}"),
                        );
                        handle.set_addrs(
                            now.iter().map(|a| a.0).collect(),
                            now.iter()
                                .map(|&(addr, prefix)| Subnet { addr, prefix })
                                .collect(),
                        );
                        last = now;
                    }
                }
            })?;
    }

    log(
        "info",
        &format!("ready control_socket={}", eff.socket.display()),
    );
    {
        let mut dev = DpdkDevice::new(&port, &pool)?;
        let cfg = EngineConfig {
            idle: eff.idle,
            ..Default::default()
        };
        engine::run(&mut dev, &mut node, &cfg, &shared, Clock::new());
    }
    log("info", "dataplane stopped; releasing the port");
    let _ = std::fs::remove_file(&eff.socket);
    drop(port);
    drop(pool);
    drop(eal);
    log("info", "stopped");
    Ok(())
}

/// The host's SAN addresses now, as `ip/prefix`.
fn current_addrs(node: &NodeHandle) -> Vec<String> {
    node.subnets
        .read()
        .map(|v| {
            v.iter()
                .map(|s| format!("{}/{}", s.addr, s.prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// DPDK telemetry commands: `/dsan/listeners`, `/dsan/connections`,
/// `/dsan/stats` (read with `dpdk-telemetry.py -f <file-prefix>`).
fn register_telemetry(
    eal: &dpdk::Eal,
    shared: &Arc<EngineShared>,
    node: &NodeHandle,
    fallbacks: &Arc<std::sync::atomic::AtomicU64>,
) {
    use dpdk::TelemetryValue;
    let (s1, n1) = (shared.clone(), node.clone());
    let listeners: dpdk::TelemetryFn = Box::new(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        if n1.commands.push(Command::Listeners(tx)).is_err() {
            return TelemetryValue::Strings(vec![]);
        }
        s1.doorbell.ring();
        let v = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
        TelemetryValue::Strings(
            v.iter()
                // Telemetry names allow letters, digits and '_' only.
                .map(|l| {
                    (
                        format!("port_{}_{}", l.port, l.ip.to_string().replace('.', "_")),
                        format!(
                            "address {} port {} pid {} backlog_capacity {} backlog_depth {}",
                            l.ip, l.port, l.pid, l.capacity, l.depth
                        ),
                    )
                })
                .collect(),
        )
    });
    let (s2, n2) = (shared.clone(), node.clone());
    let connections: dpdk::TelemetryFn = Box::new(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        if n2.commands.push(Command::Connections(tx)).is_err() {
            return TelemetryValue::Strings(vec![]);
        }
        s2.doorbell.ring();
        let v = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
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
    let (n3, s3, f3) = (node.clone(), shared.clone(), fallbacks.clone());
    let stats: dpdk::TelemetryFn = Box::new(move || {
        let n = &n3.stats;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut v = vec![
            (
                "connect_requests_received".to_string(),
                ld(&n.requests_received),
            ),
            ("connects_accepted".to_string(), ld(&n.accepted)),
            ("switch_fallbacks".to_string(), f3.load(Ordering::Relaxed)),
            ("attached_processes".to_string(), ld(&n.attached)),
            ("lcore_busy_polls".to_string(), ld(&s3.stats.busy_polls)),
            ("lcore_idle_polls".to_string(), ld(&s3.stats.idle_polls)),
        ];
        for (k, a) in [
            "backlog_full",
            "no_listener",
            "refused",
            "no_resources",
            "listener_closed",
        ]
        .iter()
        .zip(&n.rejected)
        {
            v.push((format!("rejected_{k}"), ld(a)));
        }
        for (k, a) in ["connected", "refused", "reset", "timed_out"]
            .iter()
            .zip(&n.attempts)
        {
            v.push((format!("attempts_{k}"), ld(a)));
        }
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

static NEXT_APP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn serve_conn(
    conn: UnixStream,
    shared: &EngineShared,
    node: &NodeHandle,
    info: &Value,
    port: dpdk::PortId,
    socket_gid: u32,
    fallbacks: &std::sync::atomic::AtomicU64,
) {
    use std::os::fd::AsRawFd;
    let fd = conn.as_raw_fd();
    let mut app: Option<Arc<AppShared>> = None;
    loop {
        let (line, fds) = match dataplane::shm::recv_line(fd) {
            Ok(Some(x)) => x,
            _ => break,
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut out_fds = Vec::new();
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => match req["cmd"].as_str() {
                Some("attach") => attach(fd, shared, node, socket_gid, &mut app, &mut out_fds)
                    .unwrap_or_else(|e| json!({"ok": false, "error": e})),
                Some("event_select") => event_select(&req, app.as_deref(), fds)
                    .unwrap_or_else(|e| json!({"ok": false, "error": e})),
                Some("switch_fallback") => {
                    fallbacks.fetch_add(1, Ordering::Relaxed);
                    json!({"ok": true})
                }
                _ => handle_request(&req, shared, node, info, port)
                    .unwrap_or_else(|e| json!({"ok": false, "error": e})),
            },
            Err(e) => {
                json!({"ok": false, "error": format!("malformed request (expected one JSON object per line): {e}")})
            }
        };
        if dataplane::shm::send_line(fd, &reply.to_string(), &out_fds).is_err() {
            break;
        }
    }
    // The process went away (or detached): release what it held.
    if let Some(app) = app {
        let (tx, rx) = std::sync::mpsc::channel();
        if node.commands.push(Command::Detach(app.id, tx)).is_ok() {
            shared.doorbell.ring();
            if rx.recv_timeout(Duration::from_secs(5)).is_err() {
                log(
                    "warn",
                    &format!("dataplane did not confirm the detach of pid {}", app.pid),
                );
                // Keep the region mapped: the lcore may still use it.
                std::mem::forget(app);
                return;
            }
        }
        log("info", &format!("detached pid {}", app.pid));
    }
}

fn attach(
    fd: i32,
    shared: &EngineShared,
    node: &NodeHandle,
    socket_gid: u32,
    app: &mut Option<Arc<AppShared>>,
    out_fds: &mut Vec<i32>,
) -> Result<Value, String> {
    if app.is_some() {
        return Err("this connection is already attached".into());
    }
    let (pid, uid, gid) =
        os::peer_cred(fd).map_err(|e| format!("cannot read peer credentials: {e}"))?;
    if uid != 0 && uid != os::euid() && gid != socket_gid {
        return Err(format!(
            "uid {uid} may not attach (root, the daemon's user or the socket's group only)"
        ));
    }
    let id = NEXT_APP.fetch_add(1, Ordering::Relaxed);
    let a = AppShared::new(id, pid).map_err(|e| format!("cannot create the shared region: {e}"))?;
    node.commands
        .push(Command::Attach(a.clone()))
        .map_err(|_| "the dataplane's command queue is full; try again".to_string())?;
    shared.doorbell.ring();
    out_fds.push(a.region.fd().ok_or("region without fd")?);
    out_fds.push(shared.doorbell.page_fd().ok_or("doorbell without fd")?);
    out_fds.push(shared.doorbell.eventfd());
    log("info", &format!("attached pid {pid} uid {uid} as app {id}"));
    *app = Some(a);
    Ok(
        json!({"ok": true, "app": id, "region_size": dataplane::shm::layout::size(), "version": dataplane::shm::REGION_VERSION, "san_addrs": current_addrs(node),
              "fds": ["region", "doorbell_page", "doorbell"]}),
    )
}

fn event_select(
    req: &Value,
    app: Option<&AppShared>,
    mut fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Value, String> {
    let app = app.ok_or("attach first")?;
    let sock = req["sock"]
        .as_u64()
        .filter(|s| (*s as usize) < dataplane::shm::MAX_SOCKETS)
        .ok_or("\"sock\" out of range")? as u32;
    app.set_event_fd(sock, fds.pop());
    Ok(json!({"ok": true}))
}

fn handle_request(
    req: &Value,
    shared: &EngineShared,
    node: &NodeHandle,
    info: &Value,
    port: dpdk::PortId,
) -> Result<Value, String> {
    match req["cmd"].as_str() {
        Some("status") => {
            let s = &shared.stats;
            let n = &node.stats;
            let by_kind = |arr: &[std::sync::atomic::AtomicU64]| -> Value {
                KIND_NAMES
                    .iter()
                    .zip(arr)
                    .map(|(k, v)| (k.to_string(), json!(v.load(Ordering::Relaxed))))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            };
            let ps = dpdk::stats_of(port).ok();
            let mut v = info.clone();
            v["ok"] = json!(true);
            v["san_addrs"] = json!(current_addrs(node));
            v["lcore_stats"] = json!({
                "rx_frames": s.rx_frames.load(Ordering::Relaxed), "tx_frames": s.tx_frames.load(Ordering::Relaxed),
                "tx_dropped": s.tx_dropped.load(Ordering::Relaxed), "alloc_failed": s.alloc_failed.load(Ordering::Relaxed),
                "busy_polls": s.busy_polls.load(Ordering::Relaxed), "idle_polls": s.idle_polls.load(Ordering::Relaxed),
                "sleeps": s.sleeps.load(Ordering::Relaxed), "sleeping": shared.doorbell.is_sleeping(),
            });
            v["frames_received"] = by_kind(&n.rx_by_kind);
            v["frames_sent"] = by_kind(&n.tx_by_kind);
            v["drops"] = json!({
                "not_san": n.drop_not_san.load(Ordering::Relaxed), "malformed": n.drop_malformed.load(Ordering::Relaxed),
                "version": n.drop_version.load(Ordering::Relaxed), "not_ours": n.drop_not_ours.load(Ordering::Relaxed),
                "unexpected": n.drop_unexpected.load(Ordering::Relaxed),
            });
            if let Some(ps) = ps {
                v["port_stats"] = json!({"ipackets": ps.ipackets, "opackets": ps.opackets, "imissed": ps.imissed, "ierrors": ps.ierrors, "oerrors": ps.oerrors, "rx_nombuf": ps.rx_nombuf});
            }
            Ok(v)
        }
        Some("ping") => {
            let dst: Ipv4 = req["dst"]
                .as_str()
                .ok_or("ping needs \"dst\": a SAN IPv4 address")?
                .parse()
                .map_err(|_| "\"dst\" is not an IPv4 address")?;
            let count = req["count"].as_u64().unwrap_or(1);
            if count == 0 || count > 10_000_000 {
                return Err("\"count\" must be between 1 and 10000000".into());
            }
            let interval = Duration::from_micros(req["interval_us"].as_u64().unwrap_or(0));
            let timeout =
                Duration::from_millis(req["timeout_ms"].as_u64().unwrap_or(1000).clamp(1, 60_000));
            let (tx, rx) = std::sync::mpsc::channel();
            node.commands
                .push(Command::Ping(PingRequest {
                    dst,
                    count: count as u32,
                    interval,
                    timeout,
                    reply: tx,
                }))
                .map_err(|_| "the dataplane's command queue is full; try again")?;
            shared.doorbell.ring();
            let wait = timeout * 2 + (timeout + interval) * count as u32 + Duration::from_secs(5);
            let r = rx
                .recv_timeout(wait)
                .map_err(|_| "the dataplane did not finish the probe in time")?;
            Ok(
                json!({"ok": true, "dst": dst.to_string(), "mac": r.mac.map(|m| m.to_string()), "resolve_ns": r.resolve_ns,
                      "sent": r.sent, "received": r.received, "rtt_ns": r.rtt_ns}),
            )
        }
        Some("listeners") => {
            let (tx, rx) = std::sync::mpsc::channel();
            node.commands
                .push(Command::Listeners(tx))
                .map_err(|_| "the dataplane's command queue is full; try again")?;
            shared.doorbell.ring();
            let v = rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "the dataplane did not answer")?;
            let list: Vec<Value> = v
                .iter()
                .map(|l| json!({"address": l.ip.to_string(), "port": l.port, "pid": l.pid, "backlog_capacity": l.capacity, "backlog_depth": l.depth}))
                .collect();
            Ok(json!({"ok": true, "listeners": list}))
        }
        Some("connections") => {
            let (tx, rx) = std::sync::mpsc::channel();
            node.commands.push(Command::Connections(tx)).map_err(|_| "the dataplane's command queue is full; try again")?;
            shared.doorbell.ring();
            let v = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the dataplane did not answer")?;
            let list: Vec<Value> = v
                .iter()
                .map(|c| json!({"role": c.role, "local": format!("{}:{}", c.local.0, c.local.1), "peer": format!("{}:{}", c.peer.0, c.peer.1), "pid": c.pid, "closing": c.closing}))
                .collect();
            Ok(json!({"ok": true, "connections": list}))
        }
        Some("stats") => {
            let n = &node.stats;
            let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let reasons = ["backlog_full", "no_listener", "refused", "no_resources", "listener_closed"];
            let results = ["connected", "refused", "reset", "timed_out"];
            Ok(json!({"ok": true,
                "connect_requests_received": ld(&n.requests_received),
                "connects_accepted": ld(&n.accepted),
                "connects_rejected": reasons.iter().zip(&n.rejected).map(|(k, v)| (k.to_string(), json!(ld(v)))).collect::<serde_json::Map<_, _>>(),
                "connect_attempts": results.iter().zip(&n.attempts).map(|(k, v)| (k.to_string(), json!(ld(v)))).collect::<serde_json::Map<_, _>>(),
                "frames_received": KIND_NAMES.iter().zip(&n.rx_by_kind).map(|(k, v)| (k.to_string(), json!(ld(v)))).collect::<serde_json::Map<_, _>>(),
                "frames_sent": KIND_NAMES.iter().zip(&n.tx_by_kind).map(|(k, v)| (k.to_string(), json!(ld(v)))).collect::<serde_json::Map<_, _>>(),
                "drops": {"not_san": ld(&n.drop_not_san), "malformed": ld(&n.drop_malformed), "version": ld(&n.drop_version),
                          "not_ours": ld(&n.drop_not_ours), "unexpected": ld(&n.drop_unexpected), "bad_token": ld(&n.drop_bad_token),
                          "bad_command": ld(&n.bad_commands)},
                "attached_processes": ld(&n.attached),
                "lcore": {"busy_polls": ld(&shared.stats.busy_polls), "idle_polls": ld(&shared.stats.idle_polls), "sleeps": ld(&shared.stats.sleeps)},
            }))
        }
        Some(other) => Err(format!(
            "unknown command {other:?} (known: status, stats, ping, listeners, connections, attach, event_select)"
        )),
        None => Err("request has no \"cmd\"".into()),
    }
}
