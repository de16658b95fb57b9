//! Thin wrappers over the few Linux calls the engine needs (the eventfd and
//! ppoll helpers are the channel crate's, re-exported).
#![allow(unsafe_code)]

pub use dsan_channel::sys::{wait_readable, EventFd};

/// Resets the calling thread's CPU affinity to every CPU the machine has
/// (threads spawned by an EAL lcore inherit its single-core mask otherwise).
pub fn unpin_current_thread() {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    for cpu in 0..n.min(libc::CPU_SETSIZE as usize) {
        // SAFETY: cpu < CPU_SETSIZE, so CPU_SET stays inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 means this thread; the set is valid for its size.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}
