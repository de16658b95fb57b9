//! Closing a program descriptor that is ours (close, or a dup2/dup3 onto
//! it): its record and epoll registrations go first, then the switch socket
//! with its last descriptor.
#![allow(unsafe_code)] // the C library's close: each block with a SAFETY comment

use crate::cret::{errno, set_errno};
use crate::real;
use crate::table;
use crate::wait;
use libc::c_int;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

/// `close` of a program descriptor that is ours.
pub(crate) fn close(fd: RawFd) -> c_int {
    // SAFETY: plain call.
    close_as(fd, || unsafe { real::close()(fd) })
}

/// Program descriptor `fd` is closed by the kernel call `op` (close, or a
/// dup2/dup3 onto it): if it is ours, its record and epoll registrations go
/// first, and the switch socket closes with its last descriptor. Returns
/// what `op` returned, with its errno.
pub(crate) fn close_as(fd: RawFd, op: impl FnOnce() -> c_int) -> c_int {
    let Some(p) = table::remove(fd) else {
        return op();
    };
    wait::forget(&p, fd);
    if p.sw() == fd {
        // A lean socket, which the switch knows by this number: it lets go
        // of the number before the program's call closes it.
        if p.app.refs.fetch_sub(1, Ordering::AcqRel) > 1 {
            // The program keeps a duplicate: the socket goes by that now.
            if let Some(m) = table::other_number(&p, fd) {
                let _ = dsan_switch::renumber(fd, m);
            }
        } else if p.app.inherited() {
            dsan_switch::release_inherited(fd);
        } else {
            let _ = dsan_switch::close(fd);
        }
        return op();
    }
    let r = op();
    let e = errno();
    let last = p.app.refs.fetch_sub(1, Ordering::AcqRel) == 1;
    if last && !p.app.inherited() {
        let _ = dsan_switch::close(p.sw());
    } else if last {
        // The parent's connection, never used here: the child lets go of
        // its copies (the parent's close then ends it).
        dsan_switch::release_inherited(p.sw());
    }
    set_errno(e);
    r
}
