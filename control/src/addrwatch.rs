//! Following the host's addresses: rtnetlink notifications (address and
//! link changes) instead of reading the interfaces on a timer. The messages
//! are parsed with `netlink-packet-route`.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;

/// A subscription to the kernel's IPv4 address and link notifications.
pub struct AddrWatch {
    sock: Socket,
}

/// What a batch of notifications said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An IPv4 address or a link was added, removed or changed.
    Addresses,
    /// Notifications were lost (the socket's buffer overflowed): read
    /// everything again.
    Overrun,
}

impl AddrWatch {
    /// Subscribes (in the calling thread's network namespace).
    ///
    /// # Errors
    /// If the netlink socket cannot be opened or bound.
    pub fn new() -> io::Result<AddrWatch> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, 0))?;
        sock.add_membership(libc::RTNLGRP_IPV4_IFADDR)?;
        sock.add_membership(libc::RTNLGRP_LINK)?;
        Ok(AddrWatch { sock })
    }

    /// Blocks until the kernel reports an address or link change.
    ///
    /// # Errors
    /// A receive error other than a lost-notification overrun.
    pub fn wait(&self) -> io::Result<Change> {
        loop {
            let buf = match self.sock.recv_from_full() {
                Ok((buf, _)) => buf,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Change::Overrun),
                Err(e) => return Err(e),
            };
            if changes(&buf) {
                return Ok(Change::Addresses);
            }
        }
    }
}

/// Whether a datagram of rtnetlink messages reports an address or link change.
fn changes(mut buf: &[u8]) -> bool {
    let mut any = false;
    while !buf.is_empty() {
        let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else {
            // Not understood: read the addresses again rather than miss a change.
            return true;
        };
        let len = (m.header.length as usize).max(16);
        if let NetlinkPayload::InnerMessage(inner) = m.payload {
            any |= matches!(
                inner,
                RouteNetlinkMessage::NewAddress(_)
                    | RouteNetlinkMessage::DelAddress(_)
                    | RouteNetlinkMessage::NewLink(_)
                    | RouteNetlinkMessage::DelLink(_)
            );
        }
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_read_as_a_change_never_a_panic() {
        assert!(changes(&[1, 2, 3]));
        assert!(!changes(&[]));
    }
}
