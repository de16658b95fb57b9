//! The effective configuration (file, then flags, then defaults) and every
//! check that can run before DPDK starts.

use super::Args;
use anyhow::{anyhow, Result};
use control::config::{self, Cidr, Config};
use control::os;
use dataplane::dpdk::EalConfig;
use dataplane::engine::IdlePolicy;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The effective configuration after merging file and flags and applying defaults.
pub(crate) struct Effective {
    pub(crate) cfg: Config,
    pub(crate) host: String,
    pub(crate) eal: EalConfig,
    pub(crate) idle: IdlePolicy,
    pub(crate) socket: PathBuf,
    pub(crate) lcores: Vec<u32>,
    /// The SAN addresses are the interface's, followed at run time.
    pub(crate) addrs_from_iface: bool,
}

pub(crate) fn merge(args: &Args) -> Result<Config> {
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
    if args.mtu.is_some() {
        c.mtu = args.mtu;
    }
    if args.fault_loss.is_some() {
        c.faults.loss = args.fault_loss;
    }
    if args.fault_dup.is_some() {
        c.faults.dup = args.fault_dup;
    }
    if args.fault_reorder.is_some() {
        c.faults.reorder = args.fault_reorder;
    }
    if args.fault_seed.is_some() {
        c.faults.seed = args.fault_seed;
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
pub(crate) fn validate(mut cfg: Config) -> (Option<Effective>, Vec<String>) {
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
