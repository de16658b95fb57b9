//! The C calling convention of the interposed calls: errno, and a result
//! as a value or -1 with errno set.
#![allow(unsafe_code)] // errno, the calling thread's: each block with a SAFETY comment

use libc::c_int;

/// The calling thread's errno.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A kernel call's result: the value, or its errno.
pub(crate) fn kernel_result(r: c_int) -> Result<c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Sets errno.
pub(crate) fn set_errno(e: i32) {
    // SAFETY: the calling thread's errno location.
    unsafe { *libc::__errno_location() = e };
}

/// A C return value: `Ok(v)` as is, `Err(e)` as -1 with errno `e`.
pub(crate) fn ret<T: From<i8>>(r: Result<T, i32>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            set_errno(e);
            T::from(-1)
        }
    }
}
