//! The safe DPDK layer: the only module that calls `dpdk-sys`.
//!
//! Each DPDK call is wrapped once, over newtypes ([`PortId`]),
//! with failures turned into [`DpdkError`] built from `rte_errno` /
//! `rte_strerror`. [`Mbuf`] owns its buffer and frees it on drop; [`DpdkDevice`]
//! implements [`Device`] over one rx and one tx queue of a port.
#![allow(unsafe_code)]

use crate::device::{Device, BURST};
use crate::wire::EthernetAddress;
use dpdk_sys as sys;
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// A DPDK failure: the operation and DPDK's errno and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed: {msg} (errno {errno})")]
pub struct DpdkError {
    /// The DPDK function or step that failed.
    pub op: &'static str,
    /// `rte_errno` or the negative return value, made positive.
    pub errno: i32,
    /// `rte_strerror(errno)`.
    pub msg: String,
}

impl DpdkError {
    fn from_errno(op: &'static str, errno: i32) -> Self {
        // SAFETY: rte_strerror returns a pointer to a static or thread-local
        // NUL-terminated string, valid at least until the next call on this thread.
        let msg = unsafe { CStr::from_ptr(sys::rte_strerror(errno)) }
            .to_string_lossy()
            .into_owned();
        DpdkError { op, errno, msg }
    }
    fn last(op: &'static str) -> Self {
        // SAFETY: reads the calling thread's rte_errno.
        Self::from_errno(op, unsafe { sys::rte_errno() })
    }
    fn check(op: &'static str, rc: i32) -> std::result::Result<i32, Self> {
        if rc < 0 {
            Err(Self::from_errno(op, -rc))
        } else {
            Ok(rc)
        }
    }
}

/// Result of a DPDK call.
pub type Result<T> = std::result::Result<T, DpdkError>;

/// An ethdev port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortId(pub u16);

/// Typed EAL configuration; [`EalConfig::to_args`] turns it into EAL's argv.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EalConfig {
    /// Lcore list in EAL's `-l` form, e.g. `"0"` or `"0,1"`.
    pub lcores: String,
    /// The main lcore (`--main-lcore`), if not the first of `lcores`.
    pub main_lcore: Option<u32>,
    /// Virtual devices (`--vdev`), e.g. `net_af_packet0,iface=veth0`.
    pub vdevs: Vec<String>,
    /// PCI allow-list (`-a`). Empty with no vdevs means every device.
    pub allow: Vec<String>,
    /// Disable the PCI bus (`--no-pci`), for NIC-less hosts.
    pub no_pci: bool,
    /// Run without hugepages (`--no-huge`), on small machines.
    pub no_huge: bool,
    /// Memory to reserve, MiB (`-m`).
    pub memory_mb: Option<u32>,
    /// Runtime-file prefix (`--file-prefix`), unique per process.
    pub file_prefix: String,
    /// Further arguments passed through as they are.
    pub extra: Vec<String>,
}

impl EalConfig {
    /// EAL's argument vector (program name first).
    pub fn to_args(&self, prog: &str) -> Vec<String> {
        let mut a = vec![prog.to_string(), "-l".into(), self.lcores.clone()];
        if let Some(m) = self.main_lcore {
            a.push(format!("--main-lcore={m}"));
        }
        for v in &self.vdevs {
            a.push(format!("--vdev={v}"));
        }
        for p in &self.allow {
            a.push("-a".into());
            a.push(p.clone());
        }
        if self.no_pci {
            a.push("--no-pci".into());
        }
        if self.no_huge {
            a.push("--no-huge".into());
        }
        if let Some(m) = self.memory_mb {
            a.push("-m".into());
            a.push(m.to_string());
        }
        if !self.file_prefix.is_empty() {
            a.push(format!("--file-prefix={}", self.file_prefix));
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

static EAL_UP: AtomicBool = AtomicBool::new(false);

/// The initialised EAL. Only one may exist per process, ever.
#[derive(Debug)]
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Initialises EAL with `args` (see [`EalConfig::to_args`]).
    ///
    /// # Errors
    /// If EAL was already initialised in this process, or `rte_eal_init` fails.
    pub fn init(args: &[String]) -> Result<Eal> {
        if EAL_UP.swap(true, Ordering::SeqCst) {
            return Err(DpdkError {
                op: "rte_eal_init",
                errno: libc::EALREADY,
                msg: "EAL is already initialised in this process".into(),
            });
        }
        let cargs: Vec<CString> = args
            .iter()
            .map(|s| {
                CString::new(s.as_str()).map_err(|_| DpdkError {
                    op: "rte_eal_init",
                    errno: libc::EINVAL,
                    msg: format!("argument {s:?} contains a NUL byte"),
                })
            })
            .collect::<Result<_>>()?;
        let mut argv: Vec<*mut libc::c_char> = cargs
            .iter()
            .map(|c| c.as_ptr() as *mut libc::c_char)
            .collect();
        argv.push(std::ptr::null_mut());
        // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that
        // outlive the call (EAL may permute the array, which we own).
        let rc = unsafe { sys::rte_eal_init((argv.len() - 1) as i32, argv.as_mut_ptr()) };
        if rc < 0 {
            return Err(DpdkError::last("rte_eal_init"));
        }
        // EAL keeps pointers into argv for the life of the process.
        std::mem::forget(cargs);
        Ok(Eal { _private: () })
    }

    /// Ports that EAL probed, with their names.
    pub fn ports(&self) -> Vec<(PortId, String)> {
        let mut out = Vec::new();
        for p in 0..sys::RTE_MAX_ETHPORTS as u16 {
            // SAFETY: any port number may be asked about.
            if unsafe { sys::rte_eth_dev_is_valid_port(p) } == 0 {
                continue;
            }
            let mut name = [0 as libc::c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
            // SAFETY: the buffer has RTE_ETH_NAME_MAX_LEN bytes, as DPDK requires.
            let rc = unsafe { sys::rte_eth_dev_get_name_by_port(p, name.as_mut_ptr()) };
            let name = if rc == 0 {
                // SAFETY: DPDK wrote a NUL-terminated name into the buffer.
                unsafe { CStr::from_ptr(name.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            };
            out.push((PortId(p), name));
        }
        out
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: EAL was initialised by this value; all ports and pools must be
        // gone (they borrow nothing, but the daemon drops them first).
        unsafe { sys::rte_eal_cleanup() };
    }
}

/// A packet mbuf pool; it cannot outlive the EAL it was made in.
#[derive(Debug)]
pub struct Mempool<'eal>(NonNull<sys::rte_mempool>, PhantomData<&'eal Eal>);

// SAFETY: rte_mempool is designed for use from several threads (per-lcore caches
// plus a lock-free ring underneath).
unsafe impl Send for Mempool<'_> {}
// SAFETY: as above.
unsafe impl Sync for Mempool<'_> {}

impl<'eal> Mempool<'eal> {
    /// Creates a pool of `n` mbufs with `data_room` bytes each.
    ///
    /// # Errors
    /// As `rte_pktmbuf_pool_create` (e.g. ENOMEM).
    pub fn new(
        _eal: &'eal Eal,
        name: &str,
        n: u32,
        cache: u32,
        data_room: u16,
    ) -> Result<Mempool<'eal>> {
        let cname = CString::new(name)
            .map_err(|_| DpdkError::from_errno("rte_pktmbuf_pool_create", libc::EINVAL))?;
        // SAFETY: a valid C string; DPDK copies the name.
        let p = unsafe {
            sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                n,
                cache,
                0,
                data_room,
                sys::rte_socket_id() as i32,
            )
        };
        NonNull::new(p)
            .map(|p| Mempool(p, PhantomData))
            .ok_or_else(|| DpdkError::last("rte_pktmbuf_pool_create"))
    }

    /// Allocates an mbuf holding `len` zeroed-length bytes of data.
    pub fn alloc(&self, len: usize) -> Option<Mbuf> {
        // SAFETY: the pool is alive.
        let m = NonNull::new(unsafe { sys::rte_pktmbuf_alloc(self.0.as_ptr()) })?;
        let mbuf = Mbuf(m);
        let len16 = u16::try_from(len).ok()?;
        // SAFETY: a freshly allocated mbuf we own; append returns NULL if too big.
        let p = unsafe { sys::rte_pktmbuf_append(m.as_ptr(), len16) };
        if p.is_null() {
            return None; // mbuf freed by drop
        }
        Some(mbuf)
    }
}

impl Drop for Mempool<'_> {
    fn drop(&mut self) {
        // SAFETY: every Mbuf borrows nothing from the pool but must be freed
        // before; the daemon drops devices (which hold mbufs) first.
        unsafe { sys::rte_mempool_free(self.0.as_ptr()) };
    }
}

/// An owned packet buffer, freed to its pool on drop.
#[derive(Debug)]
pub struct Mbuf(NonNull<sys::rte_mbuf>);

// SAFETY: an mbuf is owned by exactly one Mbuf value; it may be freed from any thread.
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// Gives up ownership (to `rte_eth_tx_burst`).
    fn into_raw(self) -> *mut sys::rte_mbuf {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl AsRef<[u8]> for Mbuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: a single-segment mbuf we own: data_len bytes at mtod are ours.
        unsafe {
            let p = sys::rte_pktmbuf_mtod(self.0.as_ptr()) as *const u8;
            std::slice::from_raw_parts(p, sys::rte_pktmbuf_data_len(self.0.as_ptr()) as usize)
        }
    }
}

impl AsMut<[u8]> for Mbuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in as_ref, and &mut self gives exclusive access.
        unsafe {
            let p = sys::rte_pktmbuf_mtod(self.0.as_ptr()) as *mut u8;
            std::slice::from_raw_parts_mut(p, sys::rte_pktmbuf_data_len(self.0.as_ptr()) as usize)
        }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf and nobody else frees it.
        unsafe { sys::rte_pktmbuf_free(self.0.as_ptr()) }
    }
}

/// Port counters (`rte_eth_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Received packets.
    pub ipackets: u64,
    /// Transmitted packets.
    pub opackets: u64,
    /// Received bytes.
    pub ibytes: u64,
    /// Transmitted bytes.
    pub obytes: u64,
    /// Packets dropped by the hardware / ring because rx was full.
    pub imissed: u64,
    /// Erroneous received packets.
    pub ierrors: u64,
    /// Failed transmissions.
    pub oerrors: u64,
    /// Rx mbuf allocation failures.
    pub rx_nombuf: u64,
}

/// A configured, started ethdev port with one rx and one tx queue; it cannot
/// outlive the EAL it was started in.
#[derive(Debug)]
pub struct Port<'eal> {
    id: PortId,
    /// Queue 0's receive interrupt descriptor (owned by DPDK).
    rx_intr: Option<i32>,
    /// True while the port runs; [`PortStatsReader`]s read counters only then.
    alive: Arc<RwLock<bool>>,
    _eal: PhantomData<&'eal Eal>,
}

/// Reads a port's counters from any thread, for as long as the port runs
/// (afterwards every read fails with ENODEV, never touching DPDK).
#[derive(Debug, Clone)]
pub struct PortStatsReader {
    id: PortId,
    alive: Arc<RwLock<bool>>,
}

impl PortStatsReader {
    /// `rte_eth_stats_get`.
    ///
    /// # Errors
    /// ENODEV once the port is stopped; as `rte_eth_stats_get`.
    pub fn stats(&self) -> Result<PortStats> {
        let alive = self.alive.read().unwrap_or_else(|e| e.into_inner());
        if !*alive {
            return Err(DpdkError {
                op: "rte_eth_stats_get",
                errno: libc::ENODEV,
                msg: "the port is stopped".into(),
            });
        }
        stats_of(self.id)
    }
}

impl<'eal> Port<'eal> {
    /// Configures `id` with one rx and one tx queue of the given depths, starts
    /// it and enables promiscuous mode where the driver supports it.
    ///
    /// # Errors
    /// As the underlying ethdev calls.
    pub fn start(
        _eal: &'eal Eal,
        id: PortId,
        pool: &Mempool<'eal>,
        rx_desc: u16,
        tx_desc: u16,
    ) -> Result<Port<'eal>> {
        // Receive interrupts first (a sleeping lcore then wakes on a frame);
        // a driver that refuses them gets the plain configuration.
        let rx_intr = match Self::setup(id, pool, rx_desc, tx_desc, true) {
            Ok(()) => {
                // SAFETY: the port is started with one rx queue.
                let fd = unsafe { sys::rte_eth_dev_rx_intr_ctl_q_get_fd(id.0, 0) };
                (fd >= 0).then_some(fd)
            }
            Err(_) => {
                // SAFETY: a configured (possibly started) port may be stopped.
                unsafe { sys::rte_eth_dev_stop(id.0) };
                Self::setup(id, pool, rx_desc, tx_desc, false)?;
                None
            }
        };
        // SAFETY: the port is started; failure (unsupported) is harmless.
        unsafe { sys::rte_eth_promiscuous_enable(id.0) };
        Ok(Port {
            id,
            rx_intr,
            alive: Arc::new(RwLock::new(true)),
            _eal: PhantomData,
        })
    }

    /// Configures, sets up the queues of and starts `id`, with receive
    /// interrupts if `rx_intr`.
    fn setup(
        id: PortId,
        pool: &Mempool<'_>,
        rx_desc: u16,
        tx_desc: u16,
        rx_intr: bool,
    ) -> Result<()> {
        let mut conf: sys::rte_eth_conf = Default::default();
        conf.intr_conf.set_rxq(u32::from(rx_intr));
        // SAFETY: conf is a valid configuration that outlives the call.
        DpdkError::check("rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(id.0, 1, 1, &conf)
        })?;
        // SAFETY: valid port; socket id query has no other precondition.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id.0) };
        let socket = if socket < 0 { 0 } else { socket as u32 };
        // SAFETY: NULL rxconf means the driver's defaults; the pool outlives the port.
        DpdkError::check("rte_eth_rx_queue_setup", unsafe {
            sys::rte_eth_rx_queue_setup(id.0, 0, rx_desc, socket, std::ptr::null(), pool.0.as_ptr())
        })?;
        // SAFETY: NULL txconf means the driver's defaults.
        DpdkError::check("rte_eth_tx_queue_setup", unsafe {
            sys::rte_eth_tx_queue_setup(id.0, 0, tx_desc, socket, std::ptr::null())
        })?;
        // SAFETY: the port is configured.
        DpdkError::check("rte_eth_dev_start", unsafe { sys::rte_eth_dev_start(id.0) })?;
        Ok(())
    }

    /// The descriptor of queue 0's receive interrupt, if the driver has one.
    pub fn rx_intr_fd(&self) -> Option<i32> {
        self.rx_intr
    }

    /// A reader of this port's counters for other threads.
    pub fn stats_reader(&self) -> PortStatsReader {
        PortStatsReader {
            id: self.id,
            alive: self.alive.clone(),
        }
    }

    /// The port number.
    pub fn id(&self) -> PortId {
        self.id
    }

    /// The port's MAC.
    ///
    /// # Errors
    /// As `rte_eth_macaddr_get`.
    pub fn mac(&self) -> Result<EthernetAddress> {
        let mut a: sys::rte_ether_addr = Default::default();
        // SAFETY: `a` is a valid out-parameter.
        DpdkError::check("rte_eth_macaddr_get", unsafe {
            sys::rte_eth_macaddr_get(self.id.0, &mut a)
        })?;
        Ok(EthernetAddress(a.addr_bytes))
    }

    /// Basic counters.
    ///
    /// # Errors
    /// As `rte_eth_stats_get`.
    pub fn stats(&self) -> Result<PortStats> {
        stats_of(self.id)
    }
}

/// `rte_eth_stats_get` for a running port.
fn stats_of(id: PortId) -> Result<PortStats> {
    let mut s: sys::rte_eth_stats = Default::default();
    // SAFETY: `s` is a valid out-parameter; reading stats is safe from any thread.
    DpdkError::check("rte_eth_stats_get", unsafe {
        sys::rte_eth_stats_get(id.0, &mut s)
    })?;
    Ok(PortStats {
        ipackets: s.ipackets,
        opackets: s.opackets,
        ibytes: s.ibytes,
        obytes: s.obytes,
        imissed: s.imissed,
        ierrors: s.ierrors,
        oerrors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
    })
}

impl Drop for Port<'_> {
    fn drop(&mut self) {
        // No reader may be inside DPDK from here on.
        *self.alive.write().unwrap_or_else(|e| e.into_inner()) = false;
        // SAFETY: the port was started by us; stop then close releases it.
        unsafe {
            sys::rte_eth_dev_stop(self.id.0);
            sys::rte_eth_dev_close(self.id.0);
        }
    }
}

/// How a sleeping lcore learns that a frame arrived.
#[derive(Debug)]
pub enum RxWake {
    /// It does not: it wakes on a period.
    None,
    /// The driver's receive interrupt for queue 0 (an eventfd DPDK owns).
    Interrupt(i32),
    /// A kernel packet socket on the port's interface (af_packet).
    Packet(crate::sys::PacketWaker),
}

impl RxWake {
    /// A short description for logs and `dsanctl stats`.
    pub fn name(&self) -> &'static str {
        match self {
            RxWake::None => "none",
            RxWake::Interrupt(_) => "rx-interrupt",
            RxWake::Packet(_) => "packet-socket",
        }
    }
}

/// A [`Device`] over queue 0 of a started port.
#[derive(Debug)]
pub struct DpdkDevice<'a> {
    port: &'a Port<'a>,
    pool: &'a Mempool<'a>,
    mac: EthernetAddress,
    raw: [*mut sys::rte_mbuf; BURST],
    wake: RxWake,
}

impl<'a> DpdkDevice<'a> {
    /// A device over `port`, allocating from `pool`.
    ///
    /// # Errors
    /// If the port's MAC cannot be read.
    pub fn new(port: &'a Port<'a>, pool: &'a Mempool<'a>) -> Result<Self> {
        Ok(Self {
            port,
            pool,
            mac: port.mac()?,
            raw: [std::ptr::null_mut(); BURST],
            wake: port.rx_intr.map_or(RxWake::None, RxWake::Interrupt),
        })
    }

    /// Uses `w` to wake the sleeping lcore (when the port has no receive
    /// interrupt).
    pub fn set_wake(&mut self, w: RxWake) {
        self.wake = w;
    }

    /// What wakes the sleeping lcore.
    pub fn wake(&self) -> &RxWake {
        &self.wake
    }
}

impl Device for DpdkDevice<'_> {
    type Buf = Mbuf;

    fn rx_burst(&mut self, out: &mut Vec<Mbuf>, max: usize) -> usize {
        let max = max.min(BURST) as u16;
        // SAFETY: `raw` has room for BURST pointers; queue 0 is set up and only
        // this lcore polls it.
        let n = unsafe { sys::rte_eth_rx_burst(self.port.id.0, 0, self.raw.as_mut_ptr(), max) }
            as usize;
        for &p in &self.raw[..n] {
            // SAFETY: rx_burst returned n valid mbufs whose ownership passes to us.
            out.push(Mbuf(unsafe { NonNull::new_unchecked(p) }));
        }
        n
    }

    fn tx_burst(&mut self, bufs: &mut Vec<Mbuf>) -> usize {
        let mut total = 0;
        while !bufs.is_empty() {
            let k = bufs.len().min(BURST);
            for (slot, m) in self.raw.iter_mut().zip(bufs.drain(..k)) {
                *slot = m.into_raw();
            }
            // SAFETY: k owned mbuf pointers; the driver takes ownership of the first `sent`.
            let sent = unsafe {
                sys::rte_eth_tx_burst(self.port.id.0, 0, self.raw.as_mut_ptr(), k as u16)
            } as usize;
            total += sent;
            if sent < k {
                // Give the unsent back to the caller, in order, in front.
                let rest: Vec<Mbuf> = self.raw[sent..k]
                    .iter()
                    // SAFETY: these pointers were not taken by the driver; we still own them.
                    .map(|&p| Mbuf(unsafe { NonNull::new_unchecked(p) }))
                    .collect();
                bufs.splice(0..0, rest);
                break;
            }
        }
        total
    }

    fn alloc(&mut self, len: usize) -> Option<Mbuf> {
        self.pool.alloc(len)
    }

    fn mac(&self) -> EthernetAddress {
        self.mac
    }

    fn rx_wake_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.wake {
            RxWake::None => None,
            RxWake::Interrupt(fd) => Some(*fd),
            RxWake::Packet(p) => Some(p.fd()),
        }
    }

    fn arm_rx_wake(&mut self) -> bool {
        match &self.wake {
            RxWake::None => false,
            // SAFETY: the port is started with queue 0; only this lcore uses it.
            RxWake::Interrupt(_) => unsafe {
                sys::rte_eth_dev_rx_intr_enable(self.port.id.0, 0) == 0
            },
            RxWake::Packet(p) => {
                p.drain();
                true
            }
        }
    }

    fn disarm_rx_wake(&mut self) {
        if let RxWake::Interrupt(fd) = self.wake {
            // SAFETY: as for enabling.
            unsafe { sys::rte_eth_dev_rx_intr_disable(self.port.id.0, 0) };
            // Clear the event counter (DPDK's eventfd), reading only when
            // something is there: the descriptor may be blocking.
            if crate::sys::wait_readable(fd, Some(std::time::Duration::ZERO)) {
                let mut v = 0u64;
                // SAFETY: an 8-byte buffer for an eventfd read of a
                // descriptor that is readable.
                unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eal_args_follow_dpdk_conventions() {
        let c = EalConfig {
            lcores: "1".into(),
            main_lcore: None,
            vdevs: vec!["net_af_packet0,iface=veth0,qdisc_bypass=1".into()],
            allow: vec![],
            no_pci: true,
            no_huge: true,
            memory_mb: Some(256),
            file_prefix: "dsan-h0".into(),
            extra: vec!["--log-level=lib.eal:error".into()],
        };
        assert_eq!(
            c.to_args("dsand"),
            vec![
                "dsand",
                "-l",
                "1",
                "--vdev=net_af_packet0,iface=veth0,qdisc_bypass=1",
                "--no-pci",
                "--no-huge",
                "-m",
                "256",
                "--file-prefix=dsan-h0",
                "--log-level=lib.eal:error"
            ]
        );
    }
}

/// What a telemetry command returns: a dictionary of numbers or of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TelemetryValue {
    /// `{"name": number, ...}`.
    Numbers(Vec<(String, u64)>),
    /// `{"name": "text", ...}`.
    Strings(Vec<(String, String)>),
}

/// A telemetry command's handler (runs on DPDK's telemetry thread).
pub type TelemetryFn = Box<dyn Fn() -> TelemetryValue + Send + Sync>;

fn telemetry_registry() -> &'static std::sync::Mutex<std::collections::HashMap<String, TelemetryFn>>
{
    static R: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, TelemetryFn>>,
    > = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

unsafe extern "C" fn telemetry_trampoline(
    cmd: *const libc::c_char,
    _params: *const libc::c_char,
    d: *mut sys::rte_tel_data,
) -> libc::c_int {
    // SAFETY: DPDK passes the NUL-terminated command string it matched.
    let cmd = unsafe { CStr::from_ptr(cmd) }
        .to_string_lossy()
        .into_owned();
    let value = {
        let reg = telemetry_registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match reg.get(&cmd) {
            Some(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok(),
            None => None,
        }
    };
    let Some(value) = value else {
        return -libc::EINVAL;
    };
    let limit = (sys::RTE_TEL_MAX_STRING_LEN - 1) as usize;
    let cstr = |s: &str| {
        CString::new(
            s.chars()
                .filter(|c| *c != '\0')
                .take(limit)
                .collect::<String>(),
        )
        .unwrap_or_default()
    };
    // SAFETY: `d` is the data object DPDK gave this callback; every string
    // passed is NUL-terminated and within RTE_TEL_MAX_STRING_LEN.
    unsafe {
        sys::rte_tel_data_start_dict(d);
        match value {
            TelemetryValue::Numbers(v) => {
                for (k, n) in v {
                    sys::rte_tel_data_add_dict_u64(d, cstr(&k).as_ptr(), n);
                }
            }
            TelemetryValue::Strings(v) => {
                for (k, s) in v {
                    sys::rte_tel_data_add_dict_string(d, cstr(&k).as_ptr(), cstr(&s).as_ptr());
                }
            }
        }
    }
    0
}

/// Registers a DPDK telemetry command (e.g. `/dsan/listeners`), readable with
/// `dpdk-telemetry.py`. Call after [`Eal::init`].
///
/// # Errors
/// As `rte_telemetry_register_cmd` (bad name, already registered).
pub fn register_telemetry(
    _eal: &Eal,
    cmd: &'static str,
    help: &'static str,
    f: TelemetryFn,
) -> Result<()> {
    let c = CString::new(cmd)
        .map_err(|_| DpdkError::from_errno("rte_telemetry_register_cmd", libc::EINVAL))?;
    let h = CString::new(help)
        .map_err(|_| DpdkError::from_errno("rte_telemetry_register_cmd", libc::EINVAL))?;
    telemetry_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(cmd.to_string(), f);
    // SAFETY: DPDK keeps the pointers: the strings are leaked for the life of
    // the process, and the trampoline is a plain function.
    let rc = unsafe {
        sys::rte_telemetry_register_cmd(c.as_ptr(), Some(telemetry_trampoline), h.as_ptr())
    };
    std::mem::forget(c);
    std::mem::forget(h);
    DpdkError::check("rte_telemetry_register_cmd", rc).map(|_| ())
}
