//! The few OS calls the control plane needs: entering a network namespace,
//! reading interface addresses, checking privileges.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`).
/// Call before spawning threads: they inherit it.
///
/// # Errors
/// If the namespace does not exist or `setns` fails.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {name:?} ({path}): {e}"),
        )
    })?;
    // SAFETY: a valid namespace fd that outlives the call.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One IPv4 address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

/// IPv4 addresses of `iface` (empty if it has none), or `None` if the
/// interface does not exist.
pub fn iface_addrs(iface: &str) -> Option<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = false;
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if name == iface {
            found = true;
            if !ifa.ifa_addr.is_null() && !ifa.ifa_netmask.is_null() {
                // SAFETY: ifa_addr points to a sockaddr of at least the family field.
                let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
                if fam == libc::AF_INET {
                    // SAFETY: the family says both are sockaddr_in.
                    let (a, m) = unsafe {
                        (
                            *(ifa.ifa_addr as *const libc::sockaddr_in),
                            *(ifa.ifa_netmask as *const libc::sockaddr_in),
                        )
                    };
                    out.push(IfAddr {
                        addr: Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        prefix: u32::from_be(m.sin_addr.s_addr).count_ones() as u8,
                    });
                }
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    if found || interface_exists(iface) {
        Some(out)
    } else {
        None
    }
}

/// Whether a network interface of that name exists in this thread's network
/// namespace (sysfs would show the namespace it was mounted in instead).
pub fn interface_exists(iface: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Whether the process may open raw packet sockets (root or CAP_NET_RAW).
pub fn can_use_raw_sockets() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    effective_caps()
        .map(|c| c & (1 << 13) != 0)
        .unwrap_or(false)
}

fn effective_caps() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<u32> {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the set has the size we pass.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .map(|i| i as u32)
        .collect()
}

/// The system host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The peer's credentials on a Unix socket: (pid, uid, gid).
///
/// # Errors
/// As `getsockopt(SO_PEERCRED)`.
pub fn peer_cred(fd: std::os::fd::RawFd) -> io::Result<(u32, u32, u32)> {
    // SAFETY: ucred is plain data.
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid out-buffer of the announced length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((c.pid as u32, c.uid, c.gid))
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}
