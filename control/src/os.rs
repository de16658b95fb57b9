//! The few OS calls the control plane needs: entering a network namespace,
//! reading interface addresses, checking privileges.
#![allow(unsafe_code)]

use dataplane::node::Lineage;
use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Of process `pid` (from `/proc/PID/status`): whether its effective
/// capabilities hold CAP_NET_BIND_SERVICE, and its parent's pid (0 if
/// unknown).
pub fn proc_caps(pid: u32) -> (bool, u32) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (false, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_string)
    };
    let caps = field("CapEff:")
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0);
    let ppid = field("PPid:").and_then(|p| p.parse().ok()).unwrap_or(0);
    // linux/capability.h: CAP_NET_BIND_SERVICE is bit 10.
    const CAP_NET_BIND_SERVICE: u32 = 10;
    (caps & (1 << CAP_NET_BIND_SERVICE) != 0, ppid)
}

/// Who the process at the other end of the unix socket `sock` is and whose
/// child, proven with pidfds where the kernel has them (`SO_PEERPIDFD`,
/// Linux 6.5; `pidfd_open` otherwise) and pidfs (Linux 6.9: a pidfd's inode
/// number names its process uniquely for the boot, so a recycled pid never
/// matches). Also whether it holds CAP_NET_BIND_SERVICE. `pid` is the
/// peer's pid from SO_PEERCRED.
pub fn peer_lineage(sock: i32, pid: u32) -> (bool, Lineage) {
    let me = peer_pidfd(sock).or_else(|_| pidfd_open(pid));
    let (low_ports, ppid) = proc_caps(pid);
    let mut l = Lineage {
        ppid,
        ..Lineage::default()
    };
    let Ok(me) = me else {
        return (low_ports, l);
    };
    // The status just read is this process's only if it is still alive
    // (else the pid may name another process by now).
    if !pidfd_alive(&me) {
        return (false, Lineage::default());
    }
    l.ino = pidfs_ino(&me);
    if ppid == 0 {
        return (low_ports, l);
    }
    // The parent's pidfd names the parent only if the child still has that
    // parent after it was opened (a parent that died in between would have
    // reparented the child, and its pid might be someone else's by then).
    if let Ok(parent) = pidfd_open(ppid) {
        if proc_caps(pid).1 == ppid && pidfd_alive(&me) {
            l.parent_ino = pidfs_ino(&parent);
        }
    }
    (low_ports, l)
}

/// The pidfd of a unix socket's peer (SO_PEERPIDFD).
fn peer_pidfd(fd: i32) -> io::Result<OwnedFd> {
    // asm-generic/socket.h (x86_64, aarch64 and most others).
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-parameters of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    };
    if r != 0 || pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open(pid, 0) takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Whether the process of a pidfd has not exited (signal 0).
fn pidfd_alive(fd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal(fd, 0, NULL, 0): no pointers read.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    // EPERM: alive, but ours to signal it is not (another user's parent).
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A pidfd's inode number if it lives in pidfs (unique per process for the
/// boot); `None` on kernels whose pidfds share one anonymous inode.
fn pidfs_ino(fd: &OwnedFd) -> Option<u64> {
    const PIDFS_MAGIC: i64 = 0x5049_4446;
    // SAFETY: zeroed plain C structs as out-parameters.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-parameter.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 || fs.f_type as i64 != PIDFS_MAGIC {
        return None;
    }
    // SAFETY: zeroed plain C struct as out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(st.st_ino)
}

/// Raises this process's soft descriptor limit to its hard limit; returns
/// the limit now in force.
///
/// # Errors
/// If the limits cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(r.rlim_cur)
}

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

/// The supplementary groups of the peer of Unix socket `fd`, as they were
/// when it connected (SO_PEERGROUPS).
///
/// # Errors
/// If the kernel cannot tell.
pub fn peer_groups(fd: std::os::fd::RawFd) -> io::Result<Vec<u32>> {
    // asm-generic/socket.h (x86_64, aarch64): not in the libc crate.
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: a valid out-buffer of the announced length.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` says how much room it needs.
        if e.raw_os_error() == Some(libc::ERANGE) && (len as usize / 4) > groups.len() {
            groups.resize(len as usize / 4, 0);
            continue;
        }
        return Err(e);
    }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

/// The kernel TCP ports listening in this network namespace on an address
/// IPv4 hosts can reach (the wildcard, a non-loopback address, or an IPv6
/// socket on `::` or a v4-mapped address, which takes IPv4 connections),
/// from NETLINK_SOCK_DIAG dumps of the sockets in state LISTEN.
///
/// # Errors
/// If the netlink socket cannot be opened or the kernel answers with an error.
pub fn tcp_listening_ports() -> io::Result<Vec<u16>> {
    TcpListenerScan::new()?.ports()
}

/// The TCP sockets hashed in this network namespace (listening and
/// connected, IPv4 and IPv6), from /proc/net/sockstat and sockstat6: a
/// cheap sign that the listeners may have changed. The files stay open;
/// a count costs one `pread` each.
#[derive(Debug)]
pub struct TcpSocketCount {
    files: Vec<(std::fs::File, &'static str)>,
}

impl TcpSocketCount {
    /// Opens the two files.
    ///
    /// # Errors
    /// If either cannot be opened.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            files: vec![
                (std::fs::File::open("/proc/net/sockstat")?, "TCP:"),
                (std::fs::File::open("/proc/net/sockstat6")?, "TCP6:"),
            ],
        })
    }

    /// The count now, if the files read as expected.
    pub fn get(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        let mut buf = [0u8; 1024];
        for (f, key) in &self.files {
            let len = f.read_at(&mut buf, 0).ok()?;
            let text = std::str::from_utf8(&buf[..len]).ok()?;
            let line = text.lines().find(|l| l.starts_with(key))?;
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inuse")?;
            n += words.next()?.parse::<u64>().ok()?;
        }
        Some(n)
    }
}

/// A reusable sock_diag scan for [`tcp_listening_ports`]: one netlink
/// socket and one buffer for every scan (dsand scans ten times a second).
#[derive(Debug)]
pub struct TcpListenerScan {
    sock: std::os::fd::OwnedFd,
    buf: Vec<u8>,
    seq: u32,
    /// Whether the kernel takes the older TCPDIAG_GETSOCK dump, which
    /// walks the listening table once for both families (the table is
    /// sized by the machine's memory: a walk costs tens of microseconds).
    compat: bool,
}

impl TcpListenerScan {
    /// A scanner.
    ///
    /// # Errors
    /// If the netlink socket cannot be created.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a fresh descriptor we own.
            sock: unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            buf: vec![0u8; 32 * 1024],
            seq: 0,
            compat: true,
        })
    }

    /// The ports with a kernel TCP listener reachable from outside (IPv4,
    /// the wildcard or dual-stack `[::]`), sorted, once each.
    ///
    /// # Errors
    /// As the netlink calls; the scanner should then be replaced (a dump
    /// may be left half read).
    pub fn ports(&mut self) -> io::Result<Vec<u16>> {
        let mut v: Vec<u16> = self.listeners()?.into_iter().map(|(p, _)| p).collect();
        v.dedup();
        Ok(v)
    }

    /// The kernel TCP listeners reachable from outside, as (port, owner
    /// uid), sorted (a port may appear once per uid).
    ///
    /// # Errors
    /// As [`ports`](Self::ports).
    pub fn listeners(&mut self) -> io::Result<Vec<(u16, u32)>> {
        if self.compat {
            match self.listening(None) {
                Ok(mut v) => {
                    v.sort_unstable();
                    v.dedup();
                    return Ok(v);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(_) => self.compat = false,
            }
        }
        let mut v = self.listening(Some(libc::AF_INET))?;
        v.extend(self.listening(Some(libc::AF_INET6))?);
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// One dump: of `family` (inet_diag_req_v2), or of both families in
    /// one walk (`None`: the older inet_diag_req, which the kernel answers
    /// for every family).
    fn listening(&mut self, family: Option<i32>) -> io::Result<Vec<(u16, u32)>> {
        const TCPDIAG_GETSOCK: u16 = 18;
        const SOCK_DIAG_BY_FAMILY: u16 = 20;
        const TCP_LISTEN: u32 = 10;
        let sock = &self.sock;
        self.seq = self.seq.wrapping_add(1);
        let mut req = [0u8; 76];
        let len = match family {
            // nlmsghdr (16) + inet_diag_req_v2 (56): family, protocol, ext,
            // pad, states, then a zero socket id (48 bytes).
            Some(f) => {
                req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
                req[16] = f as u8;
                req[17] = libc::IPPROTO_TCP as u8;
                req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
                72
            }
            // nlmsghdr (16) + inet_diag_req (60): family, src_len, dst_len,
            // ext, a zero socket id (48), states, dbs.
            None => {
                req[4..6].copy_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
                req[16] = libc::AF_INET as u8;
                req[68..72].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
                76
            }
        };
        req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // SAFETY: a valid socket and a buffer of at least `len` bytes.
        if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), len, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ports = Vec::new();
        let buf = &mut self.buf;
        loop {
            // SAFETY: a valid socket and a writable buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut msgs = &buf[..n as usize];
            if msgs.is_empty() {
                return Ok(ports);
            }
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
                if len < 16 || len > msgs.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                match i32::from(kind) {
                    libc::NLMSG_DONE => return Ok(ports),
                    libc::NLMSG_ERROR => {
                        let e = msgs
                            .get(16..20)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        return Err(io::Error::from_raw_os_error(-e));
                    }
                    _ => {
                        // inet_diag_msg: family, state, timer, retrans, then the
                        // socket id: sport (be16), dport, src[4] (be32), ...
                        let m = &msgs[16..len];
                        if m.len() >= 24 && m[1] as u32 == TCP_LISTEN {
                            let port = u16::from_be_bytes([m[4], m[5]]);
                            let src = if i32::from(m[0]) == libc::AF_INET6 {
                                let a: [u8; 16] = m[8..24].try_into().expect("16 bytes");
                                let a = std::net::Ipv6Addr::from(a);
                                if a.is_unspecified() {
                                    Some(Ipv4Addr::UNSPECIFIED)
                                } else {
                                    a.to_ipv4_mapped()
                                }
                            } else {
                                Some(Ipv4Addr::new(m[8], m[9], m[10], m[11]))
                            };
                            // inet_diag_msg: after the socket id (48
                            // bytes from offset 4) come expires, rqueue,
                            // wqueue, then the owner's uid.
                            let uid = m.get(64..68).map_or(u32::MAX, |b| {
                                u32::from_ne_bytes(b.try_into().expect("4 bytes"))
                            });
                            if src.is_some_and(|s| !s.is_loopback()) {
                                ports.push((port, uid));
                            }
                        }
                    }
                }
                let step = len.div_ceil(4) * 4;
                msgs = msgs.get(step..).unwrap_or(&[]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_peers_lineage_names_its_parent_by_pidfd() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("dsan-lineage-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        // A child that connects and waits for us to close.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)",
            ])
            .arg(&dir)
            .spawn()
            .unwrap();
        l.set_nonblocking(false).unwrap();
        let (c, _) = l.accept().unwrap();
        let (pid, _, _) = super::peer_cred(c.as_raw_fd()).unwrap();
        assert_eq!(pid, child.id());
        let (_, theirs) = super::peer_lineage(c.as_raw_fd(), pid);
        // Our own, through the same path (a socket pair's peer is ourselves).
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_, ours) = super::peer_lineage(a.as_raw_fd(), std::process::id());
        assert_eq!(theirs.ppid, std::process::id());
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (6, 9) {
            assert!(ours.ino.is_some(), "pidfs on Linux {release}");
        }
        if ours.ino.is_some() {
            assert!(theirs.ino.is_some() && theirs.parent_ino == ours.ino);
            assert_ne!(theirs.ino, ours.ino);
        }
        assert!(theirs.child_of(std::process::id(), &ours));
        // Not the child of another process, nor of itself.
        assert!(!theirs.child_of(pid, &theirs));
        // Our pid, but another process's identity (a recycled pid): refused
        // where pidfs tells processes apart.
        if let Some(ino) = ours.ino {
            let impostor = super::Lineage {
                ino: Some(ino ^ 1),
                ..ours
            };
            assert!(!theirs.child_of(std::process::id(), &impostor));
        }
        // Closing lets the child's recv end, and the child exit.
        drop(c);
        child.wait().unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn sees_a_kernel_tcp_listener() {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lo_port = lo.local_addr().unwrap().port();
        let ports = super::tcp_listening_ports().unwrap();
        assert!(ports.contains(&port), "{port} not in {ports:?}");
        assert!(
            !ports.contains(&lo_port),
            "a loopback-only listener is not reachable"
        );
    }

    #[test]
    fn sees_a_dual_stack_listener() {
        // `[::]` takes IPv4 connections too (iperf3 listens so by default);
        // `[::1]` does not.
        let Ok(l) = std::net::TcpListener::bind("[::]:0") else {
            return; // no IPv6 in this kernel
        };
        let port = l.local_addr().unwrap().port();
        let lo = std::net::TcpListener::bind("[::1]:0").unwrap();
        let lo_port = lo.local_addr().unwrap().port();
        let ports = super::tcp_listening_ports().unwrap();
        assert!(ports.contains(&port), "{port} not in {ports:?}");
        assert!(!ports.contains(&lo_port), "{lo_port} in {ports:?}");
    }
}
