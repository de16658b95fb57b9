//! Waiting on a mix of kernel and SAN descriptors: poll, ppoll, select,
//! pselect and epoll, by the kernel itself.
//!
//! What the kernel waits on for a switch socket:
//! * listening: the descriptor itself (its epoll instance is readable when
//!   a SAN or kernel TCP connection is ready to accept);
//! * connected over the SAN: the descriptor for "readable" (readable
//!   exactly while bytes or the end of the stream are there) and the
//!   switch's FD_WRITE eventfd for "writable";
//! * a nonblocking connect in progress: the descriptor (readable once the
//!   outcome is known; reported as POLLOUT, with POLLERR on failure);
//! * connected over kernel TCP (a fallback): the kernel socket.
//!
//! epoll registrations of SAN descriptors carry a tag in place of the
//! program's data (the program's data is kept here and put back in the
//! events it receives), so that a wake-up says which socket and which
//! direction; the top 16 bits of an epoll data word equal to [`TAG`] are
//! the library's.
#![allow(unsafe_code)] // the caller's pollfd, fd_set and epoll_event arrays: each block with a SAFETY comment

use crate::cret::errno;
use crate::real;
use crate::table::{self, PFd, State};
use libc::{c_int, epoll_event, pollfd};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The top 16 bits of the data of a tagged epoll registration.
const TAG: u64 = 0xd5a5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The kernel object itself, with the program's events and data.
    Plain,
    Read,
    Write,
    Connect,
}

/// What the kernel waits on for one direction of a switch socket.
fn targets(p: &PFd, fd: RawFd, want_in: bool, want_out: bool) -> Vec<(RawFd, Kind)> {
    p.settle();
    match p.app.state() {
        State::Listening => vec![(fd, Kind::Plain)],
        State::Connecting => vec![(fd, Kind::Connect)],
        // Reported at once by poll (see `immediate`).
        State::Idle => Vec::new(),
        State::Connected => {
            if p.san().is_none() {
                return p
                    .kernel()
                    .map_or_else(|_| vec![(fd, Kind::Read)], |k| vec![(k, Kind::Plain)]);
            }
            let mut v = Vec::new();
            if want_in {
                v.push((fd, Kind::Read));
            }
            if want_out {
                if let Some(w) = dsan_switch::watch_writable(p.sw()) {
                    v.push((w, Kind::Write));
                }
            }
            v
        }
    }
}

/// Whether `p` is a SAN connection a send on which would not block now.
fn writable_san(p: &PFd) -> bool {
    p.settle();
    p.app.state() == State::Connected
        && p.san().is_some_and(|ss| ss.readiness(false, true).writable)
}

/// The poll events of switch socket `p` that the kernel's wake-up of
/// target `kind` means, given what the program asked (`asked`: POLL* bits).
fn translate(p: &PFd, kind: Kind, fired: bool, asked: i16) -> i16 {
    let mut ev = 0i16;
    match kind {
        Kind::Plain => {}
        Kind::Connect => {
            if fired && p.settle() {
                ev |= libc::POLLOUT;
                if p.app.state() == State::Idle {
                    ev |= libc::POLLERR | libc::POLLHUP;
                }
            }
        }
        Kind::Read | Kind::Write => {
            // A stale wake-up (bytes read or room used up meanwhile) is
            // not passed on: kernel sockets do not report readiness that
            // is not there.
            let (fired, urgent) = if !fired {
                (false, false)
            } else if kind == Kind::Read {
                p.input_now()
            } else {
                (p.writable_now(), false)
            };
            if urgent {
                // TCP's out-of-band byte waits (POLLPRI).
                ev |= libc::POLLPRI;
            }
            if fired {
                ev |= if kind == Kind::Read {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                };
            }
            if p.app.state() == State::Idle {
                ev |= libc::POLLERR | libc::POLLHUP;
            } else if fired {
                if let Some(ss) = p.san() {
                    let r = ss.readiness(false, false);
                    if r.peer_closed {
                        ev |= libc::POLLRDHUP;
                    }
                    if r.dead {
                        ev |= libc::POLLHUP;
                        if r.error != 0 {
                            ev |= libc::POLLERR;
                        }
                    }
                }
            }
        }
    }
    ev & (asked | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL)
}

fn deadline(timeout_ms: c_int) -> Option<Instant> {
    (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64))
}

fn left(d: Option<Instant>) -> Option<libc::timespec> {
    d.map(|d| {
        let l = d.saturating_duration_since(Instant::now());
        libc::timespec {
            tv_sec: l.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(l.subsec_nanos() as i32),
        }
    })
}

/// poll / ppoll over program descriptors some of which are ours.
/// `until`: None waits for ever.
///
/// # Safety
/// `sigmask` is null or a valid signal set.
pub(crate) unsafe fn poll(
    fds: &mut [pollfd],
    until: Option<Instant>,
    sigmask: *const libc::sigset_t,
) -> c_int {
    /// What a socket whose connect failed reports at once, as the kernel's does.
    fn immediate(p: &PFd, asked: i16) -> i16 {
        if p.app.state() != State::Idle {
            return 0;
        }
        let mut ev = libc::POLLHUP | (asked & libc::POLLOUT);
        if p.app.so_error.load(Ordering::Acquire) != 0 {
            ev |= libc::POLLERR;
        }
        ev
    }
    struct Map {
        app: usize,
        kind: Kind,
        p: Option<Arc<PFd>>,
    }
    loop {
        let mut k: Vec<pollfd> = Vec::with_capacity(fds.len() + 4);
        let mut map: Vec<Map> = Vec::with_capacity(fds.len() + 4);
        let mut now_ready = false;
        for (i, f) in fds.iter_mut().enumerate() {
            f.revents = 0;
            match table::get(f.fd).and_then(|p| crate::sock::own(f.fd, p)) {
                None => {
                    k.push(*f);
                    map.push(Map {
                        app: i,
                        kind: Kind::Plain,
                        p: None,
                    });
                }
                Some(p) => {
                    f.revents = immediate(&p, f.events);
                    let want_in = f.events & (libc::POLLIN | libc::POLLRDHUP | libc::POLLPRI) != 0;
                    let mut want_out = f.events & libc::POLLOUT != 0;
                    if want_out && writable_san(&p) {
                        // Writable now, by the rings: no descriptor to wait on
                        // for it (a SAN connection gets its FD_WRITE
                        // descriptor only once it has to wait for room).
                        f.revents |= libc::POLLOUT;
                        want_out = false;
                    }
                    now_ready |= f.revents != 0;
                    for (t, kind) in targets(&p, f.fd, want_in, want_out) {
                        let events = if kind == Kind::Plain {
                            f.events
                        } else {
                            libc::POLLIN
                        };
                        k.push(pollfd {
                            fd: t,
                            events,
                            revents: 0,
                        });
                        map.push(Map {
                            app: i,
                            kind,
                            p: Some(p.clone()),
                        });
                    }
                }
            }
        }
        let ts = if now_ready {
            Some(libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            })
        } else {
            left(until)
        };
        // SAFETY: a valid array; `ts` and `sigmask` null or valid.
        let r = unsafe {
            real::ppoll()(
                k.as_mut_ptr(),
                k.len() as libc::nfds_t,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                sigmask,
            )
        };
        if r < 0 {
            return r;
        }
        for (kf, m) in k.iter().zip(&map) {
            let f = &mut fds[m.app];
            f.revents |= match (&m.p, m.kind) {
                (_, Kind::Plain) => kf.revents,
                (Some(p), kind) => translate(p, kind, kf.revents & libc::POLLIN != 0, f.events),
                (None, _) => 0,
            };
        }
        let n = fds.iter().filter(|f| f.revents != 0).count() as c_int;
        if n > 0 || r == 0 || until.is_some_and(|d| Instant::now() >= d) {
            return n;
        }
        // Only wake-ups that mean nothing to the program (a connect's
        // outcome it did not ask about): wait again.
    }
}

/// One epoll registration of a switch socket in a program's epoll instance.
struct Reg {
    ep: RawFd,
    fd: RawFd,
    events: u32,
    data: u64,
    p: Arc<PFd>,
    /// What the kernel holds for it: (descriptor, kind).
    installed: Vec<(RawFd, Kind)>,
}

struct Regs {
    next: usize,
    by_id: HashMap<usize, Reg>,
    by_key: HashMap<(RawFd, RawFd), usize>,
}

/// The registrations, in shards by epoll instance: threads that each wait
/// on an epoll instance of their own (wrk, nginx's workers, most event
/// loops) never contend for one lock, which on a small machine a preempted
/// holder would keep for a whole time slice. A registration's id carries
/// its shard in its low bits.
const SHARDS: usize = 16;
static REGS: [Mutex<Option<Regs>>; SHARDS] = [const { Mutex::new(None) }; SHARDS];
/// Registrations alive: epoll_wait translates nothing while there are none.
static LIVE: AtomicUsize = AtomicUsize::new(0);

type RegsGuard = std::sync::MutexGuard<'static, Option<Regs>>;

thread_local! {
    /// The registration shards, held by a forking thread across the fork.
    static FORK_REGS: std::cell::RefCell<Vec<RegsGuard>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Before a fork: takes every shard (in order), so that the child never
/// finds one held by a thread it does not have.
pub(crate) fn fork_prepare() {
    let gs: Vec<RegsGuard> = REGS
        .iter()
        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let _ = FORK_REGS.try_with(|c| *c.borrow_mut() = gs);
}

/// After a fork, in the parent and the child: releases what [`fork_prepare`] took.
pub(crate) fn fork_release() {
    let _ = FORK_REGS.try_with(|c| c.borrow_mut().clear());
}

/// The shard of epoll instance `ep`.
fn shard_of_ep(ep: RawFd) -> usize {
    ep as usize % SHARDS
}

/// Runs `f` on shard `shard` (of an epoll instance, or `id % SHARDS` of a
/// registration).
fn with_regs<T>(shard: usize, f: impl FnOnce(&mut Regs) -> T) -> T {
    let mut g = REGS[shard % SHARDS]
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Regs {
        next: 1,
        by_id: HashMap::new(),
        by_key: HashMap::new(),
    }))
}

const PASS_FLAGS: u32 = (libc::EPOLLET | libc::EPOLLONESHOT | libc::EPOLLEXCLUSIVE) as u32;

fn kind_bits(k: Kind) -> u64 {
    match k {
        Kind::Plain => 0,
        Kind::Read => 1,
        Kind::Write => 2,
        Kind::Connect => 3,
    }
}

fn ctl(ep: RawFd, op: c_int, fd: RawFd, events: u32, data: u64) -> Result<(), i32> {
    let mut ev = epoll_event { events, u64: data };
    // SAFETY: a valid event struct.
    if unsafe { real::epoll_ctl()(ep, op, fd, &mut ev) } < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn install(id: usize, r: &mut Reg) -> Result<(), i32> {
    let want_in = r.events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI) as u32 != 0;
    let want_out = r.events & libc::EPOLLOUT as u32 != 0;
    for (t, kind) in targets(&r.p, r.fd, want_in, want_out) {
        // EPOLLEXCLUSIVE cannot be set on an epoll instance (a switch
        // socket's descriptor); the kernel sockets take it.
        let on_epoll = t == r.fd && r.p.app.state() != State::Connected
            || matches!(kind, Kind::Read | Kind::Connect);
        let excl = if on_epoll {
            !(libc::EPOLLEXCLUSIVE as u32)
        } else {
            u32::MAX
        };
        let (events, data) = if kind == Kind::Plain {
            (r.events & excl, r.data)
        } else {
            (
                libc::EPOLLIN as u32 | (r.events & PASS_FLAGS & excl),
                (TAG << 48) | ((id as u64) << 2) | kind_bits(kind),
            )
        };
        match ctl(r.ep, libc::EPOLL_CTL_ADD, t, events, data) {
            Ok(()) => r.installed.push((t, kind)),
            Err(libc::EEXIST) if kind == Kind::Write => {}
            Err(e) => {
                uninstall(r);
                return Err(e);
            }
        }
    }
    Ok(())
}

fn uninstall(r: &mut Reg) {
    for (t, _) in r.installed.drain(..) {
        let _ = ctl(r.ep, libc::EPOLL_CTL_DEL, t, 0, 0);
    }
}

/// epoll_ctl for a switch socket.
pub(crate) fn epoll_ctl(
    ep: RawFd,
    op: c_int,
    fd: RawFd,
    p: &Arc<PFd>,
    ev: Option<epoll_event>,
) -> Result<(), i32> {
    let shard = shard_of_ep(ep);
    with_regs(shard, |rs| match op {
        libc::EPOLL_CTL_ADD => {
            let ev = ev.ok_or(libc::EFAULT)?;
            if rs.by_key.contains_key(&(ep, fd)) {
                return Err(libc::EEXIST);
            }
            let id = rs.next * SHARDS + shard;
            rs.next += 1;
            let mut r = Reg {
                ep,
                fd,
                events: ev.events,
                data: ev.u64,
                p: p.clone(),
                installed: Vec::new(),
            };
            install(id, &mut r)?;
            rs.by_id.insert(id, r);
            rs.by_key.insert((ep, fd), id);
            p.app
                .regs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
            LIVE.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        libc::EPOLL_CTL_MOD => {
            let ev = ev.ok_or(libc::EFAULT)?;
            let id = *rs.by_key.get(&(ep, fd)).ok_or(libc::ENOENT)?;
            let r = rs.by_id.get_mut(&id).expect("indexed");
            uninstall(r);
            r.events = ev.events;
            r.data = ev.u64;
            install(id, r)
        }
        libc::EPOLL_CTL_DEL => {
            let id = *rs.by_key.get(&(ep, fd)).ok_or(libc::ENOENT)?;
            drop_reg(rs, p, id, true);
            Ok(())
        }
        _ => Err(libc::EINVAL),
    })
}

/// Program descriptor `fd` of `p` is being closed: its registrations go
/// (the kernel would drop them with the descriptor's last reference, which
/// the switch holds).
pub(crate) fn forget(p: &PFd, fd: RawFd) {
    let ids: Vec<usize> = p.app.regs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for id in ids {
        with_regs(id, |rs| {
            if rs.by_id.get(&id).is_some_and(|r| r.fd == fd) {
                // A forked child shares the epoll instances with its parent:
                // closing its copy changes nothing there (as with a kernel
                // socket, still open in the parent).
                drop_reg(rs, p, id, !p.app.inherited());
            }
        });
    }
}

/// Registration `id` of `p` goes; with `kernel`, what the kernel holds for
/// it is removed from the epoll instance too.
fn drop_reg(rs: &mut Regs, p: &PFd, id: usize, kernel: bool) {
    if let Some(mut r) = rs.by_id.remove(&id) {
        rs.by_key.remove(&(r.ep, r.fd));
        if !kernel {
            r.installed.clear();
        }
        uninstall(&mut r);
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
    p.app
        .regs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|i| *i != id);
}

fn epoll_bits(poll: i16) -> u32 {
    let mut e = 0u32;
    for (p, b) in [
        (libc::POLLIN, libc::EPOLLIN),
        (libc::POLLOUT, libc::EPOLLOUT),
        (libc::POLLERR, libc::EPOLLERR),
        (libc::POLLHUP, libc::EPOLLHUP),
        (libc::POLLRDHUP, libc::EPOLLRDHUP),
    ] {
        if poll & p != 0 {
            e |= b as u32;
        }
    }
    e
}

fn poll_bits(ep: u32) -> i16 {
    let mut p = 0i16;
    for (b, q) in [
        (libc::EPOLLIN, libc::POLLIN),
        (libc::EPOLLOUT, libc::POLLOUT),
        (libc::EPOLLRDHUP, libc::POLLRDHUP),
        (libc::EPOLLPRI, libc::POLLPRI),
    ] {
        if ep & b as u32 != 0 {
            p |= q;
        }
    }
    p
}

/// Puts the program's data back into tagged events and says what they
/// mean; drops those that mean nothing to it. Returns how many remain.
fn translate_epoll(evs: &mut [epoll_event]) -> usize {
    let mut out = 0;
    // (index in the output, registration id) of translated events, to merge.
    let mut merged: Vec<(usize, usize)> = Vec::new();
    let mut refresh: Vec<Arc<PFd>> = Vec::new();
    for i in 0..evs.len() {
        let ev = evs[i];
        let data = ev.u64;
        if data >> 48 != TAG {
            evs[out] = ev;
            out += 1;
            continue;
        }
        let id = ((data & ((1 << 48) - 1)) >> 2) as usize;
        let kind = match data & 3 {
            1 => Kind::Read,
            2 => Kind::Write,
            _ => Kind::Connect,
        };
        let Some((p, asked, app_data)) = with_regs(id, |rs| {
            rs.by_id.get(&id).map(|r| (r.p.clone(), r.events, r.data))
        }) else {
            continue;
        };
        let before = p.app.state();
        let bits = epoll_bits(translate(&p, kind, true, poll_bits(asked)));
        if p.app.state() != before {
            refresh.push(p.clone());
        }
        if bits == 0 {
            continue;
        }
        if let Some(&(j, _)) = merged.iter().find(|(_, rid)| *rid == id) {
            evs[j].events |= bits;
            continue;
        }
        evs[out] = epoll_event {
            events: bits,
            u64: app_data,
        };
        merged.push((out, id));
        out += 1;
    }
    for p in refresh {
        // A connect finished: wait on the connection's own targets now.
        let ids: Vec<usize> = p.app.regs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for id in ids {
            with_regs(id, |rs| {
                if let Some(r) = rs.by_id.get_mut(&id) {
                    uninstall(r);
                    let _ = install(id, r);
                }
            });
        }
    }
    out
}

/// epoll_wait / epoll_pwait.
///
/// # Safety
/// `evs` points to `max` writable events; `sigmask` is null or valid.
pub(crate) unsafe fn epoll_wait(
    ep: RawFd,
    evs: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    let until = deadline(timeout);
    let wait = || {
        let t = match until {
            None => -1,
            Some(d) => {
                let l = d.saturating_duration_since(Instant::now());
                l.as_millis().min(c_int::MAX as u128) as c_int
                    + c_int::from(l.subsec_nanos() % 1_000_000 != 0)
            }
        };
        // SAFETY: the caller's buffer and mask.
        unsafe { real::epoll_pwait()(ep, evs, max, t, sigmask) }
    };
    // SAFETY: `wait` fills at most `max` events of the caller's buffer.
    unsafe { wait_translated(evs, until, wait) }
}

/// epoll_pwait2: as [`epoll_wait`], until `until` (None: for ever), the
/// kernel's own wait given the time left to the nanosecond.
///
/// # Safety
/// `evs` points to `max` writable events; `sigmask` is null or valid.
pub(crate) unsafe fn epoll_wait_until(
    ep: RawFd,
    evs: *mut epoll_event,
    max: c_int,
    until: Option<Instant>,
    sigmask: *const libc::sigset_t,
) -> c_int {
    let wait = || {
        let ts = left(until);
        // SAFETY: the caller's buffer and mask; `ts` null or valid.
        unsafe {
            real::epoll_pwait2()(
                ep,
                evs,
                max,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                sigmask,
            )
        }
    };
    // SAFETY: `wait` fills at most `max` events of the caller's buffer.
    unsafe { wait_translated(evs, until, wait) }
}

/// The kernel's wait (`wait`, which fills `evs`), again until an event
/// means something to the program or `until` passes; the events of switch
/// sockets translated.
///
/// # Safety
/// `wait` fills at most its return value of events of `evs`.
unsafe fn wait_translated(
    evs: *mut epoll_event,
    until: Option<Instant>,
    mut wait: impl FnMut() -> c_int,
) -> c_int {
    loop {
        let n = wait();
        if n <= 0 || LIVE.load(Ordering::Relaxed) == 0 {
            return n;
        }
        // SAFETY: the kernel filled `n` events of the caller's buffer.
        let slice = unsafe { std::slice::from_raw_parts_mut(evs, n as usize) };
        let m = translate_epoll(slice);
        if m > 0 || until.is_some_and(|d| Instant::now() >= d) {
            return m as c_int;
        }
    }
}

/// The poll timeout of a select's timeval, as a deadline.
pub(crate) fn until_ms(timeout_ms: c_int) -> Option<Instant> {
    deadline(timeout_ms)
}
