//! Protocol parameters.

use super::resolve::ResolveConfig;
use std::time::Duration;

pub use crate::net::Subnet;

/// Protocol parameters. The defaults are documented in `docs/wire-protocol.md`.
#[derive(Debug, Clone)]
pub struct ProtoConfig {
    /// Give up a connect attempt after this long: ETIMEDOUT (default 2 s).
    pub connect_budget: Duration,
    /// First retransmission timeout of a connect request (default 20 ms).
    pub initial_rto: Duration,
    /// Backoff ceiling (default 400 ms).
    pub max_rto: Duration,
    /// Requests queued in all backlogs together (default 65536).
    pub max_half_open: usize,
    /// Requests pending from one source address (default 256): one station
    /// cannot take every backlog of the host.
    pub max_half_open_per_source: usize,
    /// Listeners (default 4096).
    pub max_listeners: usize,
    /// Connect attempts in progress (default 65536).
    pub max_attempts: usize,
    /// Established connections (default 1 << 20).
    pub max_connections: usize,
    /// How long a refusal is remembered to answer retransmissions the same way
    /// (default 2 x connect budget; must exceed any client's budget).
    pub tombstone_ttl: Duration,
    /// Finished requests (refused, or accepted and since closed) remembered at
    /// most (default 65536; the oldest go first).
    pub max_tombstones: usize,
    /// Give up retransmitting a close after this long (default 10 s: both ends
    /// agree on a connection's end as long as the fabric delivers one close
    /// and its acknowledgement within this time).
    pub close_budget: Duration,
    /// The SAN subnets; connecting elsewhere is EHOSTUNREACH.
    pub subnets: Vec<Subnet>,
    /// Address resolution timing.
    pub resolve: ResolveConfig,
    /// The link's MTU (bytes of Ethernet payload; default 1500): stream
    /// payloads are cut to fit.
    pub mtu: u16,
    /// Streams: first retransmission timeout (default 5 ms; doubled per
    /// retransmission up to `max_rto`).
    pub stream_rto: Duration,
    /// Streams: probe a peer not heard from for this long (default 1 s).
    pub keepalive_idle: Duration,
    /// Streams: reset a connection whose peer was not heard from for this
    /// long (default 3 s), or whose unacknowledged bytes made no progress for
    /// this long.
    pub keepalive_timeout: Duration,
    /// The kernel TCP ports listening on this host (kept current by the
    /// daemon): a request for a port without a SAN listener but with one of
    /// these is answered `Reject(TcpOnly)`; for a port without either the
    /// answer waits for a scan that began after the request arrived (a
    /// listener may have just started), and is `NoListener` only if that
    /// scan shows none either. `None`: never (`NoListener` at once).
    pub tcp_listening: Option<std::sync::Arc<PortSet>>,
    /// Streams: hold the acknowledgement of a lone segment this long so a
    /// reply can carry it (default 200 us; 0 acknowledges every burst at once).
    pub ack_delay: Duration,
}

/// A set of ports that one thread replaces and another reads, lock-free
/// (one bit per port), with the uid that owns each port's listeners.
pub struct PortSet {
    bits: Box<[std::sync::atomic::AtomicU64]>,
    /// Per port: 0 (no owner known), uid + 1, or [`MIXED`] (listeners of
    /// several uids).
    owners: Box<[std::sync::atomic::AtomicU32]>,
    /// Bumped after each replacement: the number of the scan it came from.
    version: std::sync::atomic::AtomicU64,
    /// Scans begun (bumped before the scanner reads the kernel's table).
    started: std::sync::atomic::AtomicU64,
    /// A reader asked for a scan now (see [`PortSet::ask`]).
    asked: std::sync::atomic::AtomicBool,
    /// The scanning thread, woken when asked.
    scanner: std::sync::OnceLock<std::thread::Thread>,
}

/// [`PortSet`] owner word: listeners of several uids share the port.
const MIXED: u32 = u32::MAX;

/// Who owns the kernel TCP listeners of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOwner {
    /// No kernel TCP listener (or none known).
    Nobody,
    /// Every listener belongs to this uid.
    Uid(u32),
    /// Listeners of several uids.
    Mixed,
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortSet").finish_non_exhaustive()
    }
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet {
            bits: (0..1024)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            owners: (0..65536)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            version: std::sync::atomic::AtomicU64::new(0),
            started: std::sync::atomic::AtomicU64::new(0),
            asked: std::sync::atomic::AtomicBool::new(false),
            scanner: std::sync::OnceLock::new(),
        }
    }
}

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        let w = self.bits[usize::from(port) / 64].load(std::sync::atomic::Ordering::Relaxed);
        w & (1 << (port % 64)) != 0
    }

    /// Makes the set exactly `ports` (word by word: a reader may see a mix of
    /// the old and the new set for an instant, never a torn word).
    pub fn replace(&self, ports: impl IntoIterator<Item = u16>) {
        self.replace_owned(ports.into_iter().map(|p| (p, None)));
    }

    /// Makes the set exactly the ports of `listeners` (port, owner uid if
    /// known), and records each port's owner.
    pub fn replace_owned(&self, listeners: impl IntoIterator<Item = (u16, Option<u32>)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut words = [0u64; 1024];
        let mut owners: std::collections::HashMap<u16, u32> = std::collections::HashMap::new();
        for (p, uid) in listeners {
            words[usize::from(p) / 64] |= 1 << (p % 64);
            if let Some(u) = uid {
                let w = u.saturating_add(1).min(MIXED - 1);
                owners
                    .entry(p)
                    .and_modify(|o| {
                        if *o != w {
                            *o = MIXED;
                        }
                    })
                    .or_insert(w);
            }
        }
        for (i, (w, v)) in self.bits.iter().zip(words).enumerate() {
            let old = w.swap(v, Relaxed);
            // Owners of the ports of this word (only where something changed
            // or someone owns: most words are empty).
            if old != 0 || v != 0 {
                for b in 0..64 {
                    let port = (i * 64 + b) as u16;
                    let o = owners.get(&port).copied().unwrap_or(0);
                    self.owners[usize::from(port)].store(o, Relaxed);
                }
            }
        }
        // The version is the number of the scan just completed (scans
        // begun, a failed one included); a replacement without a scan
        // (`replace`) counts as one begun and completed now.
        use std::sync::atomic::Ordering::AcqRel;
        let v = (self.version.load(std::sync::atomic::Ordering::Acquire) + 1)
            .max(self.started.load(std::sync::atomic::Ordering::Acquire));
        self.version.store(v, std::sync::atomic::Ordering::Release);
        self.started.fetch_max(v, AcqRel);
    }

    /// The scanner is about to read the kernel's table (a scan that begins
    /// now sees every listener that exists now).
    pub fn scan_started(&self) {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Registers the thread that scans (woken by [`PortSet::ask`]).
    pub fn set_scanner(&self, t: std::thread::Thread) {
        let _ = self.scanner.set(t);
    }

    /// Asks for a scan now; returns a ticket for [`PortSet::fresh_since`].
    /// Never blocks (at most one wake-up of the scanner per scan).
    pub fn ask(&self) -> u64 {
        let ticket = self.started.load(std::sync::atomic::Ordering::Acquire);
        if !self.asked.swap(true, std::sync::atomic::Ordering::AcqRel) {
            if let Some(t) = self.scanner.get() {
                t.unpark();
            }
        }
        ticket
    }

    /// For the scanner: whether a scan was asked for (and clears it).
    pub fn take_asked(&self) -> bool {
        self.asked.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether a scan that began after [`PortSet::ask`] gave `ticket` has
    /// completed (the set now shows every listener that existed then).
    pub fn fresh_since(&self, ticket: u64) -> bool {
        self.version.load(std::sync::atomic::Ordering::Acquire) > ticket
    }

    /// Who owns `port`'s kernel TCP listeners.
    pub fn owner(&self, port: u16) -> PortOwner {
        if !self.contains(port) {
            return PortOwner::Nobody;
        }
        match self.owners[usize::from(port)].load(std::sync::atomic::Ordering::Relaxed) {
            0 => PortOwner::Nobody,
            MIXED => PortOwner::Mixed,
            w => PortOwner::Uid(w - 1),
        }
    }

    /// Bumped at every replacement (a reader compares it to notice one).
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ProtoConfig {
    /// What this host offers a peer at setup for a receive ring of `window` bytes.
    pub fn offer(&self, window: u32) -> crate::wire::Offer {
        let over = (crate::wire::SAN_HEADER_LEN + crate::wire::DATA_HEADER_LEN) as u16;
        crate::wire::Offer {
            window: window.max(crate::wire::Offer::MIN.window),
            mss: self
                .mtu
                .saturating_sub(over)
                .max(crate::wire::Offer::MIN.mss),
        }
    }
}

impl Default for ProtoConfig {
    fn default() -> Self {
        Self {
            connect_budget: Duration::from_secs(2),
            initial_rto: Duration::from_millis(20),
            max_rto: Duration::from_millis(400),
            max_half_open: 65536,
            max_half_open_per_source: 256,
            max_listeners: 4096,
            max_attempts: 65536,
            max_connections: 1 << 20,
            tombstone_ttl: Duration::from_secs(4),
            max_tombstones: 65536,
            close_budget: Duration::from_secs(10),
            subnets: Vec::new(),
            resolve: ResolveConfig::default(),
            mtu: 1500,
            stream_rto: Duration::from_millis(5),
            keepalive_idle: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(3),
            tcp_listening: None,
            ack_delay: Duration::from_micros(200),
        }
    }
}

/// Largest backlog of one listener (the backlog rings of the channel's
/// region are sized by it).
pub const MAX_BACKLOG: usize = 4096;

/// The backlog a listen asks for, as the capacity it gets: at least 1, at most
/// [`MAX_BACKLOG`] (negative or huge requests, SOMAXCONN included, mean the maximum).
pub fn effective_backlog(requested: i64) -> usize {
    match requested {
        0 => 1,
        r if r < 0 => MAX_BACKLOG,
        r => usize::try_from(r).map_or(MAX_BACKLOG, |r| r.min(MAX_BACKLOG)),
    }
}
