//! SAN sockets passed in `SCM_RIGHTS` messages (over a Unix socket, to
//! another process or to this one).
//!
//! The program's descriptor for a SAN connection is the switch's; a copy
//! of it in another process serves nothing by itself. So the sender's
//! `sendmsg` appends, after the program's descriptors, each passed
//! connection's *life* (the write end of the pipe whose holders keep the
//! connection, see `docs/architecture.md`, "Sockets shared across fork")
//! and a sealed memfd, the *marker*, that says which of the program's
//! descriptors each life belongs to and what its socket recorded (the
//! connection's ticket). The life keeps the connection while the message
//! is in flight, also when the sender closes its descriptor at once; a
//! message never received closes its lives with it, and the connection
//! then ends with its last holder.
//!
//! The receiver's `recvmsg` reads with room for those descriptors, takes
//! them out again (the program sees exactly what it would with TCP), and
//! for each passed connection asks the daemon for the connection its life
//! names (the typed request `life_key`: holding the life is the proof) and claims
//! it into a switch socket in the received descriptor's place.
//!
//! Only the two ends of the message need the preload; nothing else of the
//! message changes, and the kernel joins several `SCM_RIGHTS` blocks of one
//! message into one, so the appended block arrives after the program's.
#![allow(unsafe_code)] // control messages, exec and spawn arguments: each block with a SAFETY comment

use crate::real;
use crate::sock::{self, PassInfo};
use libc::{c_char, c_int, cmsghdr, msghdr, ssize_t};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The marker's first bytes.
const MAGIC: &[u8; 8] = b"DSANSCM1";
/// The marker's seals (a program's own memfd is unlikely to have exactly
/// these and the magic).
const SEALS: c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
/// Bytes of one marker entry: the program descriptor's index in the
/// message, the life's index, IPv6, three spare, the ticket.
const ENTRY: usize = 12 + dsan_provider::TICKET_BYTES;
/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// A receive's control buffer on the stack (room for the program's and
/// [`MAX_FDS`] descriptors more), in 8-byte words.
const STACK_WORDS: usize = 512;

/// The descriptors of an `SCM_RIGHTS` block.
///
/// # Safety
/// `c` is a control message of a live message header.
unsafe fn fds_of(c: *const cmsghdr) -> Vec<RawFd> {
    // SAFETY: the caller's control message: its header and its data.
    let (len, data) = unsafe { ((*c).cmsg_len, libc::CMSG_DATA(c)) };
    // SAFETY: plain arithmetic.
    let n = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize) / 4;
    (0..n)
        // SAFETY: within the control message's data.
        .map(|i| unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) })
        .collect()
}

fn is_rights(c: &cmsghdr) -> bool {
    c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS
}

/// Interposed `sendmsg` on a descriptor that is not a SAN socket: SAN
/// connections among the descriptors it passes travel with their lives and
/// the marker.
///
/// # Safety
/// The caller's arguments.
pub(crate) unsafe fn send_msg(fd: c_int, m: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let plain = || unsafe { real::sendmsg()(fd, m, flags) };
    // SAFETY: null or the caller's header.
    let Some(h) = (unsafe { m.as_ref() }) else {
        return plain();
    };
    if h.msg_control.is_null() || h.msg_controllen == 0 {
        return plain();
    }
    // The library's own messages (its daemon's control socket) pass as
    // they are.
    let Some(_in) = crate::table::enter() else {
        return plain();
    };
    let mut passed = Vec::new(); // (index in the message, fd)
    let mut k = 0;
    // SAFETY: the caller's header and its control messages.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(h) };
    while !c.is_null() {
        // SAFETY: as above.
        if is_rights(unsafe { &*c }) {
            // SAFETY: as above.
            for f in unsafe { fds_of(c) } {
                if crate::table::maybe_ours(f) {
                    passed.push((k, f));
                }
                k += 1;
            }
        }
        // SAFETY: as above.
        c = unsafe { libc::CMSG_NXTHDR(h, c) };
    }
    let infos: Vec<(usize, PassInfo)> = passed
        .into_iter()
        .filter_map(|(i, f)| sock::pass_info(f).map(|x| (i, x)))
        .collect();
    if infos.is_empty() || k + infos.len() + 1 > MAX_FDS {
        return plain();
    }
    let entries: Vec<Entry> = infos
        .iter()
        .enumerate()
        .map(|(j, (i, (_, ticket, v6)))| (*i as u32, (k + j) as u32, ticket.to_vec(), *v6))
        .collect();
    let Some(marker) = marker(&entries, false) else {
        return plain();
    };
    let extra: Vec<RawFd> = infos
        .iter()
        .map(|(_, (life, _, _))| *life)
        .chain([marker.as_raw_fd()])
        .collect();
    // The program's control messages as they are, then one more block.
    let own = h.msg_controllen;
    let at = (own + 7) & !7;
    // SAFETY: plain arithmetic.
    let more = unsafe { libc::CMSG_SPACE((extra.len() * 4) as u32) } as usize;
    let mut buf = vec![0u64; (at + more).div_ceil(8)];
    let bytes = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: the program's control bytes into a buffer at least as long.
    unsafe { std::ptr::copy_nonoverlapping(h.msg_control.cast::<u8>(), bytes, own) };
    // SAFETY: the block's header and data lie within `buf` (CMSG_SPACE).
    unsafe {
        let c = bytes.add(at).cast::<cmsghdr>();
        (*c).cmsg_len = libc::CMSG_LEN((extra.len() * 4) as u32) as _;
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        let d = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, f) in extra.iter().enumerate() {
            std::ptr::write_unaligned(d.add(i), *f);
        }
    }
    let mut copy = *h;
    copy.msg_control = buf.as_mut_ptr().cast();
    copy.msg_controllen = (at + more) as _;
    // SAFETY: the caller's header with our control buffer, alive here.
    unsafe { real::sendmsg()(fd, &copy, flags) }
}

/// One entry of a marker: the program's descriptor and the connection's
/// life (in a message, their indices among its descriptors; across exec,
/// their numbers), the socket's ticket, IPv6.
type Entry = (u32, u32, Vec<u8>, bool);

/// A sealed memfd holding `entries` (close-on-exec unless `exec`: then it
/// is for the program that an exec starts).
fn marker(entries: &[Entry], exec: bool) -> Option<OwnedFd> {
    let mut b = Vec::with_capacity(12 + ENTRY * entries.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, l, ticket, v6) in entries {
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&l.to_le_bytes());
        b.extend_from_slice(&[u8::from(*v6), 0, 0, 0]);
        b.extend_from_slice(ticket);
    }
    let flags = libc::MFD_ALLOW_SEALING | if exec { 0 } else { libc::MFD_CLOEXEC };
    // SAFETY: a constant name; flags the kernel knows.
    let m = unsafe { libc::memfd_create(c"dsan-scm".as_ptr(), flags) };
    if m < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let m = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: our buffer; a descriptor we own.
    let w = unsafe { libc::pwrite(m.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
    // SAFETY: F_ADD_SEALS with an int argument.
    let sealed = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } == 0;
    (w == b.len() as isize && sealed).then_some(m)
}

/// The entries of marker `fd`; None if `fd` is not one.
fn entries(fd: RawFd) -> Option<Vec<Entry>> {
    // SAFETY: F_GET_SEALS has no argument (EINVAL on anything but a memfd).
    if unsafe { libc::fcntl(fd, libc::F_GET_SEALS) } != SEALS {
        return None;
    }
    let mut b = vec![0u8; 12 + ENTRY * MAX_FDS];
    // SAFETY: our buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), b.len(), 0) };
    let b = b.get(..usize::try_from(n).ok()?)?;
    if b.get(..8)? != MAGIC {
        return None;
    }
    let count = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    (0..count)
        .map(|j| {
            let e = b.get(12 + j * ENTRY..12 + (j + 1) * ENTRY)?;
            Some((
                u32::from_le_bytes(e[0..4].try_into().ok()?),
                u32::from_le_bytes(e[4..8].try_into().ok()?),
                e[12..].to_vec(),
                e[8] == 1,
            ))
        })
        .collect()
}

/// The passed connections a received block of descriptors `fds` carries,
/// if its last one is a marker: (program descriptor, life, ticket, IPv6)
/// each, and how many of `fds` are the program's.
fn read_marker(fds: &[RawFd]) -> Option<(Vec<Entry>, usize)> {
    let (&last, rest) = fds.split_last()?;
    let e = entries(last)?;
    let mine = rest.len().checked_sub(e.len())?;
    e.into_iter()
        .enumerate()
        .map(|(j, (i, l, ticket, v6))| {
            let (i, l) = (i as usize, l as usize);
            (i < mine && l == mine + j).then(|| (rest[i] as u32, rest[l] as u32, ticket, v6))
        })
        .collect::<Option<Vec<Entry>>>()
        .map(|v| (v, mine))
}

/// Interposed `recvmsg` on a descriptor that is not a SAN socket, with a
/// control buffer: read with room for the descriptors a sender appended,
/// take them out, claim the connections they name, and give the program
/// the control messages as the kernel would have (cut to its buffer, with
/// MSG_CTRUNC and the descriptors that do not fit closed).
///
/// # Safety
/// The caller's arguments.
pub(crate) unsafe fn recv_msg(fd: c_int, m: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let plain = || unsafe { real::recvmsg()(fd, m, flags) };
    // SAFETY: null or the caller's header.
    let Some(h) = (unsafe { m.as_mut() }) else {
        return plain();
    };
    if h.msg_control.is_null() || h.msg_controllen == 0 {
        return plain();
    }
    let Some(_in) = crate::table::enter() else {
        return plain();
    };
    let want = h.msg_controllen;
    // SAFETY: plain arithmetic.
    let room = want + unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    // On the stack when it fits (every recvmsg with a control buffer comes
    // here, a UDP server's among them: no allocation for those).
    let mut stack = [std::mem::MaybeUninit::<u64>::uninit(); STACK_WORDS];
    let mut heap = Vec::new();
    let buf: &mut [std::mem::MaybeUninit<u64>] = if room.div_ceil(8) <= STACK_WORDS {
        &mut stack
    } else {
        heap.resize(room.div_ceil(8), std::mem::MaybeUninit::uninit());
        &mut heap
    };
    let mut copy = *h;
    copy.msg_control = buf.as_mut_ptr().cast();
    copy.msg_controllen = (buf.len() * 8) as _;
    // SAFETY: the caller's header with our control buffer, alive here.
    let r = unsafe { real::recvmsg()(fd, &mut copy, flags) };
    if r < 0 {
        return r;
    }
    h.msg_namelen = copy.msg_namelen;
    h.msg_flags = copy.msg_flags;
    let out = h.msg_control.cast::<u8>();
    let mut used = 0usize;
    // SAFETY: plain arithmetic.
    let head = unsafe { libc::CMSG_LEN(0) } as usize;
    // SAFETY: our header and the control messages the kernel wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&copy) };
    while !c.is_null() {
        // SAFETY: as above.
        let ch = unsafe { *c };
        let left = want.saturating_sub(used);
        if is_rights(&ch) {
            // SAFETY: as above.
            let mut fds = unsafe { fds_of(c) };
            if let Some((passed, mine)) = read_marker(&fds) {
                for &f in &fds[mine..] {
                    if !passed.iter().any(|(_, l, _, _)| *l as RawFd == f) {
                        // SAFETY: the marker, ours alone.
                        unsafe { libc::close(f) };
                    }
                }
                for (f, life, ticket, v6) in passed {
                    // SAFETY: a life the message gave us, ours alone.
                    let life = unsafe { OwnedFd::from_raw_fd(life as RawFd) };
                    sock::take_passed(f as RawFd, life, &ticket, v6);
                }
                fds.truncate(mine);
            }
            let fit = (left.saturating_sub(head) / 4).min(fds.len());
            for &f in &fds[fit..] {
                // SAFETY: descriptors the program cannot be given.
                unsafe { libc::close(f) };
            }
            if fit < fds.len() {
                h.msg_flags |= libc::MSG_CTRUNC;
            }
            if fit > 0 {
                // SAFETY: within the program's buffer (`fit` fds fit in `left`).
                unsafe {
                    let o = out.add(used);
                    let hdr = cmsghdr {
                        cmsg_len: libc::CMSG_LEN((fit * 4) as u32) as _,
                        cmsg_level: libc::SOL_SOCKET,
                        cmsg_type: libc::SCM_RIGHTS,
                    };
                    std::ptr::write_unaligned(o.cast::<cmsghdr>(), hdr);
                    let d = o.add(head).cast::<RawFd>();
                    for (i, f) in fds[..fit].iter().enumerate() {
                        std::ptr::write_unaligned(d.add(i), *f);
                    }
                    used += (libc::CMSG_SPACE((fit * 4) as u32) as usize).min(left);
                }
            }
        } else {
            let len = ch.cmsg_len;
            if len <= left {
                // SAFETY: `len` bytes of the kernel's message into the
                // program's buffer, which has room for them.
                unsafe { std::ptr::copy_nonoverlapping(c.cast::<u8>(), out.add(used), len) };
                // SAFETY: plain arithmetic.
                let space = unsafe { libc::CMSG_SPACE((len - head) as u32) } as usize;
                used += space.min(left);
            } else {
                h.msg_flags |= libc::MSG_CTRUNC;
            }
        }
        // SAFETY: our header and the control messages the kernel wrote.
        c = unsafe { libc::CMSG_NXTHDR(&copy, c) };
    }
    h.msg_controllen = used as _;
    r
}

/// Runs `exec` (an exec or a spawn of the C library) with environment
/// `envp`, or with the one [`for_exec`] makes when SAN connections go
/// along; the copies it made are closed again when `exec` returns (the
/// exec failed, or a spawn started its program).
///
/// # Safety
/// As [`for_exec`]; `exec` is the caller's call.
pub(crate) unsafe fn with_kept(
    envp: *const *const c_char,
    in_child: bool,
    exec: impl FnOnce(*const *const c_char) -> c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    let kept = unsafe { for_exec(envp, in_child) };
    exec(kept.as_ref().map_or(envp, Exec::env))
}

/// The environment variable that names the marker an exec hands over.
const KEPT: &str = "DSAN_INHERITED";

/// What an exec takes along for the SAN connections that stay open across
/// it: the environment to start the program with (the caller's, with
/// [`KEPT`] naming the marker), and the copies of the lives and the marker
/// (not close-on-exec: the new program inherits them; closed here again if
/// the exec fails).
struct Exec {
    env: Vec<*const c_char>,
    _strings: Vec<CString>,
    _fds: Vec<OwnedFd>,
}

impl Exec {
    /// The environment to pass (NULL-terminated).
    fn env(&self) -> *const *const c_char {
        self.env.as_ptr()
    }
}

/// Before an exec that starts a program with environment `envp`: None when
/// no SAN connection stays open across it (the common case, found with a
/// look at the descriptor bitmap and no allocation, so that it is safe in
/// a vfork child). Otherwise each connection gets a life (made now if it
/// has none), a copy of it that the new program inherits, and an entry in
/// a marker the new program finds through [`KEPT`] ([`adopt_kept`]). The
/// old program's attachment goes with the exec (its control socket is
/// close-on-exec); the connections then wait as orphans, held by their
/// lives, until the new program claims them.
///
/// `in_child`: called in the process that execs (a forked child); else
/// in a parent that spawns (`posix_spawn`), whose own descriptors must not
/// change (a connection over kernel TCP then goes along as the switch's
/// descriptor, not as its kernel socket).
///
/// # Safety
/// `envp` is null or a NULL-terminated array of C strings.
unsafe fn for_exec(envp: *const *const c_char, in_child: bool) -> Option<Exec> {
    if !crate::table::any() {
        return None;
    }
    let _in = crate::table::enter()?;
    let kept: Vec<RawFd> = crate::table::all()
        .into_iter()
        // SAFETY: F_GETFD has no argument.
        .filter(|fd| unsafe { real::fcntl()(*fd, libc::F_GETFD, 0) } == 0)
        .collect();
    let mut fds = Vec::new();
    let mut copies: Vec<(RawFd, u32)> = Vec::new(); // life -> its copy
    let mut es: Vec<Entry> = Vec::new();
    for fd in kept {
        let Some((life, ticket, v6)) = sock::pass_info(fd) else {
            if in_child {
                sock::kernel_for_exec(fd);
            }
            continue;
        };
        let copy = match copies.iter().find(|(l, _)| *l == life) {
            Some((_, c)) => *c,
            None => {
                // SAFETY: F_DUPFD with an int argument: not close-on-exec.
                let c = unsafe { real::fcntl()(life, libc::F_DUPFD, 0) };
                if c < 0 {
                    continue;
                }
                // SAFETY: a fresh descriptor nobody else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(c) });
                copies.push((life, c as u32));
                c as u32
            }
        };
        es.push((fd as u32, copy, ticket.to_vec(), v6));
    }
    if es.is_empty() {
        return None;
    }
    let m = marker(&es, true)?;
    let var = CString::new(format!("{KEPT}={}", m.as_raw_fd())).ok()?;
    fds.push(m);
    let mut env: Vec<*const c_char> = Vec::new();
    let mut e = envp;
    // SAFETY: the caller's NULL-terminated array of C strings.
    while !e.is_null() && unsafe { !(*e).is_null() } {
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(*e) };
        if !s.to_bytes().starts_with(KEPT.as_bytes()) {
            // SAFETY: as above.
            env.push(unsafe { *e });
        }
        // SAFETY: as above (not past the NULL).
        e = unsafe { e.add(1) };
    }
    env.push(var.as_ptr());
    env.push(std::ptr::null());
    Some(Exec {
        env,
        _strings: vec![var],
        _fds: fds,
    })
}

/// Whether descriptor `fd` is open.
fn open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no argument.
    unsafe { real::fcntl()(fd, libc::F_GETFD, 0) >= 0 }
}

/// When the library is loaded: the SAN connections a program that exec'd
/// this one kept open (see [`for_exec`]) are this program's, claimed on
/// their first use. Descriptors of one connection (duplicates) share one
/// socket. Nothing if [`KEPT`] names no marker.
pub(crate) fn adopt_kept() {
    let Some(v) = std::env::var_os(KEPT) else {
        return;
    };
    // Not for the programs this one starts.
    std::env::remove_var(KEPT);
    let Some(m) = v.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
        return;
    };
    let Some(es) = entries(m) else {
        return;
    };
    // SAFETY: the marker, ours alone.
    unsafe { libc::close(m) };
    let mut lives: Vec<u32> = es.iter().map(|e| e.1).collect();
    lives.sort_unstable();
    lives.dedup();
    for life in lives {
        let group: Vec<&Entry> = es
            .iter()
            .filter(|e| e.1 == life && open(e.0 as RawFd))
            .collect();
        let life = life as RawFd;
        // SAFETY: F_SETFD with an int argument, on a descriptor the marker
        // says is ours.
        let own = unsafe { real::fcntl()(life, libc::F_SETFD, libc::FD_CLOEXEC as usize) } == 0;
        if group.is_empty() || !own {
            continue;
        }
        let first = group[0];
        let p = crate::table::kept(
            crate::table::Passed {
                // SAFETY: the life's copy the old program made for us.
                life: unsafe { OwnedFd::from_raw_fd(life) },
                ticket: first.2.clone(),
                v6: first.3,
            },
            group.len(),
        );
        for e in group {
            crate::table::insert(e.0 as RawFd, p.clone());
        }
    }
}
