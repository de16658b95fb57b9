//! The NIC-less lab: one network namespace per emulated host (`dsan-h0`,
//! `dsan-h1`, ...), each with one veth end `san0` holding `198.18.0.(I+1)/24`,
//! joined directly (two hosts) or through a bridge in the `dsan-fabric`
//! namespace (more), and one `dsand` per host attached to its veth through
//! DPDK's `net_af_packet` PMD (or, in memif mode, two daemons joined by
//! `net_memif`). Everything the lab creates is named so that [`down`] can find
//! and remove it even after a crash; `down` is idempotent.

use crate::ctl;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the lab keeps its sockets, logs and pid files.
pub const STATE_DIR: &str = "/run/dsan/lab";
/// Namespace of the bridge joining more than two hosts.
pub const FABRIC_NS: &str = "dsan-fabric";
/// First metrics port; host I serves `127.0.0.1:(METRICS_BASE_PORT + I)`.
pub const METRICS_BASE_PORT: u16 = 19450;
/// The veth end's name inside each host namespace.
pub const HOST_IFACE: &str = "san0";

/// How hosts' daemons reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// DPDK's `net_af_packet` on each host's veth.
    AfPacket,
    /// DPDK's `net_memif` between two daemons (veths still carry kernel TCP).
    Memif,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "af_packet" | "af-packet" => Ok(Mode::AfPacket),
            "memif" => Ok(Mode::Memif),
            o => Err(format!(
                "unknown lab mode {o:?} (expected af_packet or memif)"
            )),
        }
    }
}

/// Options of `dsanctl lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of hosts (>= 2).
    pub hosts: usize,
    /// Port kind.
    pub mode: Mode,
    /// Idle policy of every daemon.
    pub idle: String,
    /// The dsand binary.
    pub dsand: PathBuf,
    /// Fault injection in every daemon (all 0: off).
    pub faults: dataplane::node::Faults,
    /// The links' MTU (576 to [`MAX_MTU`]; above 1500 af_packet mode only).
    pub mtu: u16,
}

/// What `lab up` reports per host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// `h0`, `h1`, ...
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its address with prefix.
    pub address: String,
    /// The DPDK port's MAC.
    pub mac: String,
    /// The daemon's control socket.
    pub control_socket: String,
    /// The metrics URL, reachable from the root namespace.
    pub metrics: String,
    /// The daemon's pid.
    pub pid: u32,
}

/// The largest MTU of a SAN link: a frame of it (with the Ethernet header
/// and af_packet's ring header) fills a 60 KiB PACKET_MMAP frame, and an
/// mbuf (whose size is 16 bits) holds it; as large as the emulated NIC's
/// frames go (a 64 KiB GSO buffer is what the kernel's TCP moves over the
/// same veth).
pub const MAX_MTU: u16 = 61440 - 14 - 80;

/// The lab's MTU when none is asked for: the fastest that works (the
/// largest on af_packet, where a frame costs the kernel a system call and a
/// copy whatever its size; memif's only one, 1500).
pub fn default_mtu(mode: Mode) -> u16 {
    match mode {
        Mode::AfPacket => MAX_MTU,
        Mode::Memif => 1500,
    }
}

/// The PACKET_MMAP frame size that holds a frame of `mtu`: whole pages, so
/// that one frame is one block (the af_packet PMD finds frame i at
/// i x frame size, which holds only when frames tile the blocks exactly).
pub fn frame_size(mtu: u16) -> usize {
    // (The kernel puts the frame's Ethernet header 66 bytes in: the ring's
    // header and address, aligned so that the network header is at 80.)
    (usize::from(mtu) + 14 + 80).div_ceil(4096) * 4096
}

/// A lab host's namespace name.
pub fn netns_name(i: usize) -> String {
    format!("dsan-h{i}")
}

/// A lab host's address (no prefix).
pub fn host_addr(i: usize) -> String {
    format!("198.18.0.{}", i + 1)
}

fn host_dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

/// The control socket of a lab host.
pub fn socket_of(name: &str) -> PathBuf {
    host_dir(name).join("dsand.sock")
}

/// Parses `hI` into I.
///
/// # Errors
/// If the name is not of that form.
pub fn parse_host(name: &str) -> Result<usize, String> {
    name.strip_prefix('h')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{name:?} is not a lab host name (expected h0, h1, ...)"))
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ns_run(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

fn lab_namespaces() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            *n == FABRIC_NS
                || n.strip_prefix("dsan-h")
                    .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
        .collect()
}

/// Whether a lab is (at least partly) up.
pub fn is_up() -> bool {
    !lab_namespaces().is_empty() || Path::new(STATE_DIR).exists()
}

/// The stored command line of a host's daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostSpec {
    dsand: PathBuf,
    args: Vec<String>,
    address: String,
    metrics: String,
}

fn spawn_daemon(name: &str, spec: &HostSpec) -> Result<Child, String> {
    let dir = host_dir(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dsand.log"))
        .map_err(|e| format!("cannot open log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(&spec.dsand)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spec.dsand.display()))?;
    std::fs::write(dir.join("dsand.pid"), child.id().to_string()).map_err(|e| e.to_string())?;
    Ok(child)
}

fn wait_ready(
    name: &str,
    child: &mut Child,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let sock = socket_of(name);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(host_dir(name).join("dsand.log")).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| l.contains("error"))
                .or_else(|| log.lines().last())
                .unwrap_or("");
            return Err(format!(
                "dsand of {name} exited ({st}) during start-up: {last}"
            ));
        }
        if let Ok(v) = ctl::request(&sock, &json!({"cmd": "status"}), Duration::from_secs(2)) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "dsand of {name} did not answer on {} within {timeout:?}",
                sock.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Brings the lab up and returns its hosts. On failure everything created is
/// removed again.
///
/// # Errors
/// A one-line description of what failed.
pub fn up(o: &UpOptions) -> Result<Vec<HostInfo>, String> {
    if o.hosts < 2 {
        return Err(format!("a lab needs at least 2 hosts (got {})", o.hosts));
    }
    if o.hosts > 200 {
        return Err(format!("a lab has at most 200 hosts (got {})", o.hosts));
    }
    if o.mode == Mode::Memif && o.hosts != 2 {
        return Err("memif mode joins exactly two hosts (use --hosts 2)".into());
    }
    if is_up() {
        return Err("a lab is already up (or left over): run `dsanctl lab down` first".into());
    }
    if !o.dsand.exists() {
        return Err(format!(
            "dsand binary not found at {} (build with cargo build --release, or pass --dsand)",
            o.dsand.display()
        ));
    }
    let r = build(o);
    if r.is_err() {
        let _ = down();
    }
    r
}

fn build(o: &UpOptions) -> Result<Vec<HostInfo>, String> {
    std::fs::create_dir_all(STATE_DIR).map_err(|e| format!("cannot create {STATE_DIR}: {e}"))?;
    for i in 0..o.hosts {
        let ns = netns_name(i);
        run("ip", &["netns", "add", &ns])?;
        ns_run(&ns, &["link", "set", "lo", "up"])?;
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ],
        );
    }
    if o.hosts == 2 {
        ns_run(
            &netns_name(0),
            &[
                "link",
                "add",
                HOST_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IFACE,
                "netns",
                &netns_name(1),
            ],
        )?;
    } else {
        run("ip", &["netns", "add", FABRIC_NS])?;
        ns_run(FABRIC_NS, &["link", "add", "br0", "type", "bridge"])?;
        ns_run(FABRIC_NS, &["link", "set", "br0", "up"])?;
        for i in 0..o.hosts {
            let p = format!("p{i}");
            ns_run(
                FABRIC_NS,
                &[
                    "link",
                    "add",
                    &p,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "netns",
                    &netns_name(i),
                ],
            )?;
            ns_run(FABRIC_NS, &["link", "set", &p, "master", "br0", "up"])?;
        }
    }
    for i in 0..o.hosts {
        let ns = netns_name(i);
        let mac = format!("02:d5:a0:00:00:{:02x}", i + 1);
        ns_run(&ns, &["link", "set", HOST_IFACE, "address", &mac])?;
        if o.mtu != 1500 {
            ns_run(&ns, &["link", "set", HOST_IFACE, "mtu", &o.mtu.to_string()])?;
            if o.hosts > 2 {
                ns_run(
                    FABRIC_NS,
                    &["link", "set", &format!("p{i}"), "mtu", &o.mtu.to_string()],
                )?;
            }
        }
        ns_run(
            &ns,
            &[
                "addr",
                "add",
                &format!("{}/24", host_addr(i)),
                "dev",
                HOST_IFACE,
            ],
        )?;
        ns_run(&ns, &["link", "set", HOST_IFACE, "up"])?;
    }
    let cpus = crate::os::allowed_cpus();
    let mut children = Vec::new();
    for i in 0..o.hosts {
        let name = format!("h{i}");
        std::fs::create_dir_all(host_dir(&name)).map_err(|e| e.to_string())?;
        let vdev = match o.mode {
            // A frame of the MTU (plus Ethernet and the ring's headers)
            // fits one PACKET_MMAP frame, and one frame one block.
            Mode::AfPacket if o.mtu > 1500 => format!(
                "net_af_packet0,iface={HOST_IFACE},qdisc_bypass=1,blocksz={0},framesz={0},framecnt=512",
                frame_size(o.mtu)
            ),
            Mode::AfPacket => format!("net_af_packet0,iface={HOST_IFACE},qdisc_bypass=1"),
            Mode::Memif => format!(
                "net_memif0,role={},id=0,socket={}/memif.sock,socket-abstract=no",
                if i == 0 { "server" } else { "client" },
                STATE_DIR
            ),
        };
        let metrics = format!("127.0.0.1:{}", METRICS_BASE_PORT + i as u16);
        let args = vec![
            format!("--host={name}"),
            format!("--netns={}", netns_name(i)),
            format!("--iface={HOST_IFACE}"),
            format!("--vdev={vdev}"),
            format!("--lcores={}", cpus[i % cpus.len()]),
            "--no-huge".into(),
            "--no-pci".into(),
            "--memory-mb=256".into(),
            format!("--file-prefix=dsan-{name}"),
            format!("--idle={}", o.idle),
            format!("--control-socket={}", socket_of(&name).display()),
            format!("--metrics-addr={metrics}"),
        ];
        let mut args = args;
        if o.mtu != 1500 {
            args.push(format!("--mtu={}", o.mtu));
        }
        if o.faults.active() {
            args.extend([
                format!("--fault-loss={}", o.faults.loss),
                format!("--fault-dup={}", o.faults.dup),
                format!("--fault-reorder={}", o.faults.reorder),
                // Each host its own stream of faults.
                format!("--fault-seed={}", o.faults.seed.wrapping_add(i as u64)),
            ]);
        }
        let spec = HostSpec {
            dsand: o.dsand.clone(),
            args,
            address: format!("{}/24", host_addr(i)),
            metrics: format!("http://{metrics}/metrics"),
        };
        std::fs::write(
            host_dir(&name).join("spec.json"),
            serde_json::to_string_pretty(&spec).unwrap(),
        )
        .map_err(|e| e.to_string())?;
        let mut child = spawn_daemon(&name, &spec)?;
        if o.mode == Mode::Memif && i == 0 {
            // The memif server must be listening before the client starts.
            wait_ready(&name, &mut child, Duration::from_secs(30))?;
        }
        children.push((name, spec, child));
    }
    let mut hosts = Vec::new();
    for (i, (name, spec, mut child)) in children.into_iter().enumerate() {
        let st = wait_ready(&name, &mut child, Duration::from_secs(30))?;
        hosts.push(HostInfo {
            name: name.clone(),
            netns: netns_name(i),
            address: spec.address,
            mac: st["mac"].as_str().unwrap_or("").to_string(),
            control_socket: socket_of(&name).display().to_string(),
            metrics: spec.metrics,
            pid: child.id(),
        });
    }
    std::fs::write(
        Path::new(STATE_DIR).join("hosts.json"),
        serde_json::to_string_pretty(&hosts).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    Ok(hosts)
}

/// Pids of lab daemons: those in pid files, and any `dsand` whose command line
/// names a lab file prefix (found even when the state directory is gone).
fn lab_daemon_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            let is_dsand = args.first().is_some_and(|a| a.ends_with(b"dsand"));
            let is_lab = args.iter().any(|a| a.starts_with(b"--file-prefix=dsan-h"));
            if is_dsand && is_lab {
                pids.push(pid);
            }
        }
    }
    pids
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn stop_pids(pids: &[i32], grace: Duration) {
    for &p in pids {
        kill(p, 15);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in pids {
        if alive(p) {
            kill(p, 9);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes everything a lab may have left: daemons, namespaces (and with them
/// the veths and the bridge), the state directory and DPDK's runtime files.
/// Safe to run at any time, any number of times.
///
/// # Errors
/// If something could not be removed.
pub fn down() -> Result<(), String> {
    stop_pids(&lab_daemon_pids(), Duration::from_secs(5));
    let mut errors = Vec::new();
    for ns in lab_namespaces() {
        if let Err(e) = run("ip", &["netns", "del", &ns]) {
            errors.push(e);
        }
    }
    if Path::new(STATE_DIR).exists() {
        if let Err(e) = std::fs::remove_dir_all(STATE_DIR) {
            errors.push(format!("cannot remove {STATE_DIR}: {e}"));
        }
    }
    for dir in ["/var/run/dpdk", "/run/dpdk"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("dsan-h") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The hosts of the running lab.
///
/// # Errors
/// If no lab is up.
pub fn hosts() -> Result<Vec<HostInfo>, String> {
    let s = std::fs::read_to_string(Path::new(STATE_DIR).join("hosts.json"))
        .map_err(|_| "no lab is up (run `dsanctl lab up`)".to_string())?;
    serde_json::from_str(&s).map_err(|e| format!("lab state is corrupt: {e}"))
}

fn check_host(name: &str) -> Result<(), String> {
    let i = parse_host(name)?;
    if !host_dir(name).join("spec.json").exists() || !lab_namespaces().contains(&netns_name(i)) {
        return Err(format!("lab host {name} does not exist (is the lab up?)"));
    }
    Ok(())
}

/// Stops one host's daemon (its namespace stays).
///
/// # Errors
/// If the host does not exist.
pub fn stop(name: &str) -> Result<(), String> {
    check_host(name)?;
    let pid: Option<i32> = std::fs::read_to_string(host_dir(name).join("dsand.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(p) = pid {
        stop_pids(&[p], Duration::from_secs(5));
    }
    let _ = std::fs::remove_file(host_dir(name).join("dsand.pid"));
    let _ = std::fs::remove_file(socket_of(name));
    Ok(())
}

/// Starts one host's daemon again with its original command line.
///
/// # Errors
/// If the host does not exist, its daemon runs already, or it fails to start.
pub fn start(name: &str) -> Result<u32, String> {
    check_host(name)?;
    if ctl::request(
        &socket_of(name),
        &json!({"cmd": "status"}),
        Duration::from_secs(1),
    )
    .is_ok()
    {
        return Err(format!("dsand of {name} is already running"));
    }
    let spec: HostSpec = serde_json::from_str(
        &std::fs::read_to_string(host_dir(name).join("spec.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut child = spawn_daemon(name, &spec)?;
    wait_ready(name, &mut child, Duration::from_secs(30))?;
    Ok(child.id())
}

/// Runs `cmd` inside host `name`'s namespace with `DSAN_SOCKET` set; returns
/// its exit code.
///
/// # Errors
/// If the host does not exist or the command cannot be started.
pub fn exec(name: &str, cmd: &[String]) -> Result<i32, String> {
    check_host(name)?;
    if cmd.is_empty() {
        return Err("lab exec needs a command after --".into());
    }
    let i = parse_host(name)?;
    let st = Command::new("ip")
        .args(["netns", "exec", &netns_name(i)])
        .args(cmd)
        .env("DSAN_SOCKET", socket_of(name))
        .status()
        .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
    Ok(st.code().unwrap_or(128 + 9))
}
