//! What the application side's C ABIs (the provider's, `capi`, and the
//! switch's) share: the panic boundary every exported function runs behind,
//! and the checks on the buffers and address slots C callers hand in.
#![allow(unsafe_code)] // raw pointers from C callers: each block with a SAFETY comment

use crate::sockaddr::sockaddr_in;
use crate::Error;
use std::ffi::{c_int, c_void};
use std::net::SocketAddrV4;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// An error a C function returns as a negative errno.
pub trait Errno {
    /// The (positive) errno.
    fn errno(&self) -> i32;
}

impl Errno for Error {
    fn errno(&self) -> i32 {
        Error::errno(self)
    }
}

/// A bare errno.
impl Errno for i32 {
    fn errno(&self) -> i32 {
        *self
    }
}

/// Runs `f` behind a panic boundary: its value, or a negative errno (-EIO
/// for a panic, which never crosses into C).
pub fn guard<E: Errno>(f: impl FnOnce() -> Result<c_int, E>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => -e.errno(),
        Err(_) => -libc::EIO,
    }
}

/// [`guard`] for calls that return a byte count.
pub fn guard_size<E: Errno>(f: impl FnOnce() -> Result<usize, E>) -> libc::ssize_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => libc::ssize_t::try_from(v).unwrap_or(libc::ssize_t::MAX),
        Ok(Err(e)) => -(e.errno() as libc::ssize_t),
        Err(_) => -(libc::EIO as libc::ssize_t),
    }
}

/// The `len` bytes at `buf` a caller hands in to be read.
///
/// # Errors
/// [`Error::Fault`] for NULL with a length.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes that stay valid and
/// unchanged for `'a`.
pub unsafe fn bytes<'a>(buf: *const c_void, len: usize) -> Result<&'a [u8], Error> {
    if len == 0 {
        Ok(&[])
    } else if buf.is_null() {
        Err(Error::Fault)
    } else {
        // SAFETY: non-NULL and `len` readable bytes, as the caller promises.
        Ok(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) })
    }
}

/// The `len` bytes at `buf` a caller hands in to be written.
///
/// # Errors
/// [`Error::Fault`] for NULL with a length.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes that nothing else reads
/// or writes for `'a`.
pub unsafe fn bytes_mut<'a>(buf: *mut c_void, len: usize) -> Result<&'a mut [u8], Error> {
    if len == 0 {
        Ok(&mut [])
    } else if buf.is_null() {
        Err(Error::Fault)
    } else {
        // SAFETY: non-NULL and `len` writable bytes, as the caller promises.
        Ok(unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) })
    }
}

/// Checks, before the call does anything, that a peer address asked for
/// (`peer` not NULL) has a length slot with room for a `sockaddr_in`.
///
/// # Errors
/// [`Error::Fault`] for a NULL `peer_len`; [`Error::Inval`] for too little room.
///
/// # Safety
/// `peer_len` is NULL or valid to read.
pub unsafe fn peer_room(
    peer: *mut libc::sockaddr,
    peer_len: *const libc::socklen_t,
) -> Result<(), Error> {
    if peer.is_null() {
        return Ok(());
    }
    if peer_len.is_null() {
        return Err(Error::Fault);
    }
    // SAFETY: non-NULL, as the caller promises it valid.
    if (unsafe { *peer_len } as usize) < std::mem::size_of::<libc::sockaddr_in>() {
        return Err(Error::Inval);
    }
    Ok(())
}

/// Writes `a` and its length where [`peer_room`] approved (nothing for a
/// NULL `peer`).
///
/// # Safety
/// [`peer_room`] returned Ok for these pointers, which are still valid.
pub unsafe fn put_peer(peer: *mut libc::sockaddr, peer_len: *mut libc::socklen_t, a: SocketAddrV4) {
    if peer.is_null() {
        return;
    }
    // SAFETY: `peer` has room for a sockaddr_in and `peer_len` is valid,
    // as `peer_room` checked.
    unsafe {
        std::ptr::write_unaligned(peer.cast::<libc::sockaddr_in>(), sockaddr_in(a));
        *peer_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    }
}
