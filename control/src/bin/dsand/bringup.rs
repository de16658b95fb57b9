//! Bring-up: EAL, the port, the node and its threads (signals, metrics,
//! control socket, address follower), then the dataplane loop.

use super::checks::Effective;
use super::log;
use anyhow::{anyhow, Context, Result};
use control::lcore::Lcore;
use control::{metrics, os};
use dataplane::dpdk::{self, DpdkDevice, Mempool, Port};
use dataplane::engine::{self, EngineConfig, EngineShared};
use dataplane::node::{Command, Node, NodeConfig};
use dataplane::proto::{ProtoConfig, Subnet};
use dataplane::time::Clock;
use dataplane::wire::Ipv4;
use serde_json::json;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often dsand looks for new kernel TCP listeners (a look is two
/// `pread`s of /proc/net/sockstat*, and a sock_diag walk when the count of
/// TCP sockets moved; an idle daemon spends most of its 0.06 % of a core
/// here).
const LISTENER_REFRESH: Duration = Duration::from_millis(150);

pub(crate) fn serve(eff: Effective, metrics_listener: Option<TcpListener>) -> Result<()> {
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
    let mtu = eff
        .cfg
        .mtu
        .unwrap_or(1500)
        .clamp(576, control::lab::MAX_MTU);
    // One mbuf holds a whole frame of the MTU (af_packet copies a frame into
    // one mbuf; its PACKET_MMAP frame is sized as the lab sizes it).
    let room = (crate::lab_frame_room(mtu) + 128).max(2048 + 128);
    // As many as 160 MiB of them hold (4,095 at most): large frames take
    // fewer, and the pool stays within the lab's EAL memory.
    let fit = ((160usize << 20) / (room + 128)).clamp(1024, 4096);
    let mbufs = eff
        .cfg
        .mbufs
        .unwrap_or((1u32 << (usize::BITS - 1 - fit.leading_zeros())) - 1);
    let pool = Mempool::new(&eal, "dsan_mbufs", mbufs, 128, room as u16)?;
    let port = Port::start(&eal, port_id, &pool, 512, 512)?;
    let mac = port.mac()?;
    let pmd = port_name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string();
    let ethertype = eff
        .cfg
        .ethertype
        .unwrap_or(dataplane::wire::DEFAULT_ETHERTYPE);
    let rx_wake = rx_wake(&eff, &port, &pmd, ethertype);
    let rx_wake_name = rx_wake.name();
    if matches!(eff.idle, dataplane::engine::IdlePolicy::Adaptive { .. }) {
        log(
            "info",
            &format!("sleeping lcore wakes on a frame by: {rx_wake_name}"),
        );
    }
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
    // The kernel TCP ports listening on this host, so that a SAN request for
    // a TCP-only service is answered "TCP listening" (the switch then
    // connects over TCP at once). Checked every 150 ms, off the
    // lcore, and at once when the lcore asks (a request found no listener
    // at all: it is answered only after a scan begun since); the lcore reads
    // the set without a lock and wakes this thread without blocking.
    let tcp_ports = Arc::new(dataplane::proto::PortSet::default());
    {
        let ports = tcp_ports.clone();
        dataplane::sys::spawn_unpinned("tcp-listeners", move || {
            ports.set_scanner(std::thread::current());
            let mut warned = false;
            let mut scan = None;
            // A walk of the kernel's listening table costs about 0.1 ms
            // with cold caches: it runs when the namespace's count of
            // TCP sockets moved, and at least once a second.
            let mut seen: Option<u64> = None;
            let mut scanned = std::time::Instant::now();
            let mut first = true;
            let count = control::os::TcpSocketCount::new().ok();
            loop {
                let inuse = count.as_ref().and_then(|c| c.get());
                let due = ports.take_asked()
                    || first
                    || inuse.is_none()
                    || inuse != seen
                    || scanned.elapsed() >= Duration::from_secs(1);
                if !due {
                    std::thread::park_timeout(LISTENER_REFRESH);
                    continue;
                }
                first = false;
                seen = inuse;
                scanned = std::time::Instant::now();
                ports.scan_started();
                let r = match &mut scan {
                    Some(s) => control::os::TcpListenerScan::listeners(s),
                    None => control::os::TcpListenerScan::new().and_then(|mut s| {
                        let r = s.listeners();
                        scan = Some(s);
                        r
                    }),
                };
                if r.is_err() {
                    scan = None; // a dump may be left half read
                }
                match r {
                    Ok(l) => ports.replace_owned(l.into_iter().map(|(p, u)| (p, Some(u)))),
                    Err(e) if !warned => {
                        warned = true;
                        log(
                            "warn",
                            &format!("cannot list kernel TCP listeners (sock_diag): {e}"),
                        );
                    }
                    Err(_) => {}
                }
                std::thread::park_timeout(LISTENER_REFRESH);
            }
        })?;
    }
    let mut proto = ProtoConfig {
        tcp_listening: Some(tcp_ports),
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
    if let Some(v) = lim.max_half_open_per_source {
        proto.max_half_open_per_source = v;
    }
    if let Some(v) = lim.max_attempts {
        proto.max_attempts = v;
    }
    if let Some(ms) = lim.connect_budget_ms {
        proto.connect_budget = Duration::from_millis(ms);
        proto.tombstone_ttl = Duration::from_millis(ms * 2);
    }
    let node_cfg = NodeConfig {
        ethertype,
        proto: dataplane::proto::ProtoConfig { mtu, ..proto },
        faults: eff.cfg.faults.faults().map_err(|e| anyhow::anyhow!(e))?,
        // A quarter of the daemon's descriptors for one user's event
        // descriptors (main raised the soft limit to the hard one already).
        uid_event_fds: u32::try_from(os::raise_nofile_limit().unwrap_or(1024) / 4)
            .unwrap_or(u32::MAX)
            .max(256),
    };
    if node_cfg.faults.active() {
        super::log(
            "warn",
            &format!("fault injection on: {:?}", node_cfg.faults),
        );
    }
    let (mut node, handle) = Node::new(node_cfg, mac, addrs);
    let lcore = Lcore {
        engine: shared.clone(),
        node: handle.clone(),
    };

    // Signals stop the loop, after the node has released every process (their
    // queued requests are refused to the peers, their regions marked closed).
    {
        let lcore = lcore.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        dataplane::sys::spawn_unpinned("signals", move || {
            if let Some(sig) = signals.forever().next() {
                log(
                    "info",
                    &format!("signal {sig}: releasing attached processes, then stopping"),
                );
                if lcore.ask(Command::Shutdown, Duration::from_secs(2)).is_ok() {
                    // Let the loop transmit the refusals.
                    std::thread::sleep(Duration::from_millis(20));
                }
                lcore.engine.request_stop();
            }
        })?;
    }

    let fallbacks = Arc::new(control::metrics::Fallbacks::default());
    super::telemetry::register_telemetry(&eal, &lcore, &fallbacks);
    let info = Arc::new(json!({
        "host": eff.host, "pid": std::process::id(), "mac": mac.to_string(),
        "san_addrs": eff.cfg.san_addrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "idle": eff.idle.name(), "rx_wake": rx_wake_name, "pmd": pmd, "port": port_name,
        "lcore": eff.lcores.first().copied().unwrap_or(0),
        "netns": eff.cfg.netns, "metrics_addr": eff.cfg.metrics_addr.map(|a| a.to_string()),
        "control_socket": eff.socket.display().to_string(),
    }));

    if let Some(l) = metrics_listener {
        let port_stats = port.stats_reader();
        let m = metrics::Metrics::new(
            &eff.host,
            eff.idle.name(),
            &pmd,
            metrics::Sources {
                lcore: lcore.clone(),
                port: Box::new(move || {
                    port_stats
                        .stats()
                        .ok()
                        .map(|s| (s.ipackets, s.opackets, s.imissed + s.ierrors + s.rx_nombuf))
                }),
                listeners: {
                    let lcore = lcore.clone();
                    Box::new(move || {
                        lcore
                            .listeners(Duration::from_millis(500))
                            .unwrap_or_default()
                    })
                },
                fallbacks: fallbacks.clone(),
            },
        );
        let m = Arc::new(Mutex::new(m));
        dataplane::sys::spawn_unpinned("metrics", move || metrics::serve(l, m))?;
    }

    let _ = std::fs::remove_file(&eff.socket);
    let listener = UnixListener::bind(&eff.socket)
        .with_context(|| format!("cannot bind control socket {}", eff.socket.display()))?;
    // Applications of the socket's group may attach (the deploy guide makes it `dsan`).
    let _ = std::fs::set_permissions(
        &eff.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o660),
    );
    let socket_gid = std::fs::metadata(&eff.socket)
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0);
    {
        let cx = Arc::new(super::ctl_server::Ctx {
            lcore: lcore.clone(),
            info: info.clone(),
            port: port.stats_reader(),
            socket_gid,
            fallbacks: fallbacks.clone(),
            conns: Default::default(),
            refused: Default::default(),
            bad_requests: Default::default(),
        });
        dataplane::sys::spawn_unpinned("control", move || {
            loop {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) => {
                        // Out of descriptors (or memory): the pending
                        // connection stays queued; try again a little
                        // later instead of spinning on the error.
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                        ) {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        continue;
                    }
                };
                // One thread per connection, within limits per uid and in all.
                let Some(slot) = super::ctl_server::admit(&conn, &cx) else {
                    continue;
                };
                let cx = cx.clone();
                let _ = dataplane::sys::spawn_unpinned("control-conn", move || {
                    super::ctl_server::serve_conn(conn, &cx);
                    drop(slot);
                });
            }
        })?;
    }

    // Follow the interface's addresses at run time (the lab's hosts, and hosts
    // configured with `iface` and no `san_addrs`).
    if let (true, Some(iface)) = (eff.addrs_from_iface, eff.cfg.iface.clone()) {
        let handle = handle.clone();
        dataplane::sys::spawn_unpinned("addrs", move || {
            let mut last: Vec<(Ipv4, u8)> = handle
                .subnets
                .read()
                .map(|v| v.iter().map(|s| (s.addr, s.prefix)).collect())
                .unwrap_or_default();
            // The kernel says when addresses or links change
            // (rtnetlink); without that socket, look every 500 ms.
            let watch = match control::addrwatch::AddrWatch::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    log(
                        "warn",
                        &format!("no rtnetlink notifications ({e}): reading {iface} every 500 ms"),
                    );
                    None
                }
            };
            // Look once now: a change between start-up and the
            // subscription is not missed.
            let mut first = true;
            loop {
                match &watch {
                    _ if first => first = false,
                    Some(w) => {
                        if let Err(e) = w.wait() {
                            log("warn", &format!("rtnetlink: {e}"));
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(500)),
                }
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
        dev.set_wake(rx_wake);
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

/// What wakes the sleeping lcore when a frame arrives: the port's receive
/// interrupt if the driver has one; for af_packet, a kernel packet socket on
/// the same interface; otherwise nothing (the lcore wakes on a period).
fn rx_wake(eff: &Effective, port: &Port<'_>, pmd: &str, ethertype: u16) -> dpdk::RxWake {
    if let Some(fd) = port.rx_intr_fd() {
        return dpdk::RxWake::Interrupt(fd);
    }
    if pmd != "net_af_packet" {
        return dpdk::RxWake::None;
    }
    let iface = eff
        .eal
        .vdevs
        .iter()
        .filter(|v| control::config::vdev_driver(v).starts_with("net_af_packet"))
        .find_map(|v| control::config::vdev_arg(v, "iface"));
    match iface.map(|i| dataplane::sys::PacketWaker::open(i, ethertype)) {
        Some(Ok(w)) => dpdk::RxWake::Packet(w),
        Some(Err(e)) => {
            log(
                "warn",
                &format!("no packet socket to wake the lcore ({e}); it wakes every 50 us"),
            );
            dpdk::RxWake::None
        }
        None => dpdk::RxWake::None,
    }
}
