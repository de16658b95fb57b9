#![allow(unsafe_code)] // socket system calls and epoll: each block with a SAFETY comment
use dsan_channel::region::effective_backlog;
use dsan_channel::sys::{drain_eventfd, signal_eventfd, signal_eventfd_if_quiet, EventFd};
use dsan_channel::wake;
use dsan_provider::{
    Decision, Error as SanError, Provider, SanSocket, FD_ACCEPT, FD_CLOSE, FD_READ, FD_WRITE,
    MSG_PEEK,
};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

/// Which provider serves a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Kernel TCP/IP.
    Tcp = 1,
    /// The SAN.
    San = 2,
}

/// The application's decision on a SAN connection request (run on the
/// switch's accept thread, as WSD's switch does).
pub type Condition = Box<dyn FnMut(SocketAddrV4) -> Decision + Send>;

struct Listen {
    san: Option<(SanSocket, OwnedFd)>,
    cond: Option<Condition>,
    /// SAN connections accepted by the accept thread, waiting for `accept`:
    /// at most `backlog` (WSD's switch accepts on the application's behalf,
    /// within its backlog; beyond it requests wait in the provider's backlog,
    /// of the same size, and what finds that full is refused at once).
    pending: VecDeque<(SanSocket, SocketAddrV4)>,
    /// The listen backlog, as the provider clamps it.
    backlog: usize,
    /// Its SAN side failed and the daemon was told (told once per failure
    /// run: the accept thread retries every second).
    san_failure_reported: bool,
    /// The FD_ACCEPT descriptor in `san` is a wake socket (see
    /// [`accept_descriptor`]), else an eventfd.
    accept_wake: bool,
}

impl Listen {
    /// Signals the FD_ACCEPT descriptor (the accept thread looks again).
    fn signal_accept(&self) {
        if let Some((_, efd)) = &self.san {
            if self.accept_wake {
                wake::post(efd.as_raw_fd());
            } else {
                signal_eventfd(efd.as_raw_fd());
            }
        }
    }

    /// Clears the FD_ACCEPT descriptor.
    fn drain_accept(&self) {
        if let Some((_, efd)) = &self.san {
            if self.accept_wake {
                wake::drain(efd.as_raw_fd());
            } else {
                drain_eventfd(efd.as_raw_fd());
            }
        }
    }
}

/// Whether FD_ACCEPT descriptors are wake sockets, which the daemon's lcore
/// signals itself, whatever the process's readiness mode: a connect's
/// request then reaches the accept thread with no notifier thread in
/// between (the largest hop of a SAN connect). `DSAN_ACCEPT_WAKE=eventfd`
/// makes them eventfds as in the eventfd mode (for comparison).
fn accept_wakes() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DSAN_ACCEPT_WAKE").is_none_or(|v| v != "eventfd"))
}

/// A listener's FD_ACCEPT descriptor: a wake socket (see [`accept_wakes`];
/// an eventfd if it cannot be made), with whether it is one.
fn accept_descriptor() -> Result<(OwnedFd, bool), i32> {
    if accept_wakes() {
        if let Ok(w) = wake::new(true, true) {
            return Ok((high(w), true));
        }
    }
    EventFd::new()
        .map(OwnedFd::from)
        .map(high)
        .map(|e| (e, false))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))
}

/// One socket of the application: what the switch keeps of it (its
/// descriptor, kernel TCP side, listener, connection) and, for an
/// interposing library, the program's side ([`Socket::app`]).
pub struct Socket {
    /// What the program sees of the socket (see [`crate::app`]).
    pub app: crate::app::App,
    /// The switch's number for it: `epfd`'s, or a lean socket's `face`
    /// (-1 for a record no switch socket serves yet, see [`crate::app::kept`]).
    number: std::sync::atomic::AtomicI32,
    /// The switch's descriptor: an epoll instance over whatever says the
    /// socket is readable (its kernel socket, readiness eventfds). None for
    /// a lean socket (see `face`).
    epfd: Option<OwnedFd>,
    /// A lean socket's descriptor: a number of the program's own (an
    /// interposing library's program descriptor, see [`adopt_lean`] and
    /// [`accept_lean`]) that is an eventfd readable exactly while the
    /// connection has bytes or the end of the stream to read, or a
    /// nonblocking connect's outcome to report: the socket costs the
    /// process that one descriptor. The switch touches it only under this
    /// lock and never once it is -1 (released: the program closes the
    /// number itself). -1 for other sockets.
    face: Mutex<RawFd>,
    /// The kernel TCP socket, created on first need (bind, listen, a TCP
    /// connect), so that a SAN connect costs no kernel socket.
    tcp: Mutex<Option<OwnedFd>>,
    /// Signalled when `pending` gains a connection (watched by `epfd`);
    /// created at listen.
    ready: OnceLock<OwnedFd>,
    bound: Mutex<Option<SocketAddrV4>>,
    listen: Mutex<Option<Listen>>,
    /// Set when connected or accepted.
    conn: Mutex<Option<Conn>>,
    /// A nonblocking connect in progress (or finished, not yet reported).
    pending: Mutex<Option<Arc<Pending>>>,
    /// Its outcome: 0 or an errno, until `error` reports it.
    error: std::sync::atomic::AtomicI32,
    /// No fallback to kernel TCP: a SAN connect that cannot be made fails.
    san_only: std::sync::atomic::AtomicBool,
    /// 0, or the parent pid whose SAN listener `listen` takes over.
    takeover: std::sync::atomic::AtomicU32,
    /// Signalled when a nonblocking connect finishes (in `epfd`: the
    /// descriptor polls readable); drained when the outcome is reported.
    connect_efd: OnceLock<OwnedFd>,
    /// A SAN connection's life, made before the process first forks with
    /// it: the write end of a pipe whose read end the daemon holds. Every
    /// process that inherits the socket inherits this too, so the daemon
    /// learns from the kernel when the last holder is gone (a child may
    /// claim the connection until then; see [`claim_inherited`]).
    life: Mutex<Option<OwnedFd>>,
    /// SO_LINGER {1, 0} set for it (see [`set_linger_abort`]): its close
    /// resets the connection.
    abort_on_close: std::sync::atomic::AtomicBool,
}

/// A nonblocking connect, run on a thread of its own.
struct Pending {
    /// The application closed the descriptor: give up.
    cancel: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicBool,
    /// The SAN attempt's socket, so that a close can abort it at once.
    san: Mutex<Option<Arc<SanSocket>>>,
}

/// A connected switch socket's provider side.
struct Conn {
    transport: Transport,
    /// The SAN connection (shared with calls in progress, which do not hold
    /// the lock while they wait).
    san: Option<Arc<SanSocket>>,
    /// Written by the provider on FD_READ / FD_CLOSE; in the descriptor's
    /// epoll set, so the switch descriptor is readable when bytes or the end
    /// of the stream are there. Made by the registration thread
    /// [`REGISTER_AFTER`] after the connection (a connection closed sooner
    /// costs no descriptor and no system call for it).
    /// (Shared with the registration thread: the provider keeps the
    /// number of the descriptor it registers, so that one stays open as
    /// long as the connection.)
    efd: OnceLock<Arc<OwnedFd>>,
    /// Signalled while a send would not block (see [`watch_writable`]);
    /// made on request.
    wfd: OnceLock<Arc<OwnedFd>>,
    /// `wfd` went to the daemon (with the event descriptor when it was
    /// made before that registration ran: one request for both).
    wfd_registered: std::sync::atomic::AtomicBool,
}

/// The socket is now SAN connection `ss`.
fn set_san(s: &Arc<Socket>, ss: Arc<SanSocket>) -> Result<(), i32> {
    // The FD_WRITE descriptor too, when every connection gets one: a new
    // connection's send ring is empty, so it starts out writable.
    let wfd = OnceLock::new();
    if WATCH_WRITABLE.load(Ordering::Relaxed) {
        let w = Arc::new(eventfd()?);
        signal(w.as_raw_fd());
        let _ = wfd.set(w);
    }
    // The readiness eventfd is made, put in the descriptor's epoll set and
    // registered with the daemon (a control-socket round trip) on the
    // switch's registration thread, so that connect and accept return at
    // once. Nothing is lost meanwhile: the registration posts FD_READ at
    // once if bytes arrived before it.
    // (Weak references: a connection closed before its turn is skipped and
    // holds no provider socket meanwhile.)
    let job = Registration {
        ss: Arc::downgrade(&ss),
        sock: Arc::downgrade(s),
        fd: None,
        due: std::time::Instant::now() + REGISTER_AFTER,
    };
    *s.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Conn {
        transport: Transport::San,
        san: Some(ss),
        efd: OnceLock::new(),
        wfd,
        wfd_registered: std::sync::atomic::AtomicBool::new(false),
    });
    queue_registration(job);
    Ok(())
}

impl Socket {
    /// The socket is now a kernel TCP connection (its socket in the epoll
    /// set: readable when the kernel socket is).
    fn set_tcp(&self) -> Result<(), i32> {
        let tcp = self.tcp_fd()?;
        // (A lean socket's caller waits on the kernel socket itself.)
        if let Some(ep) = &self.epfd {
            epoll_add(ep.as_raw_fd(), tcp, 0)?;
        }
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Conn {
            transport: Transport::Tcp,
            san: None,
            efd: OnceLock::new(),
            wfd: OnceLock::new(),
            wfd_registered: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(())
    }
}

enum Entry {
    Socket(Arc<Socket>),
    /// An accepted kernel TCP connection: the descriptor is the TCP socket
    /// (held here so that closing the entry closes it).
    Tcp(#[allow(dead_code)] OwnedFd),
}

impl Socket {
    fn tcp_fd(&self) -> Result<RawFd, i32> {
        let mut t = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            // SAFETY: plain system call.
            *t = Some(owned(unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
            })?);
        }
        Ok(t.as_ref().expect("just set").as_raw_fd())
    }

    /// Whether SO_LINGER {1, 0} was set ([`set_linger_abort`], or on the
    /// kernel socket when there is one).
    fn linger_abort(&self) -> bool {
        if self.abort_on_close.load(Ordering::Relaxed) {
            return true;
        }
        let t = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = t.as_ref() else {
            return false;
        };
        let mut l = libc::linger {
            l_onoff: 0,
            l_linger: 0,
        };
        let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
        // SAFETY: a valid socket and out-buffers of the given length.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&mut l as *mut libc::linger).cast(),
                &mut len,
            )
        };
        r == 0 && l.l_onoff != 0 && l.l_linger == 0
    }

    fn ready_fd(&self) -> Option<RawFd> {
        self.ready.get().map(AsRawFd::as_raw_fd)
    }

    /// The epoll instance of a socket that is not lean.
    fn ep(&self) -> Result<RawFd, i32> {
        self.epfd
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .ok_or(libc::EINVAL)
    }

    fn is_lean(&self) -> bool {
        self.epfd.is_none()
    }

    /// Runs `f` on the eventfd that says "readable" for this connection
    /// (a lean socket's descriptor, else the connection's registered event
    /// descriptor), if there is one: under the lean socket's lock, so that
    /// the program's close of that number never races a signal or a drain
    /// (drains are serialized too: the descriptor may be blocking).
    fn with_readable<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        if self.is_lean() {
            return self.with_face(f);
        }
        let efd = {
            let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            c.as_ref().and_then(|c| c.efd.get().cloned())
        };
        efd.map(|e| f(e.as_raw_fd()))
    }

    /// Runs `f` on the descriptor a nonblocking connect's outcome is
    /// signalled on (a lean socket's descriptor, else `connect_efd`).
    fn with_connect_fd<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        if self.is_lean() {
            return self.with_face(f);
        }
        self.connect_efd.get().map(|e| f(e.as_raw_fd()))
    }

    /// Runs `f` on a lean socket's descriptor under its lock, unless it
    /// was released.
    fn with_face<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        let face = self.face.lock().unwrap_or_else(|e| e.into_inner());
        (*face >= 0).then(|| f(*face))
    }

    /// A nonblocking connect's outcome is being reported: its signal is
    /// cleared. A lean socket's descriptor also says "readable", so a SAN
    /// connection with bytes or the end of the stream there already stays
    /// readable.
    fn clear_connect_signal(&self) {
        let san = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| c.san.clone());
        let input = || self.is_lean() && san.as_ref().is_some_and(|ss| has_input(ss));
        if input() {
            return;
        }
        self.with_connect_fd(|fd| {
            drain(fd);
            if input() {
                signal(fd);
            }
        });
    }
}

/// Whether a receive on `ss` would not block (bytes, the end of the
/// stream, or an error to report).
fn has_input(ss: &SanSocket) -> bool {
    let mut one = [0u8; 1];
    !matches!(
        ss.recv_mode(&mut one, MSG_PEEK, false),
        Err(SanError::Again)
    ) || ss.urgent_pending()
}

/// Work for the registration thread, due at `due`.
struct Registration {
    ss: std::sync::Weak<SanSocket>,
    /// The switch socket the SAN connection serves.
    sock: std::sync::Weak<Socket>,
    /// None: the connection is new: make its event descriptor (a lean
    /// socket's is its own descriptor), put it in the socket's epoll set
    /// and register it with the daemon (with its FD_WRITE descriptor in the
    /// same request, when that was made meanwhile). Some: the connection's
    /// FD_WRITE descriptor, made later (registered after its event
    /// descriptor, which was queued first, unless that took it along).
    fd: Option<Arc<OwnedFd>>,
    due: std::time::Instant,
}

/// The registration thread's work, in the order it falls due (every job
/// is due [`REGISTER_AFTER`] after it is queued).
static REGISTRATIONS: Mutex<std::collections::VecDeque<Registration>> =
    Mutex::new(std::collections::VecDeque::new());
/// Held by the registration thread while it does a registration (which
/// locks the connection's record) and by a forking thread across the fork,
/// so that a child never inherits a record locked by a thread it does not
/// have (and could then never claim that connection).
static REGISTERING: Mutex<()> = Mutex::new(());

/// Wakes the registration thread when its queue gains a first job.
static REGISTRATIONS_CV: std::sync::Condvar = std::sync::Condvar::new();

/// Queues a registration. The thread is woken only when the queue was
/// empty: otherwise it sleeps until the head's due time, which is earlier
/// than the new job's, so a busy process makes no wake-up per connection.
fn queue_registration(job: Registration) {
    let mut q = REGISTRATIONS.lock().unwrap_or_else(|e| e.into_inner());
    let first = q.is_empty();
    q.push_back(job);
    drop(q);
    if first {
        REGISTRATIONS_CV.notify_one();
    }
}

/// The registration thread: each job at its due time.
fn registration_thread() {
    let mut q = REGISTRATIONS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let Some(due) = q.front().map(|j| j.due) else {
            q = REGISTRATIONS_CV.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let wait = due.saturating_duration_since(std::time::Instant::now());
        if !wait.is_zero() {
            q = REGISTRATIONS_CV
                .wait_timeout(q, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let job = q.pop_front().expect("looked");
        drop(q);
        {
            let _busy = REGISTERING.lock().unwrap_or_else(|e| e.into_inner());
            register(job);
        }
        q = REGISTRATIONS.lock().unwrap_or_else(|e| e.into_inner());
    }
}

/// Does a registration (on the registration thread).
fn register(job: Registration) {
    // A connection closed meanwhile is gone: nothing to do.
    let Some(ss) = job.ss.upgrade() else {
        return;
    };
    let Some(sock) = job.sock.upgrade() else {
        return;
    };
    if let Some(w) = &job.fd {
        // (Registered already with its connection's event descriptor?)
        let done = sock
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|c| c.wfd_registered.swap(true, Ordering::AcqRel));
        if !done {
            let _ = ss.event_select_write(w.as_fd());
        }
        return;
    }
    // The FD_WRITE descriptor goes in the same request when it exists by now.
    let wfd = {
        let c = sock.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref().and_then(|c| {
            let w = c.wfd.get().cloned()?;
            (!c.wfd_registered.swap(true, Ordering::AcqRel)).then_some(w)
        })
    };
    if sock.is_lean() {
        // The socket's own descriptor is the event descriptor: readable
        // already if bytes came first, then registered (under its lock,
        // so that the number is the socket's while it is sent).
        let has = has_input(&ss);
        sock.with_readable(|face| {
            if has {
                signal_if_quiet(face);
            }
            // SAFETY: the lean socket's descriptor, open while its lock is held.
            let face = unsafe { std::os::fd::BorrowedFd::borrow_raw(face) };
            let _ = match &wfd {
                Some(w) => ss.event_select_with(face, w.as_fd(), FD_READ | FD_CLOSE | FD_WRITE),
                None => ss.event_select(face, FD_READ | FD_CLOSE),
            };
        });
        return;
    }
    // (Out of descriptors: the connection works, its descriptor never polls
    // readable; recv and send still do.)
    let Ok(efd) = eventfd() else {
        return;
    };
    let efd = Arc::new(efd);
    {
        let c = sock.conn.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_ref() {
            Some(conn) if conn.efd.set(efd.clone()).is_ok() => {}
            _ => return,
        }
    }
    if let Ok(ep) = sock.ep() {
        let _ = epoll_add(ep, efd.as_raw_fd(), 0);
    }
    // Readable already (the end of the stream after a SHUT_RD; bytes are
    // posted by the registration too).
    if has_input(&ss) {
        signal_if_quiet(efd.as_raw_fd());
    }
    let _ = match &wfd {
        Some(w) => ss.event_select_with(efd.as_fd(), w.as_fd(), FD_READ | FD_CLOSE | FD_WRITE),
        None => ss.event_select(efd.as_fd(), FD_READ | FD_CLOSE),
    };
}

/// Every new SAN connection gets its FD_WRITE descriptor at once (see
/// [`set_watch_writable`]).
static WATCH_WRITABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `on`, every SAN connection made from now on gets the eventfd
/// [`watch_writable`] returns when it is set up, registered with its event
/// descriptor in one request: for callers that poll every connection for
/// "writable" (an interposing library).
pub fn set_watch_writable(on: bool) {
    WATCH_WRITABLE.store(on, Ordering::Relaxed);
}

/// How long a new SAN connection's readiness registration waits: a
/// connection closed sooner (connect, a request, close) never costs the
/// control-socket round trip; one that lives on polls readable at most this
/// much later for bytes that came before (its registration posts them).
const REGISTER_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

struct Global {
    table: std::sync::RwLock<HashMap<RawFd, Entry>>,
    provider: Mutex<Option<Arc<Provider>>>,
    /// The accept thread's epoll (SAN listeners' FD_ACCEPT eventfds).
    accept_ep: std::sync::atomic::AtomicI32,
    /// In a forked child: the kernel TCP sockets of the listeners the parent
    /// had (by switch descriptor), for [`relisten`].
    inherited_listeners: Mutex<HashMap<RawFd, RawFd>>,
    /// In a forked child: the parent's connected sockets (by switch
    /// descriptor), for [`claim_inherited`]. Never dropped here (their SAN
    /// sockets are the parent's attachment's).
    inherited_conns: Mutex<HashMap<RawFd, Arc<Socket>>>,
}

/// Set in a forked child (pthread_atfork): the switch's threads, provider
/// and accept epoll are the parent's and are made again on first use.
static FORKED_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

type ForkGuards = (
    std::sync::MutexGuard<'static, ()>,
    std::sync::RwLockWriteGuard<'static, HashMap<RawFd, Entry>>,
    std::sync::MutexGuard<'static, Option<Arc<Provider>>>,
    std::sync::MutexGuard<'static, std::collections::VecDeque<Registration>>,
);

thread_local! {
    /// The switch's locks, held by the forking thread across fork, so that
    /// the child never finds one held by a thread it does not have.
    static FORK_GUARDS: std::cell::RefCell<Option<ForkGuards>> =
        const { std::cell::RefCell::new(None) };
}

/// An interposing library's own locks, taken before the switch's when a
/// process forks (its code calls the switch while holding them, never the
/// other way round) and released after them: (prepare, release).
static FORK_HOOKS: OnceLock<ForkHooks> = OnceLock::new();

/// (prepare, release).
type ForkHooks = (fn(), fn());

/// Sets the functions that take (`prepare`) and release (`release`) the
/// caller's own locks around a fork, in the switch's fork handlers: so that a
/// forked child never finds a lock held by a thread it does not have. Set
/// once; later calls change nothing.
pub fn set_fork_hooks(prepare: fn(), release: fn()) {
    let _ = FORK_HOOKS.set((prepare, release));
}

/// Before a fork: every SAN connection of this process that has no life
/// yet gets one (see [`Socket::life`]), so that the child inherits it and the
/// connection outlives the parent's close while the child holds it. One
/// control-socket request per connection, the first time it is forked with.
fn register_lives(g: &Global) {
    if FORKED_CHILD.load(Ordering::Relaxed) {
        return; // the table is the parent's
    }
    let socks: Vec<Arc<Socket>> = g
        .table
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter_map(|e| match e {
            Entry::Socket(s) => Some(s.clone()),
            Entry::Tcp(_) => None,
        })
        .collect();
    for s in socks {
        let _ = give_life(&s);
    }
}

/// Socket `s`'s SAN connection gets a life if it has none yet (one
/// control-socket request); the write end's number (the socket keeps it),
/// or None for a socket without a SAN connection or when the daemon
/// refused (its errno then).
fn give_life(s: &Socket) -> Result<Option<RawFd>, i32> {
    let mut life = s.life.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(w) = life.as_ref() {
        return Ok(Some(w.as_raw_fd()));
    }
    let ss = {
        let c = s.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref().and_then(|c| c.san.clone())
    };
    let Some(ss) = ss else {
        return Ok(None);
    };
    let (r, w) =
        dsan_channel::sys::pipe_cloexec().map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))?;
    ss.register_life(r.as_raw_fd()).map_err(|e| e.errno())?;
    let raw = w.as_raw_fd();
    *life = Some(w);
    Ok(Some(raw))
}

/// What goes beside switch socket `fd` when the program sends it to
/// another process (or to itself) in an `SCM_RIGHTS` message: the write end
/// of its connection's life (made now if it has none; the socket keeps it,
/// so the number is valid while `fd` is) and its ticket
/// ([`ClaimTicket::to_bytes`](dsan_provider::ClaimTicket::to_bytes)). The receiver claims the connection with
/// them ([`claim_passed`]); the life keeps the connection while the
/// message is in flight, also when the sender closes `fd` at once. None
/// for a socket with no SAN connection (a kernel TCP one travels as the
/// kernel socket it is).
///
/// # Errors
/// ENOTSOCK; the daemon's (EMFILE: the user's share of event descriptors).
pub fn pass_ticket(fd: RawFd) -> Result<Option<(RawFd, [u8; dsan_provider::TICKET_BYTES])>, i32> {
    let s = sock(fd)?;
    let ss = {
        let c = s.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .filter(|c| c.transport == Transport::San)
            .and_then(|c| c.san.clone())
    };
    let Some(ss) = ss else {
        return Ok(None);
    };
    let ticket = ss.claim_ticket().map_err(|e| e.errno())?.to_bytes();
    Ok(give_life(&s)?.map(|w| (w, ticket)))
}

/// The switch socket of this process that serves a SAN connection received
/// in an `SCM_RIGHTS` message, with the `life` and `ticket` that came with
/// it ([`pass_ticket`]): the daemon names the connection to the holder of
/// its life, and its rings move to a socket of this process's attachment
/// (the sender's socket still holds it, as both hold a passed TCP socket;
/// see `docs/architecture.md`, "Sockets shared across fork"). The socket
/// keeps the life.
///
/// # Errors
/// EINVAL (a ticket that does not parse), ENETDOWN without a daemon, the
/// claim's errno (ENOTCONN: the connection ended; EACCES: another user's;
/// EMFILE).
pub fn claim_passed(life: OwnedFd, ticket: &[u8]) -> Result<RawFd, i32> {
    let t = dsan_provider::ClaimTicket::from_bytes(ticket).ok_or(libc::EINVAL)?;
    let p = provider().ok_or(libc::ENETDOWN)?;
    let mine = SanSocket::claim_by_life(&p, life.as_raw_fd(), &t).map_err(|e| e.errno())?;
    let nfd = socket()?;
    let ns = sock(nfd)?;
    // SAFETY: F_SETFD on a descriptor we own: the life is this process's
    // own, never the program's.
    unsafe { libc::fcntl(life.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    *ns.life.lock().unwrap_or_else(|e| e.into_inner()) = Some(life);
    if let Err(e) = set_san(&ns, Arc::new(mine)) {
        let _ = close(nfd);
        return Err(e);
    }
    Ok(nfd)
}

extern "C" fn on_fork_prepare() {
    let Some(g) = GLOBAL.get() else {
        return;
    };
    register_lives(g);
    let registering = REGISTERING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((prepare, _)) = FORK_HOOKS.get() {
        prepare();
    }
    let guards = (
        registering,
        g.table.write().unwrap_or_else(|e| e.into_inner()),
        g.provider.lock().unwrap_or_else(|e| e.into_inner()),
        REGISTRATIONS.lock().unwrap_or_else(|e| e.into_inner()),
    );
    let _ = FORK_GUARDS.try_with(|c| *c.borrow_mut() = Some(guards));
}

extern "C" fn on_fork_parent() {
    if GLOBAL.get().is_none() {
        return;
    }
    let _ = FORK_GUARDS.try_with(|c| c.borrow_mut().take());
    if let Some((_, release)) = FORK_HOOKS.get() {
        release();
    }
}

extern "C" fn on_fork_child() {
    if GLOBAL.get().is_none() {
        return;
    }
    let _ = FORK_GUARDS.try_with(|c| c.borrow_mut().take());
    if let Some((_, release)) = FORK_HOOKS.get() {
        release();
    }
    FORKED_CHILD.store(true, Ordering::Relaxed);
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

/// Starts the switch's threads for this process: the accept thread on a
/// new epoll instance, and the registration thread; returns the epoll.
fn start_threads() -> OwnedFd {
    let ep = epoll_create().expect("epoll_create1");
    let accept_ep_raw = ep.as_raw_fd();
    std::thread::Builder::new()
        .name("dsan-switch-accept".into())
        .spawn(move || {
            thread_hook();
            accept_thread(accept_ep_raw)
        })
        .expect("spawning the switch's accept thread");
    std::thread::Builder::new()
        .name("dsan-switch-register".into())
        .spawn(move || {
            thread_hook();
            registration_thread()
        })
        .expect("spawning the switch's registration thread");
    ep
}

fn g() -> &'static Global {
    let g = GLOBAL.get_or_init(|| {
        // SAFETY: registering handlers that take and release the switch's
        // own locks and store to an atomic.
        unsafe {
            libc::pthread_atfork(
                Some(on_fork_prepare),
                Some(on_fork_parent),
                Some(on_fork_child),
            )
        };
        let ep = start_threads();
        Global {
            table: std::sync::RwLock::new(HashMap::new()),
            provider: Mutex::new(None),
            accept_ep: std::sync::atomic::AtomicI32::new(std::os::fd::IntoRawFd::into_raw_fd(ep)),
            inherited_listeners: Mutex::new(HashMap::new()),
            inherited_conns: Mutex::new(HashMap::new()),
        }
    });
    if FORKED_CHILD.load(Ordering::Relaxed) {
        after_fork(g);
    }
    g
}

/// In a forked child, on first use: the parent's sockets are set aside
/// (never used or closed here: their SAN sockets belong to the parent's
/// attachment, whose command ring only the parent may write), and the
/// child gets threads, an accept epoll and (on first need) a daemon
/// attachment of its own.
fn after_fork(g: &'static Global) {
    static ONCE: Mutex<()> = Mutex::new(());
    let _one = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if !FORKED_CHILD.swap(false, Ordering::AcqRel) {
        return;
    }
    let old: HashMap<RawFd, Entry> =
        std::mem::take(&mut *g.table.write().unwrap_or_else(|e| e.into_inner()));
    {
        let mut inh = g
            .inherited_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inh.clear();
        for (fd, e) in &old {
            if let Entry::Socket(s) = e {
                let listening = s.listen.try_lock().map(|l| l.is_some()).unwrap_or(false);
                let tcp = s
                    .tcp
                    .try_lock()
                    .ok()
                    .and_then(|t| t.as_ref().map(AsRawFd::as_raw_fd));
                if let (true, Some(t)) = (listening, tcp) {
                    inh.insert(*fd, t);
                }
            }
        }
        let mut conns = g.inherited_conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.clear();
        for (fd, e) in &old {
            if let Entry::Socket(s) = e {
                if s.conn.try_lock().is_ok_and(|c| c.is_some()) {
                    conns.insert(*fd, s.clone());
                }
            }
        }
    }
    std::mem::forget(old);
    // The parent's attachment: never dropped here (its drop would talk to
    // the daemon on the parent's behalf).
    std::mem::forget(g.provider.lock().unwrap_or_else(|e| e.into_inner()).take());
    // The parent's registrations are the parent's business (forgotten, as
    // its sockets are: nothing of theirs is closed here).
    std::mem::forget(std::mem::take(
        &mut *REGISTRATIONS.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let ep = start_threads();
    g.accept_ep
        .store(std::os::fd::IntoRawFd::into_raw_fd(ep), Ordering::Release);
}

/// What a forked child serves a connection of its parent's through
/// ([`claim_inherited`]).
#[derive(Debug)]
pub enum Inherited {
    /// A switch socket of the child's own, serving the SAN connection.
    San(RawFd),
    /// The kernel TCP connection itself (a plain kernel socket from now on).
    Tcp(OwnedFd),
}

/// In a forked child: takes over the connection that the parent's switch
/// socket `fd` (a descriptor the child inherited) is, so that the child
/// can use it. A SAN connection is claimed from the daemon with the claim
/// key the child reads in the parent's region (which it inherited mapped):
/// the connection's rings move to a socket of the child's attachment, and
/// the parent's socket keeps holding it (see `docs/architecture.md`,
/// "Sockets shared across fork"); a kernel TCP connection is simply the
/// kernel socket. The child's copies of the parent's other descriptors for
/// it are closed. `None` if `fd` was not a connection of the parent.
///
/// # Errors
/// ENETDOWN without a daemon; the claim's errno (ENOTCONN: the connection
/// ended; EMFILE).
pub fn claim_inherited(fd: RawFd) -> Result<Option<Inherited>, i32> {
    let Some(s) = g()
        .inherited_conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&fd)
        .cloned()
    else {
        return Ok(None);
    };
    let (transport, ss, efds) = {
        let c = s.conn.try_lock().map_err(|_| libc::EAGAIN)?;
        let Some(c) = c.as_ref() else {
            return Ok(None);
        };
        let efds: Vec<RawFd> = [c.efd.get(), c.wfd.get()]
            .into_iter()
            .flatten()
            .map(|f| f.as_raw_fd())
            .collect();
        (c.transport, c.san.clone(), efds)
    };
    let tcp_raw = s
        .tcp
        .try_lock()
        .ok()
        .and_then(|t| t.as_ref().map(AsRawFd::as_raw_fd));
    let made = match (transport, ss) {
        (Transport::San, Some(ss)) => {
            let ticket = ss.claim_ticket().map_err(|e| e.errno())?;
            drop(ss);
            let p = provider().ok_or(libc::ENETDOWN)?;
            let mine = SanSocket::claim(&p, &ticket).map_err(|e| e.errno())?;
            let nfd = socket()?;
            let ns = sock(nfd)?;
            if let Some(t) = tcp_raw {
                // SAFETY: the child's copy of the parent's kernel socket,
                // moved out of a record that is never dropped nor used again.
                *ns.tcp.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(unsafe { OwnedFd::from_raw_fd(t) });
            }
            *ns.bound.lock().unwrap_or_else(|e| e.into_inner()) =
                s.bound.try_lock().ok().and_then(|b| *b);
            if let Some(w) = s
                .life
                .try_lock()
                .ok()
                .and_then(|l| l.as_ref().map(AsRawFd::as_raw_fd))
            {
                // SAFETY: the child's copy of the life, moved out of a
                // record that is never dropped nor used again.
                *ns.life.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(unsafe { OwnedFd::from_raw_fd(w) });
            }
            set_san(&ns, Arc::new(mine))?;
            Inherited::San(nfd)
        }
        (Transport::Tcp, _) => {
            let t = tcp_raw.ok_or(libc::ENOTCONN)?;
            // SAFETY: as above.
            Inherited::Tcp(unsafe { OwnedFd::from_raw_fd(t) })
        }
        (Transport::San, None) => return Ok(None),
    };
    g().inherited_conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd);
    // The child's copies of the parent's epoll and event descriptors: the
    // record that names them is forgotten (never dropped), so they are
    // closed here, once.
    for f in efds
        .into_iter()
        .chain(s.epfd.as_ref().map(AsRawFd::as_raw_fd))
    {
        // SAFETY: descriptors of this process that nothing else uses.
        unsafe { libc::close(f) };
    }
    Ok(Some(made))
}

/// In a forked child: the program closed its copy of the parent's
/// connection on switch descriptor `fd` without using it; the child's
/// copies of the parent's descriptors for it (the life among them) are
/// closed, so that the connection ends when the parent closes it too (as a
/// TCP socket does once every process closed it). Nothing for another
/// descriptor.
pub fn release_inherited(fd: RawFd) {
    let Some(s) = g()
        .inherited_conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd)
    else {
        return;
    };
    let mut copies: Vec<RawFd> = s.epfd.iter().map(AsRawFd::as_raw_fd).collect();
    if let Ok(c) = s.conn.try_lock() {
        if let Some(c) = c.as_ref() {
            copies.extend(
                [c.efd.get(), c.wfd.get()]
                    .into_iter()
                    .flatten()
                    .map(|f| f.as_raw_fd()),
            );
        }
    }
    for m in [&s.life, &s.tcp] {
        if let Ok(l) = m.try_lock() {
            copies.extend(l.as_ref().map(AsRawFd::as_raw_fd));
        }
    }
    for f in copies {
        // SAFETY: the child's copies; the record that names them is
        // forgotten (never dropped nor used again), so each closes once.
        unsafe { libc::close(f) };
    }
}

/// The accept thread's epoll of this process.
fn accept_ep() -> RawFd {
    g().accept_ep.load(Ordering::Acquire)
}

/// In a forked child: the kernel TCP socket of the parent's listener `fd`
/// (a switch descriptor the child inherited), to listen on again with
/// [`adopt`] and [`set_takeover`] in the child. None if `fd` was not a
/// listener of the parent.
pub fn inherited_listener(fd: RawFd) -> Option<RawFd> {
    let _ = g();
    g().inherited_listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&fd)
        .copied()
}

/// An int socket option of `fd`.
fn int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Result<libc::c_int, i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a socket and out-buffers of the given length.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cvt(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_int) -> Result<OwnedFd, i32> {
    // SAFETY: a fresh descriptor returned by the kernel, owned by nobody else.
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_create() -> Result<OwnedFd, i32> {
    // SAFETY: plain system call.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(high)
}

/// Where the switch's own descriptors go (0: wherever the kernel puts them).
static FD_BASE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Puts the switch's own descriptors (epoll instances, eventfds) at `base`
/// or above, so that a program's own descriptor numbers stay as low as
/// they would be without the switch (programs size tables by them, and
/// select stops at FD_SETSIZE). 0 (the default) leaves them where the
/// kernel puts them.
pub fn set_fd_base(base: i32) {
    FD_BASE.store(base.max(0), Ordering::Relaxed);
    wake::set_fd_base(base);
}

/// `fd` moved to the base [`set_fd_base`] gave, or above (as it is if that fails).
pub fn high(fd: OwnedFd) -> OwnedFd {
    let base = FD_BASE.load(Ordering::Relaxed);
    if base == 0 || fd.as_raw_fd() >= base {
        return fd;
    }
    // SAFETY: F_DUPFD_CLOEXEC with an int argument on a descriptor we own.
    let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
    if d < 0 {
        return fd;
    }
    // SAFETY: a fresh descriptor nobody else owns (`fd` closes on drop).
    unsafe { OwnedFd::from_raw_fd(d) }
}

fn epoll_add(ep: RawFd, fd: RawFd, data: u64) -> Result<(), i32> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: valid fds and a live event struct.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

fn epoll_del(ep: RawFd, fd: RawFd) {
    // SAFETY: removing an fd that may or may not be registered is harmless.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// Whether this process's readiness descriptors are wake sockets
/// (`DSAN_WAKE=socket` in its environment: `dsan_channel::wake`, signalled
/// by the daemon's lcore itself, no notifier thread in between) rather
/// than eventfds (the default: the daemon's notifier thread for the
/// process writes them). Read once.
fn wake_sockets() -> bool {
    *WAKE.get_or_init(|| std::env::var_os("DSAN_WAKE").is_some_and(|v| v == "socket"))
}

static WAKE: OnceLock<bool> = OnceLock::new();

/// Chooses wake sockets (`on`) or eventfds for this process's readiness
/// descriptors, before the first is made (an interposing library reads
/// `DSAN_WAKE` when it is loaded, before the program can clear its
/// environment). Later calls change nothing.
pub fn set_wake_sockets(on: bool) {
    let _ = WAKE.set(on);
}

/// A readiness descriptor of the switch's own (nonblocking, close-on-exec,
/// at [`FD_BASE`] or above): an eventfd, or a wake socket (see
/// [`wake_sockets`]).
fn eventfd() -> Result<OwnedFd, i32> {
    let fd = if wake_sockets() {
        wake::new(true, true)
    } else {
        EventFd::new().map(OwnedFd::from)
    };
    fd.map(high)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))
}

/// Makes readiness descriptor `fd` readable.
fn signal(fd: RawFd) {
    if wake_sockets() {
        wake::post(fd);
    } else {
        signal_eventfd(fd);
    }
}

/// Makes readiness descriptor `fd` readable unless it is (a state that
/// holds, not news: no second edge for an EPOLLET waiter).
fn signal_if_quiet(fd: RawFd) {
    if wake_sockets() {
        wake::post(fd);
    } else {
        signal_eventfd_if_quiet(fd);
    }
}

/// Clears readiness descriptor `fd`.
fn drain(fd: RawFd) {
    if wake_sockets() {
        wake::drain(fd);
    } else {
        drain_eventfd(fd);
    }
}

use dsan_provider::sockaddr::{from_sockaddr_in as from_sin, sockaddr_in as sin};

fn sock(fd: RawFd) -> Result<Arc<Socket>, i32> {
    match g().table.read().unwrap_or_else(|e| e.into_inner()).get(&fd) {
        Some(Entry::Socket(s)) => Ok(s.clone()),
        Some(Entry::Tcp(_)) => Err(libc::EINVAL),
        None => Err(libc::ENOTSOCK),
    }
}

/// The provider, attached on first use; `None` if no daemon answers (the
/// switch then serves kernel TCP alone).
fn provider() -> Option<Arc<Provider>> {
    let mut p = g().provider.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pp) = p.as_ref() {
        if pp.daemon_alive_recently() {
            return Some(pp.clone());
        }
        *p = None;
    }
    *p = Provider::attach(DAEMON_SOCKET.get().map(|p| p.as_path())).ok();
    p.clone()
}

fn in_san_subnet(p: &Provider, ip: Ipv4Addr) -> bool {
    p.san_addrs().iter().any(|s| s.contains(ip))
}

/// A new switch socket: a pollable descriptor.
///
/// # Errors
/// An errno from the kernel (EMFILE, ...).
pub fn socket() -> Result<RawFd, i32> {
    let epfd = epoll_create()?;
    let fd = epfd.as_raw_fd();
    insert_sock(fd, Some(epfd), -1);
    Ok(fd)
}

/// Records a new switch socket under number `fd`.
fn insert_sock(fd: RawFd, epfd: Option<OwnedFd>, face: RawFd) -> Arc<Socket> {
    let s = Arc::new(Socket::new(fd, epfd, face));
    g().table
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fd, Entry::Socket(s.clone()));
    s
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("number", &self.sw())
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

/// The switch socket with number `fd`.
pub(crate) fn lookup(fd: RawFd) -> Option<Arc<Socket>> {
    sock(fd).ok()
}

impl Socket {
    fn new(number: RawFd, epfd: Option<OwnedFd>, face: RawFd) -> Socket {
        Socket {
            app: crate::app::App::default(),
            number: std::sync::atomic::AtomicI32::new(number),
            epfd,
            face: Mutex::new(face),
            tcp: Mutex::new(None),
            ready: OnceLock::new(),
            bound: Mutex::new(None),
            listen: Mutex::new(None),
            conn: Mutex::new(None),
            pending: Mutex::new(None),
            error: std::sync::atomic::AtomicI32::new(0),
            san_only: std::sync::atomic::AtomicBool::new(false),
            takeover: std::sync::atomic::AtomicU32::new(0),
            connect_efd: OnceLock::new(),
            life: Mutex::new(None),
            abort_on_close: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A record that no switch socket serves (yet): no descriptor, not in
    /// the switch's table.
    pub(crate) fn detached() -> Arc<Socket> {
        Arc::new(Socket::new(-1, None, -1))
    }

    /// The switch's number for this socket (what its functions take), -1
    /// for a record no switch socket serves.
    pub fn sw(&self) -> RawFd {
        self.number.load(Ordering::Acquire)
    }
}

/// A new readiness descriptor at the lowest free number (a program
/// descriptor, never moved to [`FD_BASE`]), O_NONBLOCK as asked,
/// close-on-exec as asked: an eventfd, or a wake socket (see
/// [`wake_sockets`]).
fn program_eventfd(nonblock: bool, cloexec: bool) -> Result<OwnedFd, i32> {
    if wake_sockets() {
        return wake::new(nonblock, cloexec).map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE));
    }
    let mut flags = 0;
    if nonblock {
        flags |= libc::EFD_NONBLOCK;
    }
    if cloexec {
        flags |= libc::EFD_CLOEXEC;
    }
    // SAFETY: plain system call.
    owned(unsafe { libc::eventfd(0, flags) })
}

/// A lean switch socket whose kernel TCP side is `tcp` (as [`adopt`]) and
/// whose descriptor is the caller's number `at`: `at` becomes an eventfd
/// (O_NONBLOCK and close-on-exec as given; the kernel socket it was is
/// closed there, `tcp` being a copy), which is all the socket costs once it
/// is connected over the SAN and its kernel socket is released (see
/// [`release_kernel_socket`]). For an interposing library, which owns and
/// closes `at` itself: [`close`] first (the switch then never touches the
/// number again), then the library's own close of `at`. Lean sockets
/// connect; they do not listen (EINVAL).
///
/// # Errors
/// An errno from the kernel (EMFILE).
pub fn adopt_lean(tcp: OwnedFd, at: RawFd, nonblock: bool, cloexec: bool) -> Result<RawFd, i32> {
    let bound = bound_v4(tcp.as_raw_fd());
    let e = program_eventfd(nonblock, cloexec)?;
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: two valid descriptors; `at` is replaced atomically.
    cvt(unsafe { libc::dup3(e.as_raw_fd(), at, flags) })?;
    drop(e);
    let s = insert_sock(at, None, at);
    *s.tcp.lock().unwrap_or_else(|e| e.into_inner()) = Some(tcp);
    *s.bound.lock().unwrap_or_else(|e| e.into_inner()) = bound;
    Ok(at)
}

/// Lean socket `old` (see [`adopt_lean`]) is known by the number `new`
/// from now on (a duplicate of it: the program closes `old` and keeps
/// `new`).
///
/// # Errors
/// ENOTSOCK; EINVAL if `old` is not lean.
pub fn renumber(old: RawFd, new: RawFd) -> Result<(), i32> {
    let mut t = g().table.write().unwrap_or_else(|e| e.into_inner());
    let s = match t.get(&old) {
        Some(Entry::Socket(s)) if s.is_lean() => s.clone(),
        Some(_) => return Err(libc::EINVAL),
        None => return Err(libc::ENOTSOCK),
    };
    *s.face.lock().unwrap_or_else(|e| e.into_inner()) = new;
    s.number.store(new, Ordering::Release);
    t.remove(&old);
    t.insert(new, Entry::Socket(s));
    Ok(())
}

/// Binds the kernel TCP socket (the SAN side binds at listen).
///
/// # Errors
/// ENOTSOCK, and the kernel's bind errors (EADDRINUSE, EADDRNOTAVAIL, EINVAL).
pub fn bind(fd: RawFd, a: SocketAddrV4) -> Result<(), i32> {
    let s = sock(fd)?;
    let tcp = s.tcp_fd()?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and option buffer.
    unsafe {
        libc::setsockopt(
            tcp,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    let sa = sin(a);
    // SAFETY: a valid sockaddr_in and its length.
    cvt(unsafe {
        libc::bind(
            tcp,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    })?;
    // The port the kernel chose, if 0 was asked for.
    let mut out: libc::sockaddr_in = sin(a);
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid out-buffers.
    unsafe { libc::getsockname(tcp, (&mut out as *mut libc::sockaddr_in).cast(), &mut len) };
    *s.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(from_sin(&out));
    Ok(())
}

/// Sets the condition function that decides on SAN connection requests.
///
/// # Errors
/// ENOTSOCK.
pub fn set_condition(fd: RawFd, cond: Option<Condition>) -> Result<(), i32> {
    let s = sock(fd)?;
    let mut l = s.listen.lock().unwrap_or_else(|e| e.into_inner());
    match l.as_mut() {
        Some(l) => l.cond = cond,
        None => {
            *l = Some(Listen {
                san: None,
                cond,
                pending: VecDeque::new(),
                backlog: 1,
                san_failure_reported: false,
                accept_wake: false,
            })
        }
    }
    Ok(())
}

/// Listens: kernel TCP first, then the SAN when bound to a SAN address of this
/// host or the wildcard. Returns whether a SAN listener was set up.
///
/// # Errors
/// ENOTSOCK, and kernel TCP's listen errors (the SAN side never fails the call).
pub fn listen(fd: RawFd, backlog: i32) -> Result<bool, i32> {
    let s = sock(fd)?;
    let tcp = s.tcp_fd()?;
    if s.ready.get().is_none() {
        let ready = eventfd()?;
        epoll_add(s.ep()?, ready.as_raw_fd(), 0)?;
        let _ = s.ready.set(ready);
    }
    // SAFETY: a valid socket.
    cvt(unsafe { libc::listen(tcp, backlog) })?;
    s.app.set_state(crate::app::State::Listening);
    // SAFETY: a valid socket; F_SETFL with O_NONBLOCK.
    unsafe {
        libc::fcntl(
            tcp,
            libc::F_SETFL,
            libc::fcntl(tcp, libc::F_GETFL) | libc::O_NONBLOCK,
        )
    };
    let _ = epoll_add(s.ep()?, tcp, 1);
    let mut l = s.listen.lock().unwrap_or_else(|e| e.into_inner());
    let l = l.get_or_insert_with(|| Listen {
        san: None,
        cond: None,
        pending: VecDeque::new(),
        backlog: 1,
        san_failure_reported: false,
        accept_wake: false,
    });
    l.backlog = effective_backlog(i64::from(backlog));
    if l.san.is_some() {
        return Ok(true);
    }
    Ok(san_side(fd, &s, l))
}

/// Sets up the SAN side of listener `fd` (bound to a SAN address of this
/// host or the wildcard, a daemon there): a SAN listener with the same port
/// and backlog, FD_ACCEPT into the accept thread's epoll. Returns whether
/// there is one now.
fn san_side(fd: RawFd, s: &Socket, l: &mut Listen) -> bool {
    let backlog = i32::try_from(l.backlog).unwrap_or(i32::MAX);
    let Some(bound) = *s.bound.lock().unwrap_or_else(|e| e.into_inner()) else {
        return false;
    };
    let Some(p) = provider() else {
        return false;
    };
    let ours = bound.ip().is_unspecified() || p.san_addrs().iter().any(|s| s.addr == *bound.ip());
    if !ours {
        return false;
    }
    let setup = || -> Result<(SanSocket, OwnedFd, bool), SanError> {
        let ss = SanSocket::new(&p)?;
        ss.bind(bound)?;
        let from = s.takeover.load(Ordering::Relaxed);
        if from != 0 {
            ss.set_takeover(from)?;
        }
        // SO_REUSEPORT on the kernel socket: the SAN listener joins one of
        // another process of this user that set it too, as the kernel
        // groups the TCP listeners.
        if s.tcp_fd()
            .and_then(|t| int_opt(t, libc::SOL_SOCKET, libc::SO_REUSEPORT))
            .is_ok_and(|v| v != 0)
        {
            ss.set_reuse_port(true)?;
        }
        apply_options(s, &ss);
        ss.listen(backlog)?;
        let (efd, wake) = accept_descriptor().map_err(SanError::Os)?;
        ss.event_select(efd.as_fd(), FD_ACCEPT)?;
        Ok((ss, efd, wake))
    };
    match setup() {
        Ok((ss, efd, wake)) => {
            let _ = epoll_add(accept_ep(), efd.as_raw_fd(), fd as u64);
            l.san = Some((ss, efd));
            l.accept_wake = wake;
            l.san_failure_reported = false;
            true
        }
        // The SAN side cannot be set up: serve TCP alone (no error for the
        // application, as WSD's switch), but never silently: the daemon
        // logs and counts it. The accept thread tries again every second
        // (another user's process may hold the SAN port until its own
        // kernel TCP listener shows the port is not its own).
        Err(e) => {
            if !l.san_failure_reported {
                l.san_failure_reported = true;
                let _ = p.report_listen_failure(bound.port(), e);
            }
            false
        }
    }
}

/// Every listener whose SAN side is missing (no daemon when it listened) or
/// dead (its daemon went away) gets one again when a daemon answers: after
/// a dsand restart, listeners serve SAN clients again with nothing for the
/// application to do.
fn revive_listeners() {
    // The sockets first, the table's lock released before any socket's
    // lock is taken: `accept` holds a listener's lock while it adds the
    // accepted socket to the table, so taking them the other way round
    // here deadlocked the two (seen once a second at worst, when this ran
    // beside an accept).
    let socks: Vec<(RawFd, Arc<Socket>)> = g()
        .table
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(fd, e)| match e {
            Entry::Socket(s) => Some((*fd, s.clone())),
            Entry::Tcp(_) => None,
        })
        .collect();
    for (fd, s) in socks {
        let mut guard = s.listen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(l) = guard.as_mut() else { continue };
        let alive = l.san.as_ref().is_some_and(|(ss, _)| ss.daemon_alive());
        if alive {
            continue;
        }
        if let Some((_, efd)) = l.san.take() {
            epoll_del(accept_ep(), efd.as_raw_fd());
        }
        san_side(fd, &s, l);
    }
}

/// How often the accept thread looks for listeners to give a SAN side again.
const REVIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How soon a deferred request is offered to the condition function again.
const DEFER_RETRY_MS: i32 = 5;

/// The switch's accept thread: accepts SAN connections as they arrive. A
/// request the condition function deferred stays at the head of the
/// provider's backlog; it is offered again after [`DEFER_RETRY_MS`], and at
/// once when the application calls `accept`, not only when another request
/// arrives.
fn accept_thread(ep: RawFd) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    let mut deferred: std::collections::BTreeSet<RawFd> = std::collections::BTreeSet::new();
    let mut revived = std::time::Instant::now();
    loop {
        if revived.elapsed() >= REVIVE_EVERY {
            revive_listeners();
            revived = std::time::Instant::now();
        }
        let timeout = if deferred.is_empty() {
            1000
        } else {
            DEFER_RETRY_MS
        };
        // SAFETY: a valid epoll fd and event buffer.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, timeout) };
        let mut due: Vec<RawFd> = evs
            .iter()
            .take(n.max(0) as usize)
            .map(|ev| ev.u64 as RawFd)
            .collect();
        due.extend(std::mem::take(&mut deferred));
        due.sort_unstable();
        due.dedup();
        for fd in due {
            if serve_listener(fd) {
                deferred.insert(fd);
            }
        }
    }
}

/// Accepts what the listener `fd`'s SAN side holds, within its backlog.
/// Returns whether a request was deferred (and waits at the head).
fn serve_listener(fd: RawFd) -> bool {
    let Ok(s) = sock(fd) else { return false };
    let mut guard = s.listen.lock().unwrap_or_else(|e| e.into_inner());
    let Some(l) = guard.as_mut() else {
        return false;
    };
    l.drain_accept();
    let Some((ss, _)) = l.san.as_ref() else {
        return false;
    };
    let _ = ss.enum_network_events();
    // Within the backlog only: the rest waits in the provider's ring
    // (accept() wakes this thread when it makes room).
    while l.pending.len() < l.backlog {
        let cond = &mut l.cond;
        let r = ss.accept(|peer| match cond {
            Some(c) => c(peer),
            None => Decision::Accept,
        });
        match r {
            Ok(conn) => {
                l.pending.push_back(conn);
                let _ = ss.report_accepted_waiting(l.pending.len());
                if let Some(r) = s.ready_fd() {
                    signal(r);
                }
            }
            Err(SanError::ConnRefused) => continue,
            Err(_) => break,
        }
    }
    ss.deferred().unwrap_or(false)
}

fn nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

/// Accepts a SAN or kernel TCP connection from the listening socket `fd`.
/// Returns the new descriptor and the peer.
///
/// # Errors
/// EAGAIN if nothing is ready and `fd` is O_NONBLOCK; EINVAL if not listening;
/// ENOTSOCK.
pub fn accept(fd: RawFd) -> Result<(RawFd, SocketAddrV4), i32> {
    accept_as(fd, None)
}

/// As [`accept`], a SAN connection becoming a lean socket (see
/// [`adopt_lean`]) whose descriptor is a new program descriptor (the
/// lowest free number) with O_NONBLOCK and close-on-exec as given: the
/// connection costs the process that one descriptor. A kernel TCP
/// connection is returned as by [`accept`].
///
/// # Errors
/// As [`accept`].
pub fn accept_lean(fd: RawFd, nonblock: bool, cloexec: bool) -> Result<(RawFd, SocketAddrV4), i32> {
    accept_as(fd, Some((nonblock, cloexec)))
}

fn accept_as(fd: RawFd, lean: Option<(bool, bool)>) -> Result<(RawFd, SocketAddrV4), i32> {
    let s = sock(fd)?;
    loop {
        {
            let mut l = s.listen.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = l.as_mut() else {
                return Err(libc::EINVAL);
            };
            if l.san
                .as_ref()
                .is_some_and(|(ss, _)| ss.deferred().unwrap_or(false))
            {
                // The application asks again: offer the deferred request now.
                l.signal_accept();
            }
            let was_full = l.pending.len() >= l.backlog;
            if let Some((conn, peer)) = l.pending.pop_front() {
                if l.pending.is_empty() {
                    if let Some(r) = s.ready_fd() {
                        drain(r);
                    }
                }
                if let Some((ss, _)) = l.san.as_ref() {
                    let _ = ss.report_accepted_waiting(l.pending.len());
                }
                if was_full {
                    // Room again: let the accept thread take the next request
                    // waiting in the provider's backlog.
                    l.signal_accept();
                }
                let (nfd, ns) = match lean {
                    None => {
                        let nfd = socket()?;
                        (nfd, sock(nfd)?)
                    }
                    Some((nonblock, cloexec)) => {
                        let e = program_eventfd(nonblock, cloexec)?;
                        let nfd = std::os::fd::IntoRawFd::into_raw_fd(e);
                        (nfd, insert_sock(nfd, None, nfd))
                    }
                };
                if let Err(e) = set_san(&ns, Arc::new(conn)) {
                    let _ = close(nfd);
                    if lean.is_some() {
                        // SAFETY: the descriptor made above, released by `close`.
                        unsafe { libc::close(nfd) };
                    }
                    return Err(e);
                }
                return Ok((nfd, peer));
            }
        }
        let tcp = s.tcp_fd()?;
        let mut peer: libc::sockaddr_in = sin(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: a valid listening socket and out-buffers.
        let c = unsafe {
            libc::accept4(
                tcp,
                (&mut peer as *mut libc::sockaddr_in).cast(),
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if c >= 0 {
            // SAFETY: a new descriptor from accept4.
            let c = unsafe { OwnedFd::from_raw_fd(c) };
            let raw = c.as_raw_fd();
            g().table
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(raw, Entry::Tcp(c));
            return Ok((raw, from_sin(&peer)));
        }
        let e = errno();
        if e != libc::EAGAIN && e != libc::EWOULDBLOCK {
            return Err(e);
        }
        if nonblocking(fd) {
            return Err(libc::EAGAIN);
        }
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: a valid epoll fd and buffer.
        unsafe { libc::epoll_wait(s.ep()?, ev.as_mut_ptr(), 4, 1000) };
    }
}

/// Connects: over the SAN when `dst` is in a SAN subnet (falling back to TCP
/// when the SAN attempt times out, when the port has only a kernel TCP
/// listener, or when the SAN socket cannot be set up), else over TCP.
///
/// On an O_NONBLOCK descriptor it returns EINPROGRESS at once; the attempt
/// (and any fallback) runs on a thread of its own, the descriptor polls
/// readable when the outcome is known, and [`error`] reports it. Meanwhile a
/// second connect gets EALREADY; once connected, 0.
///
/// # Errors
/// ECONNREFUSED (refused, or nobody listens on the SAN port), EHOSTUNREACH,
/// EINPROGRESS, EALREADY, ENOTSOCK, EISCONN, and kernel TCP's connect errors.
pub fn connect(fd: RawFd, dst: SocketAddrV4) -> Result<Transport, i32> {
    let s = sock(fd)?;
    let r = connect_as(fd, &s, dst);
    // The program's side follows.
    match r {
        Ok(t) => s.connected(t),
        Err(libc::EINPROGRESS) => s.app.set_state(crate::app::State::Connecting),
        Err(libc::EALREADY) | Err(libc::EISCONN) => {}
        Err(_) => s.app.set_state(crate::app::State::Idle),
    }
    r
}

/// [`connect`]'s work.
fn connect_as(fd: RawFd, s: &Arc<Socket>, dst: SocketAddrV4) -> Result<Transport, i32> {
    let pending = s.pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(p) = pending {
        if !p.done.load(Ordering::Acquire) {
            return Err(libc::EALREADY);
        }
        // Finished: the outcome is reported now.
        let e = s.take_outcome();
        if e != 0 {
            return Err(e);
        }
        return transport(fd);
    }
    if s.conn.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
        return Err(libc::EISCONN);
    }
    if !nonblocking(fd) {
        return connect_now(s, dst, None);
    }
    if !s.is_lean() && s.connect_efd.get().is_none() {
        let e = eventfd()?;
        epoll_add(s.ep()?, e.as_raw_fd(), 0)?;
        let _ = s.connect_efd.set(e);
    }
    s.with_connect_fd(drain);
    let p = Arc::new(Pending {
        cancel: std::sync::atomic::AtomicBool::new(false),
        done: std::sync::atomic::AtomicBool::new(false),
        san: Mutex::new(None),
    });
    *s.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
    s.error.store(0, Ordering::Release);
    let s2 = s.clone();
    std::thread::Builder::new()
        .name("dsan-switch-connect".into())
        .spawn(move || {
            thread_hook();
            let r = connect_now(&s2, dst, Some(&p));
            if !p.cancel.load(Ordering::Acquire) {
                s2.error.store(r.err().unwrap_or(0), Ordering::Release);
            }
            p.done.store(true, Ordering::Release);
            s2.with_connect_fd(signal);
        })
        .map_err(|_| libc::EAGAIN)?;
    Err(libc::EINPROGRESS)
}

/// The pending error of a switch descriptor (as SO_ERROR): the outcome of
/// a nonblocking connect (0 while it runs or once connected, else the
/// errno), cleared by reading; for an accepted kernel TCP descriptor, its
/// SO_ERROR.
///
/// # Errors
/// ENOTSOCK.
pub fn error(fd: RawFd) -> Result<i32, i32> {
    let s = match g().table.read().unwrap_or_else(|e| e.into_inner()).get(&fd) {
        Some(Entry::Tcp(t)) => return int_opt(t.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR),
        Some(Entry::Socket(s)) => s.clone(),
        None => return Err(libc::ENOTSOCK),
    };
    Ok(s.take_outcome())
}

/// The connect itself (blocking; on the caller's thread or a nonblocking
/// connect's own). `p`: the pending record of a nonblocking connect, which a
/// close may cancel.
fn connect_now(
    s: &Arc<Socket>,
    dst: SocketAddrV4,
    p: Option<&Arc<Pending>>,
) -> Result<Transport, i32> {
    let cancelled = || p.is_some_and(|p| p.cancel.load(Ordering::Acquire));
    let prov = provider();
    if let Some(pr) = prov.as_ref().filter(|pr| in_san_subnet(pr, *dst.ip())) {
        let attempt = || -> Result<Arc<SanSocket>, SanError> {
            let ss = Arc::new(SanSocket::new(pr)?);
            // The application's bind names the source address and port on
            // the SAN too (its kernel socket holds the port, so that no
            // other socket of the host takes it).
            let bound = *s.bound.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = bound.filter(|b| !b.ip().is_unspecified() || b.port() != 0) {
                ss.bind(b)?;
            }
            apply_options(s, &ss);
            if let Some(p) = p {
                *p.san.lock().unwrap_or_else(|e| e.into_inner()) = Some(ss.clone());
                if p.cancel.load(Ordering::Acquire) {
                    return Err(SanError::Os(libc::EINTR));
                }
            }
            ss.connect(dst)?;
            Ok(ss)
        };
        match attempt() {
            Ok(_) if cancelled() => return Err(libc::EINTR),
            Ok(ss) => {
                set_san(s, ss)?;
                return Ok(Transport::San);
            }
            Err(_) if cancelled() => return Err(libc::EINTR),
            Err(SanError::ConnRefused) | Err(SanError::ConnReset) => {
                return Err(libc::ECONNREFUSED)
            }
            Err(SanError::HostUnreach) => return Err(libc::EHOSTUNREACH),
            Err(e) if s.san_only.load(Ordering::Relaxed) => {
                return Err(match e {
                    SanError::TimedOut => libc::ETIMEDOUT,
                    SanError::Os(libc::EPROTONOSUPPORT) => libc::ECONNREFUSED,
                    e => e.errno(),
                })
            }
            // No SAN listener, but the port has a kernel TCP listener: TCP at once.
            Err(SanError::Os(libc::EPROTONOSUPPORT)) => {
                let _ = pr.report_fallback_for("tcp_only");
            }
            Err(SanError::TimedOut) => {
                let _ = pr.report_fallback_for("timed_out");
            }
            // The SAN socket could not be set up: TCP.
            Err(_) => {
                let _ = pr.report_fallback_for("no_san_socket");
            }
        }
    }
    let tcp = s.tcp_fd()?;
    let sa = sin(dst);
    if p.is_some() {
        // A nonblocking connect's thread: the kernel connect is nonblocking
        // too, so that a close cancels it within a poll interval.
        // SAFETY: F_GETFL/F_SETFL on a socket we own.
        unsafe {
            libc::fcntl(
                tcp,
                libc::F_SETFL,
                libc::fcntl(tcp, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
    }
    let r = if int_opt(tcp, libc::SOL_SOCKET, libc::SO_DOMAIN) == Ok(libc::AF_INET6) {
        // An AF_INET6 socket (a program's IPv6 client): the v4-mapped
        // address, as the program asked.
        // SAFETY: sockaddr_in6 is plain data; zeroed is valid.
        let mut s6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        s6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        s6.sin6_port = dst.port().to_be();
        s6.sin6_addr.s6_addr = dst.ip().to_ipv6_mapped().octets();
        // SAFETY: a valid socket, sockaddr_in6 and length.
        unsafe {
            libc::connect(
                tcp,
                (&s6 as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as u32,
            )
        }
    } else {
        // SAFETY: a valid socket, sockaddr_in and length.
        unsafe {
            libc::connect(
                tcp,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        }
    };
    if r < 0 {
        let e = errno();
        if e != libc::EINPROGRESS || p.is_none() {
            return Err(e);
        }
        loop {
            if cancelled() {
                return Err(libc::EINTR);
            }
            let mut pfd = libc::pollfd {
                fd: tcp,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 20) } == 1 {
                break;
            }
        }
        let v = int_opt(tcp, libc::SOL_SOCKET, libc::SO_ERROR)?;
        if v != 0 {
            return Err(v);
        }
    }
    if cancelled() {
        return Err(libc::EINTR);
    }
    s.set_tcp()?;
    Ok(Transport::Tcp)
}

/// Which provider serves the connected or accepted descriptor `fd`.
///
/// # Errors
/// ENOTCONN if it is not connected; ENOTSOCK.
pub fn transport(fd: RawFd) -> Result<Transport, i32> {
    // (No socket lock under the table's: see `revive_listeners`.)
    let s = match g().table.read().unwrap_or_else(|e| e.into_inner()).get(&fd) {
        Some(Entry::Tcp(_)) => return Ok(Transport::Tcp),
        Some(Entry::Socket(s)) => s.clone(),
        None => return Err(libc::ENOTSOCK),
    };
    let c = s.conn.lock().unwrap_or_else(|e| e.into_inner());
    c.as_ref().map(|c| c.transport).ok_or(libc::ENOTCONN)
}

/// Closes a switch descriptor (its SAN side too).
///
/// # Errors
/// ENOTSOCK.
pub fn close(fd: RawFd) -> Result<(), i32> {
    let e = g()
        .table
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd)
        .ok_or(libc::ENOTSOCK)?;
    if let Entry::Socket(s) = e {
        // A lean socket's number is the program's to close: never touched
        // here again.
        *s.face.lock().unwrap_or_else(|e| e.into_inner()) = -1;
        if let Some(p) = s.pending.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // A nonblocking connect in progress ends now: its SAN attempt is
            // aborted (the provider wakes it), its TCP attempt stops polling.
            // (One that finished left its connection in `conn`, closed below.)
            if !p.done.load(Ordering::Acquire) {
                p.cancel.store(true, Ordering::Release);
                if let Some(ss) = p.san.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    ss.abort();
                }
            }
        }
        if let Some(l) = s.listen.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if let Some((_, efd)) = &l.san {
                epoll_del(accept_ep(), efd.as_raw_fd());
            }
        }
        // No registration holds the connection while this close lets go of
        // it: the registration thread would otherwise be its last holder,
        // and the close would be posted only when that registration ends,
        // never if the process exits first (a fork-per-connection child
        // that closes and `_exit`s: the daemon then reset the connection
        // as its process's death, and the peer could read ECONNRESET
        // before the last bytes).
        let _registering = REGISTERING.lock().unwrap_or_else(|e| e.into_inner());
        // The life first: the daemon looks at it when the close arrives (a
        // connection that another process still holds stays open for it).
        drop(s.life.lock().unwrap_or_else(|e| e.into_inner()).take());
        let conn = s.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(ss) = conn.and_then(|c| c.san) {
            // Options are set on the kernel socket (it records them for
            // either transport): SO_LINGER {1, 0} makes this close a reset
            // on the SAN too.
            // (Closed when the last holder lets go: a call in progress on
            // another thread keeps it, as it keeps a kernel socket.)
            if s.linger_abort() {
                let _ = ss.set_linger(true, 0);
            }
        }
    }
    Ok(())
}

/// What a data call on `fd` goes to.
enum Target {
    /// A kernel TCP socket.
    Tcp(RawFd),
    /// A SAN connection (its readiness eventfd: [`Socket::with_readable`]).
    San(Arc<SanSocket>),
}

fn target(fd: RawFd) -> Result<(Target, Option<Arc<Socket>>), i32> {
    match entry(fd)? {
        Found::Tcp(t) => Ok((Target::Tcp(t), None)),
        Found::Socket(s) => Ok((s.target()?, Some(s))),
    }
}

/// Sends on a connected switch descriptor, whichever transport serves it:
/// the bytes taken (all of them when blocking), as `send(2)` with
/// MSG_NOSIGNAL. `flags`: 0, MSG_DONTWAIT, MSG_OOB (the last byte is
/// urgent, as TCP's out-of-band byte).
///
/// # Errors
/// EAGAIN, EPIPE, ECONNRESET, ENOTCONN, ENOTSOCK, EINVAL, and kernel errors.
pub fn send(fd: RawFd, buf: &[u8], flags: i32) -> Result<usize, i32> {
    let block = || flags & libc::MSG_DONTWAIT == 0 && !nonblocking(fd);
    match entry(fd)? {
        Found::Tcp(t) => {
            check_send_flags(flags)?;
            send_kernel(t, buf, flags, block())
        }
        Found::Socket(s) => s.send(buf, flags, block()),
    }
}

fn check_send_flags(flags: i32) -> Result<(), i32> {
    if flags & !(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_OOB) != 0 {
        return Err(libc::EINVAL);
    }
    Ok(())
}

fn check_recv_flags(flags: i32) -> Result<(), i32> {
    if flags & !(libc::MSG_DONTWAIT | libc::MSG_PEEK | libc::MSG_OOB) != 0 {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// What a switch descriptor is, looked up (no table lock held after).
enum Found {
    /// An accepted kernel TCP connection: its socket (as [`target`] gives it).
    Tcp(RawFd),
    Socket(Arc<Socket>),
}

fn entry(fd: RawFd) -> Result<Found, i32> {
    match g().table.read().unwrap_or_else(|e| e.into_inner()).get(&fd) {
        Some(Entry::Tcp(t)) => Ok(Found::Tcp(t.as_raw_fd())),
        Some(Entry::Socket(s)) => Ok(Found::Socket(s.clone())),
        None => Err(libc::ENOTSOCK),
    }
}

/// `send` on kernel socket `t` (nonblocking: the switch's), waiting for
/// room when `block`, as a blocking kernel send does (within SO_SNDTIMEO):
/// everything then.
fn send_kernel(t: RawFd, buf: &[u8], flags: i32, block: bool) -> Result<usize, i32> {
    let mut sent = 0;
    loop {
        let rest = &buf[sent..];
        // SAFETY: a valid socket and buffer.
        let r = unsafe {
            libc::send(
                t,
                rest.as_ptr().cast(),
                rest.len(),
                flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        let e = if r < 0 { errno() } else { 0 };
        if r >= 0 {
            sent += r as usize;
            if sent == buf.len() || !block {
                return Ok(sent);
            }
        } else if e != libc::EAGAIN || !block {
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
        if let Err(e) = wait_kernel(t, libc::POLLOUT, libc::SO_SNDTIMEO) {
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
    }
}

/// `recv` on kernel socket `t` (nonblocking: the switch's), waiting when
/// `block` (within SO_RCVTIMEO).
fn recv_kernel(t: RawFd, buf: &mut [u8], flags: i32, block: bool) -> Result<usize, i32> {
    loop {
        // SAFETY: a valid socket and buffer.
        let r = unsafe {
            libc::recv(
                t,
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = errno();
        if e != libc::EAGAIN || !block {
            return Err(e);
        }
        wait_kernel(t, libc::POLLIN, libc::SO_RCVTIMEO)?;
    }
}

impl Socket {
    /// What serves the connected socket.
    fn target(&self) -> Result<Target, i32> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_ref() {
            None => Err(libc::ENOTCONN),
            Some(Conn { san: Some(ss), .. }) => Ok(Target::San(ss.clone())),
            Some(_) => Ok(Target::Tcp(self.tcp_fd()?)),
        }
    }

    /// [`send`] on this socket; `block`: wait for room (the descriptor is
    /// blocking and `flags` has no MSG_DONTWAIT), which the caller knows.
    ///
    /// # Errors
    /// As [`send`].
    pub fn send(&self, buf: &[u8], flags: i32, block: bool) -> Result<usize, i32> {
        check_send_flags(flags)?;
        match self.target()? {
            Target::Tcp(t) => send_kernel(t, buf, flags, block),
            Target::San(ss) => {
                let mut sent = 0;
                let r = loop {
                    match ss.send_mode(&buf[sent..], flags & libc::MSG_OOB, block) {
                        Ok(n) => sent += n,
                        Err(_) if sent > 0 => break Ok(sent),
                        Err(e) => break Err(e.errno()),
                    }
                    if sent == buf.len() || !block {
                        break Ok(sent);
                    }
                };
                if !matches!(r, Ok(n) if n == buf.len()) {
                    // Writable stays true exactly while a send would take
                    // bytes: clear it, then look (a look that finds the ring
                    // full asks the daemon for the next FD_WRITE).
                    if let Some(w) = self.writable_fd() {
                        drain(w);
                        if ss.readiness(false, true).writable {
                            signal(w);
                        }
                    }
                }
                r
            }
        }
    }

    /// [`recv`] on this socket; `block` as for [`Socket::send`].
    ///
    /// # Errors
    /// As [`recv`].
    pub fn recv(&self, buf: &mut [u8], flags: i32, block: bool) -> Result<usize, i32> {
        check_recv_flags(flags)?;
        match self.target()? {
            Target::Tcp(t) => recv_kernel(t, buf, flags, block),
            Target::San(ss) => {
                let r = ss.recv_mode(buf, flags, block).map_err(|e| e.errno());
                // Readable stays true exactly while bytes or the end of the
                // stream are there. With more to read, the descriptor holds
                // its token still (tokens are taken only when nothing is
                // left); else it is cleared, then looked at again (a look
                // that finds nothing asks the daemon for the next FD_READ,
                // and bytes that came meanwhile are posted here).
                if !has_input(&ss) {
                    self.with_readable(|efd| {
                        drain(efd);
                        if has_input(&ss) {
                            signal(efd);
                        }
                    });
                }
                r
            }
        }
    }

    /// The SAN connection that serves it, if one does.
    pub fn san(&self) -> Option<Arc<SanSocket>> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()?.san.clone()
    }

    /// See [`kernel_socket`].
    ///
    /// # Errors
    /// As there.
    pub fn kernel(&self) -> Result<RawFd, i32> {
        if self.is_lean() {
            // A lean socket never gets one after the fact: its options are
            // the caller's to keep (see `release_kernel_socket`).
            let t = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
            return t.as_ref().map(AsRawFd::as_raw_fd).ok_or(libc::EBADFD);
        }
        self.tcp_fd()
    }

    /// See [`input_now`].
    pub fn input_now(&self) -> (bool, bool) {
        let Some(ss) = self.san() else {
            return (true, false);
        };
        let r = ss.readiness(true, false);
        if r.readable || r.urgent {
            return (r.readable, r.urgent);
        }
        self.with_readable(|efd| {
            drain(efd);
            // Bytes that came while clearing it: set it again.
            let r = ss.readiness(true, false);
            if r.readable || r.urgent {
                signal(efd);
            }
            (r.readable, r.urgent)
        })
        .unwrap_or((false, false))
    }

    /// See [`writable_now`].
    pub fn writable_now(&self) -> bool {
        let Some(ss) = self.san() else {
            return true;
        };
        if ss.readiness(false, true).writable {
            return true;
        }
        let Some(w) = self.writable_fd() else {
            return false;
        };
        drain(w);
        if ss.readiness(false, true).writable {
            signal(w);
            return true;
        }
        false
    }

    /// Option (`level`, `name`), just set by the program to `v` (its bytes),
    /// reaches the SAN connection that serves the socket, if it honours it
    /// (TCP_NODELAY, SO_KEEPALIVE, SO_LINGER): so that the connection's
    /// claim ticket, which carries them to a process it is passed to,
    /// says what the program set.
    pub fn set_san_option(&self, level: libc::c_int, name: libc::c_int, v: &[u8]) {
        let Some(ss) = self.san() else {
            return;
        };
        let int = |i: usize| {
            v.get(i..i + 4)
                .map(|b| libc::c_int::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        match (level, name) {
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) | (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => {
                if let Some(x) = int(0) {
                    let _ = ss.set_option(level, name, x);
                }
            }
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                if let (Some(on), Some(secs)) = (int(0), int(4)) {
                    let _ = ss.set_linger(on != 0, secs);
                }
            }
            _ => {}
        }
    }

    /// A socket that serves a connection passed to this process (or kept
    /// across exec): the options its claim ticket carried (TCP_NODELAY,
    /// SO_KEEPALIVE, now the provider socket's) are recorded in its record
    /// and set on its kernel socket, where the program reads them.
    pub fn adopt_san_options(&self) {
        let Some(ss) = self.san() else {
            return;
        };
        for (level, name) in [
            (libc::IPPROTO_TCP, libc::TCP_NODELAY),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        ] {
            if let Ok(v) = ss.option(level, name).map(|v| v.min(1)) {
                if v != 0 {
                    crate::app::keep(self, level, name, v.to_ne_bytes().to_vec());
                }
            }
        }
        if self
            .app
            .opts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return;
        }
        if let Ok(k) = self.kernel() {
            crate::app::apply_kept(self, k);
            self.app.opts_set.store(true, Ordering::Relaxed);
        }
    }

    /// The FD_WRITE descriptor of its connection, if one was made.
    fn writable_fd(&self) -> Option<RawFd> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()?.wfd.get().map(AsRawFd::as_raw_fd)
    }
}

/// Waits until the kernel socket `t` is ready for `events`, at most its
/// timeout option `opt` (SO_SNDTIMEO / SO_RCVTIMEO; none: for ever), as a
/// blocking kernel call waits. EAGAIN when the timeout passes, EINTR on a
/// signal.
fn wait_kernel(t: RawFd, events: libc::c_short, opt: libc::c_int) -> Result<(), i32> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: a valid socket and out-buffers of the given length.
    let r = unsafe {
        libc::getsockopt(
            t,
            libc::SOL_SOCKET,
            opt,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    let ms = if r == 0 && (tv.tv_sec > 0 || tv.tv_usec > 0) {
        (tv.tv_sec.saturating_mul(1000) + tv.tv_usec / 1000).clamp(1, i64::from(i32::MAX)) as i32
    } else {
        -1
    };
    let mut p = libc::pollfd {
        fd: t,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        0 => Err(libc::EAGAIN),
        r if r < 0 => Err(errno()),
        _ => Ok(()),
    }
}

/// Receives from a connected switch descriptor, whichever transport serves
/// it: bytes, 0 at the end of the stream, as `recv(2)`. `flags`: 0,
/// MSG_DONTWAIT, MSG_PEEK, MSG_OOB (the urgent byte, as TCP gives it).
///
/// # Errors
/// EAGAIN, ECONNRESET, ENOTCONN, ENOTSOCK, EINVAL, and kernel errors.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> Result<usize, i32> {
    let block = || flags & libc::MSG_DONTWAIT == 0 && !nonblocking(fd);
    match entry(fd)? {
        Found::Tcp(t) => {
            check_recv_flags(flags)?;
            recv_kernel(t, buf, flags, block())
        }
        Found::Socket(s) => s.recv(buf, flags, block()),
    }
}

/// SO_OOBINLINE on switch descriptor `fd`'s SAN connection (a kernel TCP
/// one has it on its kernel socket): the urgent byte stays in the stream.
/// Nothing for a descriptor without one.
pub fn set_oob_inline(fd: RawFd, on: bool) {
    if let Some(ss) = san_connection(fd) {
        ss.set_oob_inline(on);
    }
}

/// Shuts down one or both directions of a connected switch descriptor
/// (SHUT_RD, SHUT_WR, SHUT_RDWR), whichever transport serves it.
///
/// # Errors
/// EINVAL, ENOTCONN, ENOTSOCK.
pub fn shutdown(fd: RawFd, how: i32) -> Result<(), i32> {
    if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
        return Err(libc::EINVAL);
    }
    // A listener, as Linux treats one: SHUT_WR does nothing; SHUT_RD and
    // SHUT_RDWR stop listening (the SAN listener closes with the
    // connections it had accepted for the program, the kernel listener is
    // shut down, and a blocked accept wakes and fails with EINVAL).
    if let Ok(s) = sock(fd) {
        let mut l = s.listen.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_some() {
            if how == libc::SHUT_WR {
                return Ok(());
            }
            if let Some(old) = l.take() {
                if let Some((_, efd)) = &old.san {
                    epoll_del(accept_ep(), efd.as_raw_fd());
                }
                drop(old);
            }
            drop(l);
            if let Ok(t) = s.tcp_fd() {
                // SAFETY: a valid socket.
                unsafe { libc::shutdown(t, how) };
            }
            if let Some(r) = s.ready_fd() {
                signal(r);
            }
            return Ok(());
        }
    }
    let (t, s) = target(fd)?;
    match t {
        // SAFETY: a valid socket.
        Target::Tcp(t) => cvt(unsafe { libc::shutdown(t, how) }).map(|_| ()),
        Target::San(ss) => {
            ss.shutdown(how).map_err(|e| e.errno())?;
            if how != libc::SHUT_WR {
                // Receives return 0 now: readable. (Without a descriptor
                // yet, its registration looks.)
                if let Some(s) = s {
                    s.with_readable(signal);
                }
            }
            Ok(())
        }
    }
}

/// A switch socket whose kernel TCP side is `tcp` (an unconnected kernel
/// TCP socket, possibly bound, with its options): what a program's own
/// socket becomes when the switch takes it over. Its bound address is
/// taken from the socket.
///
/// # Errors
/// An errno from the kernel.
pub fn adopt(tcp: OwnedFd) -> Result<RawFd, i32> {
    let bound = bound_v4(tcp.as_raw_fd());
    let fd = socket()?;
    let s = sock(fd)?;
    *s.tcp.lock().unwrap_or_else(|e| e.into_inner()) = Some(tcp);
    *s.bound.lock().unwrap_or_else(|e| e.into_inner()) = bound;
    Ok(fd)
}

/// The IPv4 address and port a kernel socket is bound to: its own for an
/// AF_INET socket; for an AF_INET6 one bound to `::` without IPV6_V6ONLY
/// (dual-stack) the IPv4 wildcard, for one bound to a v4-mapped address
/// that address. None when unbound or IPv6 only.
fn bound_v4(fd: RawFd) -> Option<SocketAddrV4> {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: a valid socket and out-buffers of the given length.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET address fits a sockaddr_storage.
            let sa: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            (sa.sin_port != 0).then(|| from_sin(&sa))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address fits a sockaddr_storage.
            let sa: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let port = u16::from_be(sa.sin6_port);
            let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
            if port == 0 {
                return None;
            }
            let v4 = if ip.is_unspecified() {
                (int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Ok(0))
                    .then_some(Ipv4Addr::UNSPECIFIED)?
            } else {
                ip.to_ipv4_mapped()?
            };
            Some(SocketAddrV4::new(v4, port))
        }
        _ => None,
    }
}

/// Hands over an accepted kernel TCP connection (from [`accept`]): the
/// switch forgets it and the caller owns the descriptor.
///
/// # Errors
/// EINVAL if `fd` is not an accepted kernel TCP connection; ENOTSOCK.
pub fn take_tcp(fd: RawFd) -> Result<OwnedFd, i32> {
    let mut t = g().table.write().unwrap_or_else(|e| e.into_inner());
    match t.remove(&fd) {
        Some(Entry::Tcp(o)) => Ok(o),
        Some(e) => {
            t.insert(fd, e);
            Err(libc::EINVAL)
        }
        None => Err(libc::ENOTSOCK),
    }
}

/// The kernel TCP socket of switch socket `fd` (made if it had none): where
/// its kernel-side options, names and TCP traffic go.
///
/// # Errors
/// ENOTSOCK, EINVAL (an accepted TCP connection: `fd` itself is the
/// socket), and the kernel's errors.
pub fn kernel_socket(fd: RawFd) -> Result<RawFd, i32> {
    sock(fd)?.kernel()
}

/// The kernel socket of lean socket `fd` once a SAN connection serves it
/// and the program did not bind it (a bound one keeps its port reserved):
/// handed to the caller, who reads what it needs of it (its options) and
/// closes it, so that the connection costs the process one descriptor.
/// [`kernel_socket`] is EBADFD from then on.
pub fn release_kernel_socket(fd: RawFd) -> Option<OwnedFd> {
    sock(fd).ok()?.release_kernel()
}

impl Socket {
    /// See [`release_kernel_socket`].
    fn release_kernel(&self) -> Option<OwnedFd> {
        if !self.is_lean() {
            return None;
        }
        let san = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| c.san.is_some());
        let bound = self
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|b| !b.ip().is_unspecified() || b.port() != 0);
        if !san || bound {
            return None;
        }
        self.tcp.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// SO_LINGER {1, 0} (`on`) recorded for the socket (see
    /// [`set_linger_abort`]).
    pub(crate) fn set_abort_on_close(&self, on: bool) {
        self.abort_on_close.store(on, Ordering::Relaxed);
    }

    /// Whether no nonblocking connect runs (none started, or it finished).
    fn connect_done(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|p| p.done.load(Ordering::Acquire))
    }

    /// The outcome of a nonblocking connect, reported (see [`error`]): 0
    /// while it runs or once connected, else the errno; cleared by the
    /// reading, which also clears the connect's signal and, after a
    /// failure, lets a new connect start.
    fn take_outcome(&self) -> i32 {
        let done = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| p.done.load(Ordering::Acquire));
        let e = self.error.swap(0, Ordering::AcqRel);
        if done {
            self.clear_connect_signal();
            if self
                .conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                // It failed and the failure is reported: a new connect may start.
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        e
    }

    /// The program's side is connected over `t`: a lean socket's kernel
    /// socket goes once a SAN connection serves it (unless the program
    /// bound it), so that the connection costs the program its one
    /// descriptor; what the program set on it is recorded first.
    fn connected(&self, t: Transport) {
        self.app.set_state(crate::app::State::Connected);
        if t == Transport::San {
            if let Some(k) = self.release_kernel() {
                if self.app.opts_set.load(Ordering::Relaxed) {
                    crate::app::carry_from(self, k.as_raw_fd());
                }
            }
        }
    }

    /// A nonblocking connect that finished is recorded in the program's
    /// side, once: connected, or not connected with the failure kept for
    /// SO_ERROR (`app.so_error`). Returns whether the state changed.
    pub fn settle(&self) -> bool {
        if self.app.state() != crate::app::State::Connecting || !self.connect_done() {
            return false;
        }
        let failed = |e: i32| {
            self.app.so_error.store(e, Ordering::Release);
            self.app.set_state(crate::app::State::Idle);
        };
        match self.take_outcome() {
            0 => {
                let t = self
                    .conn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|c| c.transport);
                match t {
                    Some(t) => self.connected(t),
                    None => failed(libc::ENOTCONN),
                }
            }
            e => failed(e),
        }
        true
    }
}

/// The options of the program's that a SAN side honours when it is made
/// (SO_LINGER is applied at close, see [`Socket::linger_abort`]).
const SAN_OPTIONS: [(libc::c_int, libc::c_int); 4] = [
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
];

/// The program's options that the SAN side of socket `s` honours, as the
/// kernel reports them ((level, name, value); SO_RCVBUF and SO_SNDBUF
/// doubled). A socket's options are recorded once: on its kernel socket
/// while it has one (those that differ from a fresh socket's count as set),
/// else in its record (`app.opts`, kept by an interposing library). Only a
/// socket whose program set options (`app.opts_set`, or options kept in
/// its record) pays for the look.
fn program_options(s: &Socket) -> Vec<(libc::c_int, libc::c_int, libc::c_int)> {
    let kept = s.app.opts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if kept.is_empty() && !s.app.opts_set.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let tcp = s
        .tcp
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(AsRawFd::as_raw_fd);
    let fam = tcp
        .and_then(|t| int_opt(t, libc::SOL_SOCKET, libc::SO_DOMAIN).ok())
        .unwrap_or(libc::AF_INET);
    let defaults = crate::app::defaults(fam).ok();
    let int = |b: &[u8]| {
        b.get(..4)
            .map(|w| libc::c_int::from_ne_bytes(w.try_into().expect("4 bytes")))
    };
    let mut out = Vec::new();
    for &(level, name) in &SAN_OPTIONS {
        let v = match kept.iter().find(|(l, n, _)| (*l, *n) == (level, name)) {
            Some((_, _, b)) => int(b),
            None => tcp
                .and_then(|t| crate::app::read_opt(t, level, name))
                .filter(|b| {
                    defaults
                        .and_then(|d| crate::app::read_opt(d, level, name))
                        .as_ref()
                        != Some(b)
                })
                .and_then(|b| int(&b)),
        };
        if let Some(v) = v {
            out.push((level, name, v));
        }
    }
    out
}

/// The program's options (see [`program_options`]) on SAN socket `ss`
/// before it connects or listens: SO_RCVBUF and SO_SNDBUF size its rings
/// (to what the program asked for, half what the kernel reports), and a
/// listener's pass to the connections it accepts, as the kernel's buffer
/// sizes do; SO_KEEPALIVE and TCP_NODELAY go with the connection.
fn apply_options(s: &Socket, ss: &SanSocket) {
    for (level, name, v) in program_options(s) {
        let v = if (level, name) == (libc::SOL_SOCKET, libc::SO_RCVBUF)
            || (level, name) == (libc::SOL_SOCKET, libc::SO_SNDBUF)
        {
            (v / 2).max(1)
        } else {
            v
        };
        let _ = ss.set_option(level, name, v);
    }
}

/// Records SO_LINGER {1, 0} (`on`) for switch socket `fd` (set by a
/// caller that keeps its options itself): its close then resets a SAN
/// connection, as TCP's does.
///
/// # Errors
/// ENOTSOCK.
pub fn set_linger_abort(fd: RawFd, on: bool) -> Result<(), i32> {
    sock(fd)?.set_abort_on_close(on);
    Ok(())
}

/// The SAN connection behind switch socket `fd`, if a SAN connection
/// serves it.
pub fn san_connection(fd: RawFd) -> Option<Arc<SanSocket>> {
    sock(fd).ok()?.san()
}

/// Whether a nonblocking connect of `fd` finished (its outcome waits for
/// [`error`]) or none runs.
pub fn connect_settled(fd: RawFd) -> bool {
    sock(fd).is_ok_and(|s| s.connect_done())
}

/// An eventfd that is readable exactly while a send on SAN connection `fd`
/// would take bytes (or fail at once): for callers that wait for
/// "writable" (poll's POLLOUT). Made on the first call (then registered
/// with the daemon as the connection's FD_WRITE descriptor, after its event
/// descriptor); later calls return the same one. None if no SAN connection
/// serves `fd`.
pub fn watch_writable(fd: RawFd) -> Option<RawFd> {
    let s = sock(fd).ok()?;
    let c = s.conn.lock().unwrap_or_else(|e| e.into_inner());
    let c = c.as_ref()?;
    let ss = c.san.as_ref()?;
    if let Some(w) = c.wfd.get() {
        return Some(w.as_raw_fd());
    }
    let w = Arc::new(eventfd().ok()?);
    let copy = w.clone();
    let raw = w.as_raw_fd();
    let _ = c.wfd.set(w);
    if ss.readiness(false, true).writable {
        signal(raw);
    }
    let due = std::time::Instant::now() + REGISTER_AFTER;
    let job = Registration {
        ss: Arc::downgrade(ss),
        sock: Arc::downgrade(&s),
        fd: Some(copy),
        due,
    };
    queue_registration(job);
    Some(raw)
}

/// Called first on every thread the switch starts (set once, before the
/// switch is used): an interposing library marks its own threads with it.
static THREAD_HOOK: OnceLock<fn()> = OnceLock::new();

fn thread_hook() {
    if let Some(f) = THREAD_HOOK.get() {
        f();
    }
}

/// Sets the function every thread the switch starts calls first (once;
/// later calls change nothing).
pub fn set_thread_hook(f: fn()) {
    let _ = THREAD_HOOK.set(f);
}

/// Makes `fd`'s connects SAN-only: a SAN attempt that times out, finds only
/// a kernel TCP listener or cannot be set up fails (ETIMEDOUT,
/// ECONNREFUSED, or the provider's errno) instead of falling back to TCP.
///
/// # Errors
/// ENOTSOCK.
pub fn set_san_only(fd: RawFd, on: bool) -> Result<(), i32> {
    sock(fd)?.san_only.store(on, Ordering::Relaxed);
    Ok(())
}

/// Whether a connect to `ip` would try the SAN (a daemon answers and `ip`
/// is in one of its SAN subnets).
pub fn san_destination(ip: Ipv4Addr) -> bool {
    provider().is_some_and(|p| in_san_subnet(&p, ip))
}

/// Whether a receive on SAN connection `fd` would not block, checked on
/// the rings themselves: a poll-style caller's wake-up from the readiness
/// descriptor may be stale (an FD_READ posted for bytes read meanwhile).
/// A stale wake-up clears the descriptor (the next FD_READ sets it again).
/// True for a descriptor that is not a SAN connection.
pub fn readable_now(fd: RawFd) -> bool {
    input_now(fd).0
}

/// As [`readable_now`], and whether an urgent byte waits (POLLPRI: TCP's
/// out-of-band byte, which keeps the readiness descriptor set too).
pub fn input_now(fd: RawFd) -> (bool, bool) {
    match sock(fd) {
        Ok(s) => s.input_now(),
        Err(_) => (true, false),
    }
}

/// Whether the next byte to read on switch descriptor `fd`'s SAN
/// connection is its urgent byte (SIOCATMARK); None without one.
pub fn at_mark(fd: RawFd) -> Option<bool> {
    san_connection(fd).map(|ss| ss.readiness(false, false).at_mark)
}

/// As [`readable_now`], for sends and the FD_WRITE descriptor.
pub fn writable_now(fd: RawFd) -> bool {
    sock(fd).map_or(true, |s| s.writable_now())
}

/// Makes `listen` on `fd` take the SAN address over from the listener of
/// this process's parent `ppid` (a forked worker serving its parent's
/// listening socket; see [`inherited_listener`]).
///
/// # Errors
/// ENOTSOCK.
pub fn set_takeover(fd: RawFd, ppid: u32) -> Result<(), i32> {
    sock(fd)?.takeover.store(ppid, Ordering::Relaxed);
    Ok(())
}

/// The daemon's control socket, when set (else the provider's default:
/// `DSAN_SOCKET`, then `/run/dsan/dsand.sock`).
static DAEMON_SOCKET: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Sets the daemon's control socket for every attachment this process makes
/// from now on (once): an interposing library takes it from the
/// environment when it is loaded, as programs may clear their environment
/// later (nginx's workers keep only TZ).
pub fn set_daemon_socket(path: std::path::PathBuf) {
    let _ = DAEMON_SOCKET.set(path);
}
