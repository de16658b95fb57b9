//! Socket options of SAN connections that have no kernel socket (lean
//! sockets, `dsan_switch::adopt_lean`): each costs the program one
//! descriptor, so its options are kept here instead of in a kernel socket
//! of its own.
//!
//! * An option the program sets is first set on a throw-away kernel socket
//!   of the same family (so that it is refused exactly as the kernel
//!   refuses it), read back from there (so that it reads back as the
//!   kernel reports it: SO_RCVBUF doubled, TCP_CONGESTION as a name) and
//!   kept as those bytes.
//! * An option read is answered from what was kept, else from a kernel
//!   socket of the family that nothing ever changes (the defaults: one per
//!   family and process).
//! * A client's kernel socket, released once the SAN connection is made,
//!   leaves the options the program set on it here first: each option
//!   below that differs from the default is kept. Only sockets the program
//!   set options on pay for that look ([`mark`]).
#![allow(unsafe_code)] // the caller's option buffers: each block with a SAFETY comment

use crate::cret::errno;
use crate::real;
use crate::table::PFd;
use dsan_switch::app::{carry_from, defaults, family, keep, linger_abort, read_opt};
use libc::{c_int, socklen_t};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors (below this) the program set an option on before they
/// became ours: one bit each.
const BITS: usize = 1 << 16;
static TOUCHED: [AtomicU64; BITS / 64] = [const { AtomicU64::new(0) }; BITS / 64];

fn bit(fd: RawFd) -> Option<(usize, u64)> {
    let i = usize::try_from(fd).ok()?;
    (i < BITS).then(|| (i / 64, 1u64 << (i % 64)))
}

/// The program set an option on `fd` (not ours).
pub(crate) fn mark(fd: RawFd) {
    if let Some((w, b)) = bit(fd) {
        TOUCHED[w].fetch_or(b, Ordering::Relaxed);
    }
}

/// Whether the program set an option on `fd` since its socket was made
/// (and forgets it). A number it cannot tell about counts as set.
pub(crate) fn take_mark(fd: RawFd) -> bool {
    match bit(fd) {
        Some((w, b)) => TOUCHED[w].fetch_and(!b, Ordering::Relaxed) & b != 0,
        None => true,
    }
}

/// A new socket is at `fd`: nothing set on it yet.
pub(crate) fn clear(fd: RawFd) {
    let _ = take_mark(fd);
}

fn new_socket(fam: c_int) -> Result<OwnedFd, i32> {
    // SAFETY: plain call.
    let k = unsafe { real::socket()(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if k < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(k) })
}

/// Listener `l` (which has its kernel socket): what the program set on it
/// (the options above that differ from the defaults) is kept, for the
/// connections it accepts over the SAN to start with, as the kernel's
/// accepted sockets start with their listener's options. Nothing unless the
/// program set an option on it.
pub(crate) fn keep_for_accepted(l: &PFd) {
    if !l.app.opts_set.load(Ordering::Relaxed) {
        return;
    }
    let Ok(k) = l.kernel() else {
        return;
    };
    l.app.opts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    carry_from(l, k);
}

/// A connection that listener `l` accepted over the SAN (`c`, no kernel
/// socket) starts with the options kept for it ([`keep_for_accepted`]).
pub(crate) fn inherit(l: &PFd, c: &PFd) {
    let kept = l.app.opts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if kept.is_empty() {
        return;
    }
    let abort = kept
        .iter()
        .any(|(lv, n, v)| (*lv, *n) == (libc::SOL_SOCKET, libc::SO_LINGER) && linger_abort(v));
    if abort {
        let _ = dsan_switch::set_linger_abort(c.sw(), true);
    }
    *c.app.opts.lock().unwrap_or_else(|e| e.into_inner()) = kept;
}

/// `getsockopt` of a socket without a kernel socket.
///
/// # Safety
/// `val` and `len` are the caller's out-parameters.
pub(crate) unsafe fn get(
    p: &PFd,
    level: c_int,
    name: c_int,
    val: *mut libc::c_void,
    len: *mut socklen_t,
) -> Result<c_int, i32> {
    let kept = {
        let o = p.app.opts.lock().unwrap_or_else(|e| e.into_inner());
        o.iter()
            .find(|(l, n, _)| *l == level && *n == name)
            .map(|e| e.2.clone())
    };
    let Some(v) = kept else {
        let d = defaults(family(p))?;
        // SAFETY: the caller's parameters, passed on.
        return crate::cret::kernel_result(unsafe { real::getsockopt()(d, level, name, val, len) });
    };
    if val.is_null() || len.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller's out-parameters; at most *len bytes written.
    unsafe {
        if (*len as i32) < 0 {
            return Err(libc::EINVAL);
        }
        let n = (*len as usize).min(v.len());
        std::ptr::copy_nonoverlapping(v.as_ptr(), val.cast::<u8>(), n);
        *len = n as socklen_t;
    }
    Ok(0)
}

/// `setsockopt` of a socket without a kernel socket.
///
/// # Safety
/// `val` points to `len` readable bytes (or is null).
pub(crate) unsafe fn set(
    p: &PFd,
    level: c_int,
    name: c_int,
    val: *const libc::c_void,
    len: socklen_t,
) -> Result<c_int, i32> {
    let k = new_socket(family(p))?;
    // SAFETY: the caller's parameters, passed on to a socket of our own.
    crate::cret::kernel_result(unsafe {
        real::setsockopt()(k.as_raw_fd(), level, name, val, len)
    })?;
    // (An option that cannot be read back is accepted and not kept.)
    if let Some(v) = read_opt(k.as_raw_fd(), level, name) {
        if level == libc::SOL_SOCKET && name == libc::SO_LINGER {
            let _ = dsan_switch::set_linger_abort(p.sw(), linger_abort(&v));
        }
        keep(p, level, name, v);
    }
    Ok(0)
}
