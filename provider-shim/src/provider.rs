//! The provider: one attachment per process to the local dsand.
//!
//! Everything it exchanges with the daemon is the `dsan-channel` crate's: the
//! region, the command ring (one producer: calls take the ring's lock only to
//! push), the listeners' backlog rings (this process consumes), the typed
//! messages, the doorbell.
#![allow(unsafe_code)] // poll() on the control socket

use dsan_channel::ctl::{self, Reply};
use dsan_channel::doorbell::Bell;
#[path = "data.rs"]
mod data;
pub use data::{Readiness, StreamInfo, MSG_DONTWAIT, MSG_OOB, MSG_PEEK};

use dsan_channel::msg::{Bufs, Command, Op, Request, Verdict};
use dsan_channel::region::{Region, SockShm, MAX_LISTENERS, MAX_SOCKETS, REGION_VERSION};
use dsan_channel::ring::{Consumer, Producer, PushError};
use dsan_channel::stream::{ST_LINGER, ST_OPEN};
use dsan_channel::sys;

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use dsan_channel::net::Subnet;
pub use dsan_channel::region::{FD_ACCEPT, FD_ALL, FD_CLOSE, FD_CONNECT, FD_READ, FD_WRITE};

/// Errors of provider calls; [`Error::errno`] gives the C ABI's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Unknown or closed socket (ENOTSOCK).
    #[error("not a socket")]
    NotSock,
    /// A NULL or unusable pointer (EFAULT).
    #[error("bad address")]
    Fault,
    /// Invalid argument or state, e.g. listen on an unbound socket (EINVAL).
    #[error("invalid argument")]
    Inval,
    /// The port is listened on already, on this host, by anyone (EADDRINUSE).
    #[error("address in use")]
    AddrInUse,
    /// The address is not a SAN address of this host (EADDRNOTAVAIL).
    #[error("address not available")]
    AddrNotAvail,
    /// Not attached, or the daemon is gone (ENETDOWN).
    #[error("SAN provider not attached or daemon gone")]
    NetDown,
    /// Refused: backlog full, rejected by the accepting side (ECONNREFUSED).
    #[error("connection refused")]
    ConnRefused,
    /// Nobody listens on that port (ECONNRESET, WSD's code).
    #[error("no listener on that port")]
    ConnReset,
    /// No answer within the connect budget (ETIMEDOUT).
    #[error("connect timed out")]
    TimedOut,
    /// The address is in no SAN subnet (EHOSTUNREACH).
    #[error("host unreachable over the SAN")]
    HostUnreach,
    /// A nonblocking connect started; FD_CONNECT reports the result (EINPROGRESS).
    #[error("connect in progress")]
    InProgress,
    /// A connect is already in progress (EALREADY).
    #[error("connect already in progress")]
    Already,
    /// Already connected (EISCONN).
    #[error("already connected")]
    IsConn,
    /// Nothing to do now, try again (EAGAIN).
    #[error("try again")]
    Again,
    /// Out of sockets or listeners in this process (EMFILE).
    #[error("too many sockets")]
    MFile,
    /// Out of connections on the host (ENOBUFS).
    #[error("no buffer space")]
    NoBufs,
    /// Not connected (ENOTCONN).
    #[error("not connected")]
    NotConn,
    /// Sending is shut down or the connection ended (EPIPE; no SIGPIPE).
    #[error("broken pipe")]
    Pipe,
    /// Unknown socket option (ENOPROTOOPT).
    #[error("protocol not available")]
    NoProtoOpt,
    /// Another errno.
    #[error("errno {0}")]
    Os(i32),
}

impl Error {
    /// The (positive) errno.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotSock => libc::ENOTSOCK,
            Error::Fault => libc::EFAULT,
            Error::Inval => libc::EINVAL,
            Error::AddrInUse => libc::EADDRINUSE,
            Error::AddrNotAvail => libc::EADDRNOTAVAIL,
            Error::NetDown => libc::ENETDOWN,
            Error::ConnRefused => libc::ECONNREFUSED,
            Error::ConnReset => libc::ECONNRESET,
            Error::TimedOut => libc::ETIMEDOUT,
            Error::HostUnreach => libc::EHOSTUNREACH,
            Error::InProgress => libc::EINPROGRESS,
            Error::Already => libc::EALREADY,
            Error::IsConn => libc::EISCONN,
            Error::Again => libc::EAGAIN,
            Error::MFile => libc::EMFILE,
            Error::NoBufs => libc::ENOBUFS,
            Error::NotConn => libc::ENOTCONN,
            Error::Pipe => libc::EPIPE,
            Error::NoProtoOpt => libc::ENOPROTOOPT,
            Error::Os(e) => *e,
        }
    }

    /// The error for a (positive) errno.
    pub fn from_errno(e: i32) -> Error {
        match e {
            libc::ENOTSOCK => Error::NotSock,
            libc::EFAULT => Error::Fault,
            libc::EINVAL => Error::Inval,
            libc::EADDRINUSE => Error::AddrInUse,
            libc::EADDRNOTAVAIL => Error::AddrNotAvail,
            libc::ENETDOWN => Error::NetDown,
            libc::ECONNREFUSED => Error::ConnRefused,
            libc::ECONNRESET => Error::ConnReset,
            libc::ETIMEDOUT => Error::TimedOut,
            libc::EHOSTUNREACH => Error::HostUnreach,
            libc::EINPROGRESS => Error::InProgress,
            libc::EALREADY => Error::Already,
            libc::EISCONN => Error::IsConn,
            libc::EAGAIN => Error::Again,
            libc::EMFILE => Error::MFile,
            libc::ENOBUFS => Error::NoBufs,
            libc::ENOTCONN => Error::NotConn,
            libc::EPIPE => Error::Pipe,
            libc::ENOPROTOOPT => Error::NoProtoOpt,
            o => Error::Os(o),
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

/// A socket of this process (an index into its socket table).
pub type SocketId = u32;

/// The accepting application's answer (the condition function's result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Accept: the remote connect succeeds.
    Accept,
    /// Reject: the remote connect fails with ECONNREFUSED.
    Reject,
    /// Leave the request at the head of the backlog (accept returns EAGAIN).
    Defer,
}

/// What [`Provider::enum_network_events`] returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkEvents {
    /// FD_* bits recorded since the last call.
    pub events: u32,
    /// 0 or a negative errno for FD_ACCEPT.
    pub accept_error: i32,
    /// 0 or a negative errno for FD_CONNECT.
    pub connect_error: i32,
    /// For FD_CLOSE: 0 (the peer closed) or a negative errno (reset).
    pub close_error: i32,
}

/// A connection as another holder of its socket claims it
/// ([`Provider::claim_ticket`], [`Provider::claim`]).
#[derive(Debug, Clone, Copy)]
pub struct ClaimTicket {
    app: u64,
    sock: SocketId,
    key: u64,
    peer: Option<SocketAddrV4>,
    local: Option<SocketAddrV4>,
    nonblocking: bool,
    keepalive: bool,
    nodelay: bool,
    linger: (bool, i32),
    shut: (bool, bool),
    bufs: Bufs,
}

/// Bytes of [`ClaimTicket::to_bytes`].
pub const TICKET_BYTES: usize = 40;

impl ClaimTicket {
    /// What the ticket records of the socket (addresses and options), for
    /// a process that receives the socket in an `SCM_RIGHTS` message and
    /// claims its connection with its life ([`Provider::claim_by_life`]);
    /// the socket's name and the claim key stay out (the receiver gets the
    /// key from the daemon).
    pub fn to_bytes(&self) -> [u8; TICKET_BYTES] {
        let mut b = [0u8; TICKET_BYTES];
        let addr = |a: Option<SocketAddrV4>, out: &mut [u8]| {
            if let Some(a) = a {
                out[0] = 1;
                out[1..5].copy_from_slice(&a.ip().octets());
                out[5..7].copy_from_slice(&a.port().to_le_bytes());
            }
        };
        addr(self.peer, &mut b[0..7]);
        addr(self.local, &mut b[7..14]);
        b[14] = u8::from(self.nonblocking)
            | u8::from(self.keepalive) << 1
            | u8::from(self.nodelay) << 2
            | u8::from(self.linger.0) << 3
            | u8::from(self.shut.0) << 4
            | u8::from(self.shut.1) << 5;
        b[16..20].copy_from_slice(&self.linger.1.to_le_bytes());
        b[20..28].copy_from_slice(&(self.bufs.snd as u64).to_le_bytes());
        b[28..36].copy_from_slice(&(self.bufs.rcv as u64).to_le_bytes());
        b
    }

    /// The connection's peer, as its socket recorded it.
    pub fn peer(&self) -> Option<SocketAddrV4> {
        self.peer
    }

    /// The connection's local address, as its socket recorded it.
    pub fn local(&self) -> Option<SocketAddrV4> {
        self.local
    }

    /// The inverse of [`ClaimTicket::to_bytes`] (None for bytes it never
    /// writes: ring sizes that are not powers of two of at most 1 GiB).
    pub fn from_bytes(b: &[u8]) -> Option<ClaimTicket> {
        let b: &[u8; TICKET_BYTES] = b.try_into().ok()?;
        let addr = |x: &[u8]| {
            (x[0] == 1).then(|| {
                SocketAddrV4::new(
                    std::net::Ipv4Addr::new(x[1], x[2], x[3], x[4]),
                    u16::from_le_bytes([x[5], x[6]]),
                )
            })
        };
        let size = |x: &[u8]| {
            let v = u64::from_le_bytes(x.try_into().expect("8 bytes"));
            (v.is_power_of_two() && v <= 1 << 30).then_some(v as usize)
        };
        let f = |bit: u8| b[14] & (1 << bit) != 0;
        Some(ClaimTicket {
            app: 0,
            sock: 0,
            key: 0,
            peer: addr(&b[0..7]),
            local: addr(&b[7..14]),
            nonblocking: f(0),
            keepalive: f(1),
            nodelay: f(2),
            linger: (f(3), i32::from_le_bytes(b[16..20].try_into().ok()?)),
            shut: (f(4), f(5)),
            bufs: Bufs {
                snd: size(&b[20..28])?,
                rcv: size(&b[28..36])?,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    Listening,
    Connecting,
    Connected,
}

pub(crate) struct LocalSock {
    state: State,
    bound: Option<SocketAddrV4>,
    nonblocking: bool,
    /// The application's event descriptor (not owned): an eventfd (the
    /// daemon holds its own copy) or a wake socket (the daemon holds a
    /// sender of it; see `efd_wake`).
    efd: Option<RawFd>,
    /// `efd` is a wake socket (`dsan_channel::wake`), not an eventfd.
    efd_wake: bool,
    /// The events selected.
    mask: u32,
    /// The listener's backlog ring (this process consumes).
    backlog: Option<Consumer>,
    /// A request taken from the ring and deferred (or not yet answered
    /// because the host is out of connections): the head of the backlog.
    held: Option<Request>,
    area: Option<usize>,
    seq: u32,
    peer: Option<SocketAddrV4>,
    /// Ring sizes (SO_SNDBUF / SO_RCVBUF).
    bufs: Bufs,
    keepalive: bool,
    nodelay: bool,
    /// SO_LINGER as set: (on, seconds). {1, 0} makes close reset the connection.
    linger: (bool, i32),
    /// 0, or the parent pid whose listener `listen` takes over.
    takeover: u32,
    /// SO_REUSEPORT: `listen` joins a listener of the same user on the same
    /// address that set it too.
    reuse_port: bool,
    shut_rd: bool,
    shut_wr: bool,
    /// SO_ERROR reported how the connection ended already.
    error_reported: bool,
}

impl LocalSock {
    fn new() -> Self {
        LocalSock {
            state: State::Fresh,
            bound: None,
            nonblocking: false,
            efd: None,
            efd_wake: false,
            mask: 0,
            backlog: None,
            held: None,
            area: None,
            seq: 0,
            peer: None,
            bufs: Bufs::default(),
            keepalive: false,
            nodelay: false,
            linger: (false, 0),
            takeover: 0,
            reuse_port: false,
            shut_rd: false,
            shut_wr: false,
            error_reported: false,
        }
    }

    /// The request at the head of the backlog, if any (taking it out of the
    /// ring; requests that expired meanwhile are dropped unasked).
    fn head(&mut self) -> Result<Option<Request>> {
        if let Some(r) = self.held {
            return Ok(Some(r));
        }
        let Some(ring) = self.backlog.as_mut() else {
            return Ok(None);
        };
        loop {
            let Some(slot) = ring.pop().map_err(|_| Error::NetDown)? else {
                return Ok(None);
            };
            // The daemon is the only writer; a slot that does not parse is skipped.
            let Ok(r) = Request::parse(&slot) else {
                continue;
            };
            if r.expired(sys::monotonic_ns()) {
                continue;
            }
            self.held = Some(r);
            return Ok(Some(r));
        }
    }
}

/// How long a command may take before the daemon is presumed stuck; connects
/// wait for the connect budget on top.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a control-socket request waits for the daemon's answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Spin this long on shared memory before sleeping on a futex.
const SPIN: Duration = Duration::from_micros(200);

/// An attachment to the local dsand.
pub struct Provider {
    /// The daemon's id for this attachment (a forked child names the
    /// parent's sockets by it when it claims their connections).
    app_id: u64,
    ctl: Mutex<UnixStream>,
    ctl_fd: RawFd,
    // Drop order: socket views (in `socks`) before the region they point into.
    socks: Vec<Mutex<Option<LocalSock>>>,
    alloc: Mutex<()>,
    /// Backlog areas of the region in use.
    areas: Mutex<[bool; MAX_LISTENERS]>,
    region: Region,
    /// The command ring's producing end (one producer: pushes take this lock).
    cmds: Mutex<Producer>,
    /// This process's own doorbell.
    doorbell: Bell,
    /// The data path of each socket.
    io: Vec<data::IoSlot>,
    /// The host's SAN addresses with their prefix lengths (the switch's subnet table).
    san_addrs: Mutex<(u64, Vec<Subnet>)>,
    /// When the control socket was last found open (CLOCK_MONOTONIC ns; 0
    /// never): [`Provider::check`] trusts it for `ALIVE_FOR`.
    alive_at: std::sync::atomic::AtomicU64,
}

/// How long a look at the control socket that found the daemon there is
/// trusted by the calls that start work (a command sent meanwhile to a
/// daemon that died is caught by its wait, which looks again).
const ALIVE_FOR: u64 = 1_000_000;

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("ctl_fd", &self.ctl_fd)
            .finish()
    }
}

/// The `san_addrs` of a daemon's reply.
/// One request on the control socket and its reply (`dsan_channel::ctl`).
/// A refusal is [`Error::MFile`] when the daemon's share of descriptors is
/// used up, else [`Error::Inval`]; a daemon that does not answer, or
/// answers with anything but a reply of this format, [`Error::NetDown`].
fn request(ctl: &UnixStream, req: ctl::Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>)> {
    sys::send_typed(ctl.as_raw_fd(), req.emit(), fds).map_err(|_| Error::NetDown)?;
    let (b, fds) = sys::recv_typed(ctl.as_raw_fd())
        .map_err(|_| Error::NetDown)?
        .ok_or(Error::NetDown)?;
    match Reply::parse(&b).map_err(|_| Error::NetDown)? {
        Reply::Refused { errno, .. } if errno == libc::EMFILE => Err(Error::MFile),
        Reply::Refused { .. } => Err(Error::Inval),
        r => Ok((r, fds)),
    }
}

impl Provider {
    /// Attaches to the daemon at `socket` (`None`: `$DSAN_SOCKET`, else
    /// `/run/dsan/dsand.sock`).
    ///
    /// # Errors
    /// [`Error::NetDown`] if no daemon answers or the attachment fails.
    pub fn attach(socket: Option<&Path>) -> Result<Arc<Provider>> {
        let path = socket
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("DSAN_SOCKET").map(Into::into))
            .unwrap_or_else(|| "/run/dsan/dsand.sock".into());
        let ctl = UnixStream::connect(&path).map_err(|_| Error::NetDown)?;
        // No request may hang its caller for ever (a fork handler among
        // them): a daemon that does not answer within this is gone.
        let _ = ctl.set_read_timeout(Some(CONTROL_TIMEOUT));
        let _ = ctl.set_write_timeout(Some(CONTROL_TIMEOUT));
        let (
            Reply::Attached {
                app: app_id,
                region_size,
                region_version,
                subnets,
            },
            mut fds,
        ) = request(&ctl, ctl::Request::Attach, &[])?
        else {
            return Err(Error::NetDown);
        };
        if fds.len() != 3 || region_version != REGION_VERSION {
            return Err(Error::NetDown);
        }
        let size = usize::try_from(region_size).map_err(|_| Error::NetDown)?;
        let doorbell = fds.pop().expect("three fds");
        let page = fds.pop().expect("three fds");
        let region_fd = fds.pop().expect("three fds");
        let (region, cmds) = Region::open(region_fd, size).map_err(|_| Error::NetDown)?;
        let doorbell = Bell::open(page, doorbell).map_err(|_| Error::NetDown)?;
        let ctl_fd = ctl.as_raw_fd();
        let epoch = region.header().subnets_epoch.load(Ordering::Acquire);
        let san_addrs = Mutex::new((epoch, subnets));
        Ok(Arc::new(Provider {
            app_id,
            san_addrs,
            ctl: Mutex::new(ctl),
            ctl_fd,
            socks: (0..MAX_SOCKETS).map(|_| Mutex::new(None)).collect(),
            alloc: Mutex::new(()),
            areas: Mutex::new([false; MAX_LISTENERS]),
            region,
            cmds: Mutex::new(cmds),
            doorbell,
            io: (0..MAX_SOCKETS).map(|_| data::IoSlot::default()).collect(),
            alive_at: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The host's SAN addresses and their prefix lengths. The daemon bumps
    /// an epoch in the region when they change; a changed epoch makes this
    /// ask for them again (no polling: one load when nothing changed).
    pub fn san_addrs(&self) -> Vec<Subnet> {
        let epoch = self.region.header().subnets_epoch.load(Ordering::Acquire);
        let mut cached = self.san_addrs.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != epoch {
            let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok((Reply::Subnets(s), _)) = request(&ctl, ctl::Request::Subnets, &[]) {
                *cached = (epoch, s);
            }
        }
        cached.1.clone()
    }

    /// Tells the daemon that the switch fell back to TCP (it counts these in
    /// `dsan_switch_fallbacks_total`).
    ///
    /// # Errors
    /// [`Error::NetDown`] if the daemon is gone.
    pub fn report_fallback(&self) -> Result<()> {
        self.report_fallback_for("timed_out")
    }

    /// [`report_fallback`](Self::report_fallback) with its reason
    /// (`timed_out`, `tcp_only`, `no_san_socket`), counted in
    /// `dsan_switch_fallbacks_total{reason}`.
    ///
    /// # Errors
    /// [`Error::NetDown`] if the daemon is gone.
    pub fn report_fallback_for(&self, reason: &str) -> Result<()> {
        let reason =
            ctl::FallbackReason::from_label(reason).unwrap_or(ctl::FallbackReason::TimedOut);
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        request(&ctl, ctl::Request::SwitchFallback(reason), &[]).map(|_| ())
    }

    /// Reports (for the daemon's log and
    /// `dsan_switch_san_listen_failures_total{reason}`) that a listen on
    /// `port` serves kernel TCP only: its SAN side failed with `err`.
    ///
    /// # Errors
    /// [`Error::NetDown`] if the daemon cannot be reached.
    pub fn report_listen_failure(&self, port: u16, err: Error) -> Result<()> {
        let reason = match err {
            Error::AddrInUse => ctl::ListenFailure::InUse,
            Error::Os(libc::EACCES) => ctl::ListenFailure::Denied,
            _ => ctl::ListenFailure::Other,
        };
        let req = ctl::Request::SwitchListenFailed {
            reason,
            port,
            errno: err.errno(),
        };
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        request(&ctl, req, &[]).map(|_| ())
    }

    /// Whether the daemon is still there (its control socket open, our region
    /// not closed by it).
    pub fn daemon_alive(&self) -> bool {
        if self.region.header().closed.load(Ordering::Acquire) != 0 {
            return false;
        }
        let now = sys::monotonic_ns();
        let mut p = libc::pollfd {
            fd: self.ctl_fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        let alive = !(r > 0
            && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0);
        if alive {
            self.alive_at.store(now, Ordering::Relaxed);
        }
        alive
    }

    /// [`Provider::daemon_alive`], trusting a look less than `ALIVE_FOR`
    /// old: the calls that start work make no system call for it when the
    /// process talks to the daemon often.
    pub fn daemon_alive_recently(&self) -> bool {
        if self.region.header().closed.load(Ordering::Acquire) != 0 {
            return false;
        }
        let at = self.alive_at.load(Ordering::Relaxed);
        (at != 0 && sys::monotonic_ns().saturating_sub(at) < ALIVE_FOR) || self.daemon_alive()
    }

    fn lock(&self, s: SocketId) -> Result<MutexGuard<'_, Option<LocalSock>>> {
        let m = self.socks.get(s as usize).ok_or(Error::NotSock)?;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(Error::NotSock);
        }
        Ok(g)
    }

    /// Sends a command for socket `s` and waits (at most `timeout`) for its
    /// completion. Returns the daemon's result.
    fn command(&self, s: SocketId, ls: &mut LocalSock, op: Op, timeout: Duration) -> Result<i64> {
        let seq = self.post(s, ls, op)?;
        let sh = self.region.sock(s as usize);
        // A close interrupts every wait but its own.
        let interruptible = !matches!(op, Op::Close);
        self.wait_word(s, interruptible, sh, &sh.done_seq, |v| v == seq, timeout)?;
        Ok(sh.result.load(Ordering::Acquire))
    }

    /// Sends a command for socket `s` without waiting for its completion;
    /// returns its sequence number.
    fn post(&self, s: SocketId, ls: &mut LocalSock, op: Op) -> Result<u32> {
        ls.seq = ls.seq.wrapping_add(1).max(1);
        let slot = Command {
            sock: s,
            seq: ls.seq,
            op,
        }
        .to_slot();
        self.push_command(&slot)?;
        Ok(ls.seq)
    }

    /// Pushes a command slot onto the ring (waiting while the ring is full,
    /// at most [`COMMAND_TIMEOUT`]) and rings the doorbell.
    fn push_command(&self, slot: &dsan_channel::ring::Slot) -> Result<()> {
        let start = Instant::now();
        loop {
            let r = self
                .cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot);
            match r {
                Ok(()) => break,
                // Ring full: the lcore is behind; wait a little.
                Err(PushError::Full) => {
                    self.doorbell.ring();
                    if !self.daemon_alive() || start.elapsed() > COMMAND_TIMEOUT {
                        return Err(Error::NetDown);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(PushError::Violation(_)) => return Err(Error::NetDown),
            }
        }
        self.doorbell.ring();
        Ok(())
    }

    /// Spins, then sleeps on the futex `word` until `done(word)` or `timeout`.
    /// A close of socket `s` from another thread ends the wait at once with
    /// EINTR (the close then takes the socket).
    fn wait_word(
        &self,
        s: SocketId,
        interruptible: bool,
        sh: &SockShm,
        word: &AtomicU32,
        done: impl Fn(u32) -> bool,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        let closing = || interruptible && self.io.get(s as usize).is_some_and(|io| io.closing());
        loop {
            if closing() {
                return Err(Error::Os(libc::EINTR));
            }
            let v = word.load(Ordering::Acquire);
            if done(v) {
                return Ok(());
            }
            if start.elapsed() < SPIN {
                // Yield rather than burn the core: on a small machine the lcore
                // that will complete this may need it.
                std::thread::yield_now();
                continue;
            }
            sh.waiters.fetch_add(1, Ordering::SeqCst);
            if !done(word.load(Ordering::SeqCst)) && !closing() {
                sys::futex_wait(word, v, Duration::from_millis(10));
            }
            sh.waiters.fetch_sub(1, Ordering::SeqCst);
            if done(word.load(Ordering::Acquire)) {
                return Ok(());
            }
            if !self.daemon_alive() {
                return Err(Error::NetDown);
            }
            if start.elapsed() > timeout {
                return Err(Error::TimedOut);
            }
        }
    }

    fn check(&self) -> Result<()> {
        if self.daemon_alive_recently() {
            Ok(())
        } else {
            Err(Error::NetDown)
        }
    }

    /// A new SAN socket (no dataplane state until listen or connect).
    ///
    /// # Errors
    /// [`Error::MFile`] when the process has [`MAX_SOCKETS`] open; [`Error::NetDown`].
    pub fn socket(&self) -> Result<SocketId> {
        self.check()?;
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        for (i, m) in self.socks.iter().enumerate() {
            // A slot locked by a call in progress is in use: skip it.
            let Ok(mut g) = m.try_lock() else { continue };
            // A close the daemon has not done yet: the slot is still its.
            let done = self.region.sock(i).done_seq.load(Ordering::Acquire);
            if g.is_none() && self.io[i].close_in_flight(done) {
                continue;
            }
            // A closed socket whose last bytes the daemon still sends is not
            // free; nor is one that a call in progress or a `SanSocket` still
            // names (its calls must never reach the slot's next socket).
            let lingering = self.region.stream(i).state() & ST_LINGER != 0;
            if g.is_none() && !lingering && !self.io[i].pinned() {
                let sh = self.region.sock(i);
                let gen = self.io[i].reset();
                self.region.stream(i).reset_app_words(gen);
                let mut ls = LocalSock::new();
                // Sequence numbers continue across reuse of the slot, so a stale
                // completion of the previous socket never answers a new command.
                ls.seq = sh.done_seq.load(Ordering::Acquire);
                *g = Some(ls);
                sh.events.store(0, Ordering::Relaxed);
                sh.accept_error.store(0, Ordering::Relaxed);
                sh.connect_error.store(0, Ordering::Relaxed);
                sh.connect_state.store(0, Ordering::Relaxed);
                return Ok(i as SocketId);
            }
        }
        Err(Error::MFile)
    }

    /// Binds `s` to a local SAN address (or 0.0.0.0) and port.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::Inval`] if already bound or in use.
    pub fn bind(&self, s: SocketId, addr: SocketAddrV4) -> Result<()> {
        self.check()?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        if ls.bound.is_some() || ls.state != State::Fresh {
            return Err(Error::Inval);
        }
        ls.bound = Some(addr);
        Ok(())
    }

    /// Listens with a backlog of `backlog` requests; returns the effective capacity.
    ///
    /// # Errors
    /// [`Error::Inval`] if unbound (or bound to port 0) or not fresh;
    /// [`Error::AddrInUse`], [`Error::AddrNotAvail`], [`Error::MFile`], [`Error::NetDown`].
    pub fn listen(&self, s: SocketId, backlog: i32) -> Result<usize> {
        self.check()?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        match ls.state {
            State::Listening => return Ok(ls.backlog.as_ref().map_or(0, Consumer::capacity)),
            State::Connected => return Err(Error::IsConn), // WSD: WSAEISCONN
            State::Connecting => return Err(Error::Inval),
            State::Fresh => {}
        }
        let Some(addr) = ls.bound.filter(|a| a.port() != 0) else {
            return Err(Error::Inval);
        };
        // A free backlog area of this process.
        let area = {
            let mut areas = self.areas.lock().unwrap_or_else(|e| e.into_inner());
            let k = areas.iter().position(|u| !u).ok_or(Error::MFile)?;
            areas[k] = true;
            k
        };
        let r = self.command(
            s,
            ls,
            Op::Listen {
                addr,
                backlog,
                area: area as u16,
                bufs: ls.bufs,
                takeover: ls.takeover,
                reuse_port: ls.reuse_port,
            },
            COMMAND_TIMEOUT,
        );
        let r = match r {
            Ok(r) if r >= 0 => r,
            other => {
                self.free_area(area);
                return Err(match other {
                    Ok(r) => Error::from_errno(-r as i32),
                    Err(e) => e,
                });
            }
        };
        ls.backlog = Some(self.region.open_backlog(area).map_err(|_| Error::NetDown)?);
        ls.area = Some(area);
        ls.state = State::Listening;
        Ok(r as usize)
    }

    /// Makes `listen` on `s` take the address over from the listener of
    /// this process's parent `ppid` (a process forked after its parent
    /// listened: the parent's listener then gets no more requests). The
    /// daemon checks that `ppid` is the parent and holds the listener; else
    /// the address is in use, as without this call.
    ///
    /// # Errors
    /// [`Error::NotSock`].
    pub fn set_takeover(&self, s: SocketId, ppid: u32) -> Result<()> {
        let mut g = self.lock(s)?;
        g.as_mut().expect("checked").takeover = ppid;
        Ok(())
    }

    /// Registers `efd` (an eventfd, or a wake socket: `dsan_channel::wake`)
    /// for the `mask` events of `s` and makes `s` nonblocking. A negative
    /// `efd` with mask 0 unregisters.
    ///
    /// An eventfd travels to the daemon over the control socket (the daemon
    /// keeps its own copy, written by a notifier thread of the process's);
    /// for a wake socket a sender connected to it does (signalled by the
    /// daemon's lcore itself). The mask travels as an event-select command.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::Inval`] for a bad fd (neither an eventfd
    /// nor a wake socket) or mask; [`Error::NetDown`].
    pub fn event_select(&self, s: SocketId, efd: RawFd, mask: u32) -> Result<()> {
        self.event_select_with(s, efd, None, mask)
    }

    /// As [`event_select`](Self::event_select), with `wfd` (of `efd`'s kind)
    /// signalled for FD_WRITE instead of `efd` (see
    /// [`event_select_write`](Self::event_select_write)), both registered in
    /// one request: a process that polls "readable" and "writable" apart
    /// pays one control round trip and one command per socket.
    ///
    /// # Errors
    /// As [`event_select`](Self::event_select).
    pub fn event_select_with(
        &self,
        s: SocketId,
        efd: RawFd,
        wfd: Option<RawFd>,
        mask: u32,
    ) -> Result<()> {
        self.check()?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        if mask & !FD_ALL != 0 || (efd < 0 && (mask != 0 || wfd.is_some())) {
            return Err(Error::Inval);
        }
        // Eventfds travel as they are (the daemon's notifier writes its
        // copies); for wake sockets, senders connected to them do (the
        // daemon's lcore signals them itself). One kind for both.
        let wake = efd >= 0 && dsan_channel::wake::is_wake(efd);
        if efd >= 0 {
            let fds: Vec<RawFd> = std::iter::once(efd).chain(wfd).collect();
            let senders: Vec<OwnedFd> = if wake {
                fds.iter()
                    .map(|f| dsan_channel::wake::sender(*f).map_err(|_| Error::Inval))
                    .collect::<Result<_>>()?
            } else {
                if !fds.iter().all(|f| sys::is_eventfd(*f)) {
                    return Err(Error::Inval);
                }
                Vec::new()
            };
            let sent: Vec<RawFd> = if wake {
                senders.iter().map(AsRawFd::as_raw_fd).collect()
            } else {
                fds
            };
            let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
            request(&ctl, ctl::Request::EventFd { sock: s }, &sent).map_err(|e| match e {
                Error::Inval | Error::MFile => e,
                _ => Error::NetDown,
            })?;
        }
        let r = self.command(s, ls, Op::EventSelect { mask }, COMMAND_TIMEOUT)?;
        if r < 0 {
            return Err(Error::from_errno(-r as i32));
        }
        ls.efd = (efd >= 0).then_some(efd);
        ls.efd_wake = wake;
        ls.mask = mask;
        ls.nonblocking = mask != 0;
        drop(g);
        // What holds already is posted at once (WSD: FD_READ when bytes are
        // there, FD_WRITE when a send would take some).
        let ready = self.ready_events(s, mask);
        if ready != 0 {
            self.region
                .sock(s as usize)
                .events
                .fetch_or(ready, Ordering::AcqRel);
            // (A state that holds, not news: no second wake-up for a
            // descriptor signalled already.)
            let post = |fd: RawFd| {
                if wake {
                    dsan_channel::wake::post(fd);
                } else {
                    sys::signal_eventfd_if_quiet(fd);
                }
            };
            match wfd {
                Some(w) => {
                    if ready & FD_WRITE != 0 {
                        post(w);
                    }
                    if ready & !FD_WRITE != 0 {
                        post(efd);
                    }
                }
                None => post(efd),
            }
        }
        Ok(())
    }

    /// Returns and clears the events recorded for `s`, and drains its eventfd.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::NetDown`].
    pub fn enum_network_events(&self, s: SocketId) -> Result<NetworkEvents> {
        // No daemon check: the region stays mapped, and the events a daemon
        // posted as it stopped (FD_ACCEPT with ENETDOWN) are still to be read.
        let g = self.lock(s)?;
        let ls = g.as_ref().expect("checked");
        // Drain first: an event recorded after this is seen by the swap below
        // or signals the eventfd again, so no wake-up is lost.
        if let Some(fd) = ls.efd {
            if ls.efd_wake {
                dsan_channel::wake::drain(fd);
            } else {
                sys::drain_eventfd(fd);
            }
        }
        let sh = self.region.sock(s as usize);
        let events = sh.events.swap(0, Ordering::AcqRel);
        // An error goes with its event, once: it is reported (and cleared)
        // with the bit it belongs to. The daemon writes the error before it
        // sets the bit, so seeing the bit means seeing the error.
        let take = |bit: u32, word: &std::sync::atomic::AtomicI32| {
            if events & bit != 0 {
                word.swap(0, Ordering::AcqRel)
            } else {
                0
            }
        };
        let close_error = if events & FD_CLOSE != 0 {
            self.region.stream(s as usize).close_error()
        } else {
            0
        };
        Ok(NetworkEvents {
            events,
            accept_error: take(FD_ACCEPT, &sh.accept_error),
            connect_error: take(FD_CONNECT, &sh.connect_error),
            close_error,
        })
    }

    /// Accepts the request at the head of the backlog of `s`, asking `cond`
    /// (on this thread, before anything is sent to the peer). Returns the new
    /// socket and the peer's address.
    ///
    /// # Errors
    /// [`Error::Again`] if nothing is queued on a nonblocking socket or `cond`
    /// deferred; [`Error::ConnRefused`] if `cond` rejected; [`Error::Inval`] if
    /// `s` is not listening; [`Error::MFile`]; [`Error::NetDown`].
    pub fn accept(
        &self,
        s: SocketId,
        mut cond: impl FnMut(SocketAddrV4) -> Decision,
    ) -> Result<(SocketId, SocketAddrV4)> {
        self.check()?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        if ls.state != State::Listening {
            return Err(Error::Inval);
        }
        let sh = self.region.sock(s as usize);
        let bufs = ls.bufs;
        loop {
            let head = loop {
                let seen = sh.arrivals.load(Ordering::Acquire);
                if let Some(h) = ls.head()? {
                    break h;
                }
                if ls.nonblocking {
                    return Err(Error::Again);
                }
                self.wait_word(
                    s,
                    true,
                    sh,
                    &sh.arrivals,
                    |v| v != seen,
                    Duration::from_secs(3600),
                )
                .or_else(|e| if e == Error::TimedOut { Ok(()) } else { Err(e) })?;
            };
            let peer = head.peer;
            let d = cond(peer);
            if d == Decision::Defer {
                return Err(Error::Again); // stays held: the head next time
            }
            let new = if d == Decision::Accept {
                Some(self.socket()?)
            } else {
                None
            };
            let verdict = match new {
                Some(n) => Verdict::Accept { new_sock: n },
                None => Verdict::Reject,
            };
            let r = self.command(
                s,
                ls,
                Op::Decide {
                    key: head.key(),
                    peer_port: peer.port(),
                    verdict,
                },
                COMMAND_TIMEOUT,
            );
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    if let Some(n) = new {
                        self.release_slot(n);
                    }
                    return Err(e);
                }
            };
            if r == -i64::from(libc::ENOBUFS) {
                // Out of connections on the host: the request stays at the head.
                if let Some(n) = new {
                    self.release_slot(n);
                }
                return Err(Error::NoBufs);
            }
            ls.held = None; // answered (or no longer pending)
            if r == -i64::from(libc::ECONNABORTED) {
                // It expired before our answer reached the daemon: its client
                // gave up. Take the next one.
                if let Some(n) = new {
                    self.release_slot(n);
                }
                continue;
            }
            if let Some(n) = new {
                if r == 0 {
                    let mut ng = self.socks[n as usize]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let ns = ng.as_mut().expect("reserved");
                    ns.state = State::Connected;
                    ns.bufs = bufs;
                    ns.peer = Some(peer);
                    ns.bound = Some(head.local);
                    return Ok((n, peer));
                }
                self.release_slot(n);
            }
            return Err(if r == 0 || r == -i64::from(libc::ECONNREFUSED) {
                Error::ConnRefused
            } else {
                Error::from_errno(-r as i32)
            });
        }
    }

    fn free_area(&self, k: usize) {
        self.areas.lock().unwrap_or_else(|e| e.into_inner())[k] = false;
    }

    fn release_slot(&self, s: SocketId) {
        if let Some(m) = self.socks.get(s as usize) {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Connects `s` to `dst` over the SAN. Blocking sockets wait for the
    /// outcome; after `event_select(.., FD_CONNECT)` it returns
    /// [`Error::InProgress`] and the outcome arrives as FD_CONNECT.
    ///
    /// # Errors
    /// [`Error::ConnRefused`], [`Error::ConnReset`] (no listener),
    /// [`Error::TimedOut`], [`Error::HostUnreach`], [`Error::InProgress`],
    /// [`Error::Already`], [`Error::IsConn`], [`Error::Inval`], [`Error::NetDown`].
    pub fn connect(&self, s: SocketId, dst: SocketAddrV4) -> Result<()> {
        self.check()?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        let sh = self.region.sock(s as usize);
        if ls.state == State::Connecting {
            match sh.connect_state.load(Ordering::Acquire) {
                0 => return Err(Error::Already),
                1 => ls.state = State::Connected,
                _ => ls.state = State::Fresh,
            }
        }
        match ls.state {
            State::Connected => return Err(Error::IsConn),
            State::Listening => return Err(Error::Inval),
            _ => {}
        }
        if dst.port() == 0 || dst.ip().is_unspecified() {
            return Err(Error::Inval);
        }
        let src = ls.bound.map(|b| *b.ip()).filter(|ip| !ip.is_unspecified());
        let src_port = ls.bound.map_or(0, |b| b.port());
        let nonblocking = ls.nonblocking && ls.mask & FD_CONNECT != 0;
        sh.connect_error.store(0, Ordering::Relaxed);
        // The connect budget (2 s) plus margin.
        let r = self.command(
            s,
            ls,
            Op::Connect {
                dst,
                src,
                src_port,
                nonblocking,
                bufs: ls.bufs,
            },
            COMMAND_TIMEOUT,
        )?;
        ls.peer = Some(dst);
        // The daemon chose the connection's local address and port with the
        // attempt (`result2`: IPv4 << 16 | port): the socket's name from now on.
        if r == 0 || r == -i64::from(libc::EINPROGRESS) {
            let w = sh.result2.load(Ordering::Acquire);
            let port = (w & 0xffff) as u16;
            if port != 0 {
                ls.bound = Some(SocketAddrV4::new(
                    std::net::Ipv4Addr::from((w >> 16) as u32),
                    port,
                ));
            }
        }
        match r {
            0 => {
                ls.state = State::Connected;
                Ok(())
            }
            r if r == -i64::from(libc::EINPROGRESS) => {
                ls.state = State::Connecting;
                Err(Error::InProgress)
            }
            r => Err(Error::from_errno(-r as i32)),
        }
    }

    /// Whether a request the condition function deferred waits at the head
    /// of listener `s`'s backlog.
    ///
    /// # Errors
    /// [`Error::NotSock`].
    pub fn deferred(&self, s: SocketId) -> Result<bool> {
        let g = self.lock(s)?;
        Ok(g.as_ref().is_some_and(|ls| ls.held.is_some()))
    }

    /// Reports how many connections were accepted on the application's
    /// behalf for listener `s` and wait for its accept (the switch's queue),
    /// so that `dsanctl listeners` and the metrics show both queues.
    ///
    /// # Errors
    /// [`Error::NotSock`].
    pub fn report_accepted_waiting(&self, s: SocketId, n: usize) -> Result<()> {
        let _g = self.lock(s)?;
        self.region
            .sock(s as usize)
            .accepted_waiting
            .store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
        Ok(())
    }

    /// The local address of a socket: what it was bound to, or, once
    /// connected or accepted, the connection's own address and port.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::Inval`] if it has none yet.
    pub fn local_addr(&self, s: SocketId) -> Result<SocketAddrV4> {
        let g = self.lock(s)?;
        g.as_ref().and_then(|l| l.bound).ok_or(Error::Inval)
    }

    /// The peer of a connected socket.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::Inval`] if not connected.
    pub fn peer_addr(&self, s: SocketId) -> Result<SocketAddrV4> {
        let g = self.lock(s)?;
        g.as_ref().and_then(|l| l.peer).ok_or(Error::Inval)
    }

    /// What another holder of connected socket `s` (a child forked with
    /// this attachment's region mapped) needs to claim its connection with
    /// [`Provider::claim`]: the socket's name here, the connection's claim
    /// key from its stream block, and what the socket recorded (addresses,
    /// options). Takes no lock that a thread lost in a fork may hold.
    ///
    /// # Errors
    /// [`Error::NotConn`] unless connected; [`Error::NotSock`];
    /// [`Error::Again`] if a call of the parent held the socket at the fork.
    pub fn claim_ticket(&self, s: SocketId) -> Result<ClaimTicket> {
        let m = self.socks.get(s as usize).ok_or(Error::NotSock)?;
        let g = match m.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(Error::Again),
        };
        let ls = g.as_ref().ok_or(Error::NotSock)?;
        let connected = ls.state == State::Connected
            || (ls.state == State::Connecting
                && self
                    .region
                    .sock(s as usize)
                    .connect_state
                    .load(Ordering::Acquire)
                    == 1);
        let st = self.region.stream(s as usize);
        if !connected || st.state() & ST_OPEN == 0 || st.stamp() != self.io[s as usize].gen() {
            return Err(Error::NotConn);
        }
        Ok(ClaimTicket {
            app: self.app_id,
            sock: s,
            key: st.claim_key(),
            peer: ls.peer,
            local: ls.bound,
            nonblocking: ls.nonblocking,
            keepalive: ls.keepalive,
            nodelay: ls.nodelay,
            linger: ls.linger,
            shut: (ls.shut_rd, ls.shut_wr),
            bufs: ls.bufs,
        })
    }

    /// A new socket of this attachment that serves the connection `t`
    /// names from now on (the daemon moves its rings here; the socket it
    /// came from still holds it, and the connection ends when the last
    /// holder closes it).
    ///
    /// # Errors
    /// [`Error::MFile`]; [`Error::NotConn`] if the connection is gone;
    /// [`Error::Os`] (EACCES: a wrong key or another user's connection;
    /// EBADF: no such socket); [`Error::NetDown`].
    pub fn claim(&self, t: &ClaimTicket) -> Result<SocketId> {
        let s = self.socket()?;
        let r = {
            let mut g = self.lock(s)?;
            let ls = g.as_mut().expect("checked");
            let op = Op::Claim {
                from_app: t.app,
                from_sock: t.sock,
                key: t.key,
            };
            let r = self.command(s, ls, op, COMMAND_TIMEOUT);
            if matches!(r, Ok(0)) {
                ls.state = State::Connected;
                ls.peer = t.peer;
                ls.bound = t.local;
                ls.nonblocking = t.nonblocking;
                ls.keepalive = t.keepalive;
                ls.nodelay = t.nodelay;
                ls.linger = t.linger;
                (ls.shut_rd, ls.shut_wr) = t.shut;
                ls.bufs = t.bufs;
            }
            r
        };
        match r {
            Ok(0) => Ok(s),
            other => {
                let _ = self.close(s);
                Err(match other {
                    Ok(e) => Error::from_errno(i32::try_from(-e).unwrap_or(libc::EINVAL)),
                    Err(e) => e,
                })
            }
        }
    }

    /// A new socket of this attachment that serves the connection whose
    /// life `life` is (the write end of the pipe, received with the socket
    /// in an `SCM_RIGHTS` message: holding it proves holding the
    /// connection), recorded as `t` says ([`ClaimTicket::from_bytes`]).
    /// The daemon names the connection's claim key to a holder of its
    /// life; the claim is then [`Provider::claim`]'s.
    ///
    /// # Errors
    /// As [`Provider::claim`]; [`Error::NotConn`] if no connection has that
    /// life (it ended).
    pub fn claim_by_life(&self, life: RawFd, t: &ClaimTicket) -> Result<SocketId> {
        let key = {
            let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
            let (r, _) = request(&ctl, ctl::Request::LifeKey, &[life]).map_err(|e| {
                if e == Error::Inval {
                    Error::NotConn
                } else {
                    e
                }
            })?;
            let Reply::Key(key) = r else {
                return Err(Error::NetDown);
            };
            key
        };
        // Named by its key alone: no attachment is 0 (the daemon counts
        // from 1), so the claim never takes it for a socket's own.
        self.claim(&ClaimTicket {
            app: 0,
            sock: 0,
            key,
            ..*t
        })
    }

    /// Registers the life of connected socket `s`: `fd` is the read end of
    /// a pipe whose write end the caller keeps beside the socket (and every
    /// process that inherits the socket inherits it too); the connection
    /// ends only once every copy of the write end is gone and no socket
    /// holds it (see [`Provider::claim`]).
    ///
    /// # Errors
    /// [`Error::NotConn`] if `s` holds no connection; [`Error::MFile`];
    /// [`Error::NetDown`].
    pub fn register_life(&self, s: SocketId, fd: RawFd) -> Result<()> {
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        request(&ctl, ctl::Request::Life { sock: s }, &[fd])
            .map(|_| ())
            .map_err(|e| if e == Error::Inval { Error::NotConn } else { e })
    }

    /// In [`Provider::stream`]: socket `s` holds a connection that another
    /// socket serves now (`ST_MOVED`): take it back.
    pub(crate) fn reclaim(&self, s: SocketId, ls: &mut LocalSock) -> Result<()> {
        let key = self.region.stream(s as usize).claim_key();
        let op = Op::Claim {
            from_app: self.app_id,
            from_sock: s,
            key,
        };
        match self.command(s, ls, op, COMMAND_TIMEOUT)? {
            0 => Ok(()),
            e => Err(Error::from_errno(i32::try_from(-e).unwrap_or(libc::EINVAL))),
        }
    }

    /// Closes `s`: a listener refuses what it still queues, a connection is
    /// torn down, a connect in progress is abandoned.
    ///
    /// # Errors
    /// [`Error::NotSock`] for an unknown or closed socket.
    pub fn close(&self, s: SocketId) -> Result<()> {
        // A call blocked on this socket in another thread (a connect, an
        // accept, a send or receive) holds it: tell it to give up and wake
        // it, then take the socket. (On a free slot the flag is harmless: a
        // new socket there clears it.)
        let io = self.io.get(s as usize).ok_or(Error::NotSock)?;
        io.close();
        // Only a thread that announced itself can be asleep (it looks at
        // the closing flag after announcing): no system call otherwise.
        let sh = self.region.sock(s as usize);
        if sh.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&sh.done_seq);
            sys::futex_wake(&sh.arrivals);
        }
        self.region.stream(s as usize).wake_sleepers();
        let mut g = self.lock(s)?;
        let mut ls = g.take().expect("checked");
        io.close();
        // A fresh socket whose connect failed holds nothing in the daemon
        // (it forgets the socket with the failure), so its close costs no
        // round trip; one that connected, or whose connect still runs, does.
        let had_state = ls.state != State::Fresh
            || self
                .region
                .sock(s as usize)
                .connect_state
                .load(Ordering::Acquire)
                > 0;
        // The daemon forgets the socket's state and its event descriptor.
        if self.daemon_alive_recently() && (had_state || ls.efd.is_some()) {
            if ls.state == State::Connected && ls.area.is_none() {
                // A connection's close is posted, not awaited (as a kernel
                // close does not wait for the FIN): the daemon sends what
                // the send ring still holds, then the FIN, on its own. The
                // slot stays this socket's until the daemon has done it.
                let op = if ls.linger == (true, 0) {
                    Op::Abort
                } else {
                    Op::Close
                };
                if let Ok(seq) = self.post(s, &mut ls, op) {
                    io.posted_close(seq);
                }
            } else {
                let _ = self.command(s, &mut ls, Op::Close, COMMAND_TIMEOUT);
            }
        }
        let sh = self.region.sock(s as usize);
        sh.events.store(0, Ordering::Relaxed);
        ls.backlog = None;
        if let Some(k) = ls.area {
            self.free_area(k);
        }
        Ok(())
    }
}

/// An owned SAN socket for Rust callers; closed on drop.
///
/// It pins its slot for its whole life: an aborted `SanSocket` that another
/// thread still holds can never reach a newer socket in the same slot (its
/// calls find the slot closed, not someone else's connection).
#[derive(Debug)]
pub struct SanSocket {
    p: Arc<Provider>,
    s: SocketId,
    /// Closed already ([`SanSocket::abort`]): dropping it must not close
    /// it again.
    closed: std::sync::atomic::AtomicBool,
}

impl SanSocket {
    /// A new socket.
    ///
    /// # Errors
    /// As [`Provider::socket`].
    pub fn new(p: &Arc<Provider>) -> Result<SanSocket> {
        let s = p.socket()?;
        Ok(SanSocket::own(p.clone(), s))
    }
    /// Takes socket `s` (just made, so nothing else names it yet) and pins its slot.
    fn own(p: Arc<Provider>, s: SocketId) -> SanSocket {
        p.io[s as usize].pin_forever();
        SanSocket {
            p,
            s,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }
    /// Its id, unless it was closed ([`SanSocket::abort`]).
    fn live(&self) -> Result<SocketId> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::NotSock)
        } else {
            Ok(self.s)
        }
    }
    /// Its id in the provider's table.
    pub fn id(&self) -> SocketId {
        self.s
    }
    /// See [`Provider::register_life`].
    ///
    /// # Errors
    /// As [`Provider::register_life`].
    pub fn register_life(&self, fd: RawFd) -> Result<()> {
        self.p.register_life(self.live()?, fd)
    }
    /// See [`Provider::claim_ticket`].
    ///
    /// # Errors
    /// As [`Provider::claim_ticket`].
    pub fn claim_ticket(&self) -> Result<ClaimTicket> {
        self.p.claim_ticket(self.live()?)
    }
    /// A socket of `p` that serves the connection whose life is `life`
    /// (see [`Provider::claim_by_life`]).
    ///
    /// # Errors
    /// As [`Provider::claim_by_life`].
    pub fn claim_by_life(p: &Arc<Provider>, life: RawFd, t: &ClaimTicket) -> Result<SanSocket> {
        let s = p.claim_by_life(life, t)?;
        Ok(SanSocket::own(p.clone(), s))
    }
    /// A socket of `p` that serves the connection `t` names (see [`Provider::claim`]).
    ///
    /// # Errors
    /// As [`Provider::claim`].
    pub fn claim(p: &Arc<Provider>, t: &ClaimTicket) -> Result<SanSocket> {
        let s = p.claim(t)?;
        Ok(SanSocket::own(p.clone(), s))
    }
    /// See [`Provider::bind`].
    ///
    /// # Errors
    /// As there.
    pub fn bind(&self, a: SocketAddrV4) -> Result<()> {
        self.p.bind(self.live()?, a)
    }
    /// See [`Provider::listen`].
    ///
    /// # Errors
    /// As there.
    pub fn listen(&self, backlog: i32) -> Result<usize> {
        self.p.listen(self.live()?, backlog)
    }
    /// See [`Provider::event_select`].
    ///
    /// # Errors
    /// As there.
    pub fn event_select(&self, efd: std::os::fd::BorrowedFd<'_>, mask: u32) -> Result<()> {
        self.p.event_select(self.live()?, efd.as_raw_fd(), mask)
    }
    /// See [`Provider::enum_network_events`].
    ///
    /// # Errors
    /// As there.
    pub fn enum_network_events(&self) -> Result<NetworkEvents> {
        self.p.enum_network_events(self.live()?)
    }
    /// See [`Provider::accept`].
    ///
    /// # Errors
    /// As there.
    pub fn accept(
        &self,
        cond: impl FnMut(SocketAddrV4) -> Decision,
    ) -> Result<(SanSocket, SocketAddrV4)> {
        let (s, a) = self.p.accept(self.live()?, cond)?;
        Ok((SanSocket::own(self.p.clone(), s), a))
    }
    /// See [`Provider::send`].
    ///
    /// # Errors
    /// As there.
    pub fn send(&self, buf: &[u8], flags: i32) -> Result<usize> {
        self.p.send(self.live()?, buf, flags)
    }
    /// See [`Provider::send_mode`].
    ///
    /// # Errors
    /// As there.
    pub fn send_mode(&self, buf: &[u8], flags: i32, block: bool) -> Result<usize> {
        self.p.send_mode(self.live()?, buf, flags, Some(block))
    }
    /// See [`Provider::recv_mode`].
    ///
    /// # Errors
    /// As there.
    pub fn recv_mode(&self, buf: &mut [u8], flags: i32, block: bool) -> Result<usize> {
        self.p.recv_mode(self.live()?, buf, flags, Some(block))
    }
    /// Sends all of `buf` (a blocking socket's send does).
    ///
    /// # Errors
    /// As [`Provider::send`].
    pub fn send_all(&self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.p.send(self.live()?, buf, 0)?;
            buf = &buf[n..];
        }
        Ok(())
    }
    /// See [`Provider::recv`].
    ///
    /// # Errors
    /// As there.
    pub fn recv(&self, buf: &mut [u8], flags: i32) -> Result<usize> {
        self.p.recv(self.live()?, buf, flags)
    }
    /// Receives exactly `buf.len()` bytes; `Ok(false)` if the stream ended first.
    ///
    /// # Errors
    /// As [`Provider::recv`].
    pub fn recv_exact(&self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.p.recv(self.live()?, &mut buf[got..], 0)? {
                0 => return Ok(false),
                n => got += n,
            }
        }
        Ok(true)
    }
    /// See [`Provider::shutdown`].
    ///
    /// # Errors
    /// As there.
    pub fn shutdown(&self, how: i32) -> Result<()> {
        self.p.shutdown(self.live()?, how)
    }
    /// See [`Provider::setsockopt`] (an int value).
    ///
    /// # Errors
    /// As there.
    pub fn set_option(&self, level: i32, name: i32, v: i32) -> Result<()> {
        self.p
            .setsockopt(self.live()?, level, name, &v.to_ne_bytes())
    }
    /// An option's value (see [`Provider::getsockopt`]).
    ///
    /// # Errors
    /// As there.
    pub fn option(&self, level: i32, name: i32) -> Result<i32> {
        self.p.getsockopt(self.live()?, level, name)
    }
    /// See [`Provider::local_addr`].
    ///
    /// # Errors
    /// As there.
    pub fn local_addr(&self) -> Result<SocketAddrV4> {
        self.p.local_addr(self.live()?)
    }
    /// SO_LINGER: `on` with 0 seconds makes the close reset the connection.
    ///
    /// # Errors
    /// As [`Provider::setsockopt`].
    pub fn set_linger(&self, on: bool, secs: i32) -> Result<()> {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&i32::from(on).to_ne_bytes());
        v[4..].copy_from_slice(&secs.to_ne_bytes());
        self.p
            .setsockopt(self.live()?, libc::SOL_SOCKET, libc::SO_LINGER, &v)
    }
    /// See [`Provider::deferred`].
    ///
    /// # Errors
    /// As there.
    pub fn deferred(&self) -> Result<bool> {
        self.p.deferred(self.live()?)
    }
    /// See [`Provider::report_accepted_waiting`].
    ///
    /// # Errors
    /// As there.
    pub fn report_accepted_waiting(&self, n: usize) -> Result<()> {
        self.p.report_accepted_waiting(self.live()?, n)
    }
    /// See [`Provider::connect`].
    ///
    /// # Errors
    /// As there.
    pub fn connect(&self, dst: SocketAddrV4) -> Result<()> {
        self.p.connect(self.live()?, dst)
    }
}

impl SanSocket {
    /// See [`Provider::stream_info`].
    pub fn stream_info(&self) -> Option<crate::StreamInfo> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.p.stream_info(self.s)
    }
    /// See [`Provider::urgent_pending`].
    pub fn urgent_pending(&self) -> bool {
        self.p.urgent_pending(self.s)
    }
    /// See [`Provider::set_oob_inline`].
    pub fn set_oob_inline(&self, on: bool) {
        self.p.set_oob_inline(self.s, on);
    }
    /// See [`Provider::readiness`].
    pub fn readiness(&self, read: bool, write: bool) -> crate::Readiness {
        if self.closed.load(Ordering::Acquire) {
            return crate::Readiness::default();
        }
        self.p.readiness(self.s, read, write)
    }
    /// See [`Provider::set_takeover`].
    ///
    /// # Errors
    /// As there.
    pub fn set_takeover(&self, ppid: u32) -> Result<()> {
        self.p.set_takeover(self.live()?, ppid)
    }
    /// SO_REUSEPORT (see [`Provider::setsockopt`]).
    ///
    /// # Errors
    /// As there.
    pub fn set_reuse_port(&self, on: bool) -> Result<()> {
        self.p.setsockopt(
            self.live()?,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            &i32::from(on).to_ne_bytes(),
        )
    }
    /// See [`Provider::event_select_with`].
    ///
    /// # Errors
    /// As there.
    pub fn event_select_with(
        &self,
        efd: std::os::fd::BorrowedFd<'_>,
        wfd: std::os::fd::BorrowedFd<'_>,
        mask: u32,
    ) -> Result<()> {
        self.p
            .event_select_with(self.live()?, efd.as_raw_fd(), Some(wfd.as_raw_fd()), mask)
    }
    /// See [`Provider::event_select_write`].
    ///
    /// # Errors
    /// As there.
    pub fn event_select_write(&self, wfd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.p.event_select_write(self.live()?, wfd.as_raw_fd())
    }
    /// Whether the daemon behind this socket is still there.
    pub fn daemon_alive(&self) -> bool {
        self.p.daemon_alive()
    }
    /// Closes the socket now, from any thread: a call blocked on it (a
    /// connect, an accept) returns EINTR at once. Dropping it later is harmless.
    pub fn abort(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.p.close(self.s);
        }
    }
}

impl Drop for SanSocket {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.p.close(self.s);
        }
        self.p.io[self.s as usize].unpin();
    }
}
