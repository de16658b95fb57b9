//! `struct sockaddr_in` to and from `SocketAddrV4`, for the C ABIs (the
//! provider's and the switch's).
#![allow(unsafe_code)]

use crate::Error;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Reads an IPv4 socket address from C.
///
/// # Errors
/// [`Error::Fault`] for NULL; [`Error::Inval`] for a short length or another family.
///
/// # Safety
/// `addr` is NULL or points to `len` readable bytes.
pub unsafe fn read_sockaddr_in(
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Result<SocketAddrV4, Error> {
    if addr.is_null() {
        return Err(Error::Fault);
    }
    if (len as usize) < std::mem::size_of::<libc::sockaddr_in>() {
        return Err(Error::Inval);
    }
    // SAFETY: non-NULL and at least sizeof(sockaddr_in) bytes, per the caller.
    let sin = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
    if i32::from(sin.sin_family) != libc::AF_INET {
        return Err(Error::Inval);
    }
    Ok(from_sockaddr_in(&sin))
}

/// The `sockaddr_in` of an address.
pub fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The address of a `sockaddr_in`.
pub fn from_sockaddr_in(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}
