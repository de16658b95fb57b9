//! Typed messages between an application and the daemon.
//!
//! Every message travels in one 64-byte ring slot ([`crate::ring::Slot`]),
//! little-endian, in the style of the SAN frames (`core/src/wire`): a
//! view over bytes ([`CommandView`], [`RequestView`]) with one byte range per
//! field, and a plain value ([`Command`], [`Request`]) whose `parse` checks
//! everything and whose `emit` is the only writer. The daemon copies a slot
//! out of shared memory once, parses the copy, and counts what it rejects by
//! [`ParseError::reason`].
//!
//! ## Application -> daemon: commands (the process's command ring)
//!
//! | bytes | field |
//! |---|---|
//! | 0 | kind: 1 listen, 2 decide, 3 connect, 4 close, 5 event-select, 6 kick, 7 abort, 8 claim |
//! | 1..4 | reserved, 0 |
//! | 4..8 | socket (index into the socket table, < [`MAX_SOCKETS`]) |
//! | 8..12 | sequence number the completion carries back |
//! | 12..16 | reserved, 0 |
//! | 16..64 | the kind's arguments, below; unused bytes 0 |
//!
//! * listen: 16..20 IPv4 (0 = any), 20..22 port (not 0), 22..24 backlog area
//!   (< [`MAX_LISTENERS`]), 24..28 backlog (i32;
//!   <= 0 or huge: the maximum), 28 send ring size and 29 receive ring size of
//!   the connections it accepts (log2, 12..=20; 0: the default);
//! * decide: 16..24 connection id, 24..28 peer IPv4, 28..30 peer port,
//!   30 verdict (0 accept, 1 reject), 31 reserved, 32..36 the new socket
//!   (accept only, else 0);
//! * connect: 16..20 destination IPv4 (not 0), 20..22 port (not 0), 22 flags
//!   (bit 0: nonblocking; others reserved), 23 reserved, 24..28 source IPv4
//!   (0: chosen by the daemon), 28 send and 29 receive ring size (as listen);
//! * close: no arguments;
//! * event-select: 16..20 event mask (only [`FD_ALL`] bits);
//! * kick: no arguments: the socket's stream has news (bytes to send, a
//!   shutdown, consumed bytes that free credit). Never completed.
//! * abort: no arguments (a close that resets a connection);
//! * claim: 16..24 the attachment holding the connection, 24..28 its
//!   socket (< [`MAX_SOCKETS`]), 28..32
//!   reserved, 32..40 the connection's claim key (read from that socket's
//!   stream block: proof of holding its process's region, as a forked child
//!   does): the connection's rings move into this socket (which must be
//!   free, or be that very socket, handed away earlier).
//!
//! ## Daemon -> application: connection requests (a listener's backlog ring)
//!
//! | bytes | field |
//! |---|---|
//! | 0 | kind: 0x81 |
//! | 1..4 | reserved, 0 |
//! | 4..8 | peer IPv4 |
//! | 8..10 | peer port |
//! | 10..12 | local port |
//! | 12..16 | local IPv4 |
//! | 16..24 | connection id |
//! | 24..32 | expiry: CLOCK_MONOTONIC nanoseconds after which the daemon has dropped it (0: none) |
//! | 32..64 | reserved, 0 |
//!
//! The answer to a request names it by [`RequestKey`] (peer address and
//! connection id), never by its position in the ring.

use crate::region::{FD_ALL, MAX_LISTENERS, MAX_SOCKETS};
use crate::ring::{Slot, SLOT};
use crate::stream::size_from_log2;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Why a slot is not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The kind byte names no message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A reserved byte or bit is not zero.
    #[error("reserved bits set")]
    Reserved,
    /// The socket index is out of range.
    #[error("socket out of range")]
    Socket,
    /// An argument is out of range (named).
    #[error("{0} out of range")]
    Field(&'static str),
}

impl ParseError {
    /// The label under which the daemon counts it.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::UnknownKind(_) => "unknown_kind",
            ParseError::Reserved => "reserved",
            ParseError::Socket => "socket",
            ParseError::Field(_) => "field",
        }
    }
}

/// Every reason [`ParseError::reason`] can give, in a fixed order (for counters).
pub const PARSE_REASONS: [&str; 4] = ["unknown_kind", "reserved", "socket", "field"];

impl ParseError {
    /// Index of [`ParseError::reason`] in [`PARSE_REASONS`].
    pub fn index(&self) -> usize {
        match self {
            ParseError::UnknownKind(_) => 0,
            ParseError::Reserved => 1,
            ParseError::Socket => 2,
            ParseError::Field(_) => 3,
        }
    }
}

mod field {
    use std::ops::Range;
    pub(super) const KIND: usize = 0;
    pub(super) const RESERVED_HEAD: Range<usize> = 1..4;
    pub(super) const SOCK: Range<usize> = 4..8;
    pub(super) const SEQ: Range<usize> = 8..12;
    pub(super) const RESERVED_SEQ: Range<usize> = 12..16;
    pub(super) const ARGS: usize = 16;
    // request
    pub(super) const PEER_IP: Range<usize> = 4..8;
    pub(super) const PEER_PORT: Range<usize> = 8..10;
    pub(super) const LOCAL_PORT: Range<usize> = 10..12;
    pub(super) const LOCAL_IP: Range<usize> = 12..16;
    pub(super) const CONN_ID: Range<usize> = 16..24;
    pub(super) const EXPIRES: Range<usize> = 24..32;
    pub(super) const REQ_RESERVED: Range<usize> = 32..64;
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

/// Command kinds.
pub mod kind {
    /// Listen.
    pub const LISTEN: u8 = 1;
    /// Decide on a connection request.
    pub const DECIDE: u8 = 2;
    /// Connect.
    pub const CONNECT: u8 = 3;
    /// Close.
    pub const CLOSE: u8 = 4;
    /// Event-select.
    pub const EVENT_SELECT: u8 = 5;
    /// Kick a stream.
    pub const KICK: u8 = 6;
    /// Close with a reset (SO_LINGER {1, 0}).
    pub const ABORT: u8 = 7;
    /// Claim a connection another socket holds (a forked child's copy).
    pub const CLAIM: u8 = 8;
    /// A connection request in a backlog ring.
    pub const REQUEST: u8 = 0x81;
}

/// Defines a view over a slot's bytes: `new_checked`, the kind byte.
macro_rules! slot_view {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name<T: AsRef<[u8]>>(T);

        impl<T: AsRef<[u8]>> $name<T> {
            /// A view of a buffer of at least [`SLOT`] bytes.
            ///
            /// # Errors
            /// [`ParseError::Field`] if the buffer is shorter.
            pub fn new_checked(b: T) -> Result<Self, ParseError> {
                if b.as_ref().len() < SLOT {
                    return Err(ParseError::Field("length"));
                }
                Ok(Self(b))
            }
            fn b(&self) -> &[u8] {
                self.0.as_ref()
            }
            /// The kind byte.
            pub fn kind(&self) -> u8 {
                self.b()[field::KIND]
            }
        }
    };
}

slot_view!(
    /// A view of a command slot (fields as bytes; see the module table).
    CommandView
);
slot_view!(
    /// A view of a request slot.
    RequestView
);

impl<T: AsRef<[u8]>> CommandView<T> {
    /// The socket index.
    pub fn sock(&self) -> u32 {
        u32_at(self.b(), field::SOCK.start)
    }
    /// The sequence number.
    pub fn seq(&self) -> u32 {
        u32_at(self.b(), field::SEQ.start)
    }
    /// Argument bytes (16..64).
    pub fn args(&self) -> &[u8] {
        &self.b()[field::ARGS..SLOT]
    }
}

/// The request a decision answers (the protocol core's vocabulary).
pub use dsan_core::proto::RequestKey;

/// The accepting side's verdict on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accept into the new socket.
    Accept {
        /// The application's socket for the connection.
        new_sock: u32,
    },
    /// Refuse (the peer sees ECONNREFUSED).
    Reject,
}

/// What a command asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Listen on `addr` with a backlog of `backlog`, in backlog area `area`.
    Listen {
        /// Address (0.0.0.0: every SAN address) and port (not 0).
        addr: SocketAddrV4,
        /// Requested backlog (<= 0 or huge: the maximum).
        backlog: i32,
        /// Backlog area of the region.
        area: u16,
        /// Ring sizes of accepted connections.
        bufs: Bufs,
        /// 0, or the pid of this process's parent: a process forked after its
        /// parent listened takes the address over from the parent's listener
        /// (which then gets no more requests), and a later sibling joins the
        /// one that did (requests go to the workers in turn), so that every
        /// forked worker serves SAN clients.
        takeover: u32,
        /// SO_REUSEPORT: a listener of another process of the same user on
        /// the same address that set it too is joined (requests go to the
        /// listeners in turn), as the kernel groups TCP listeners.
        reuse_port: bool,
    },
    /// Answer the request `key` that arrived on this listener.
    Decide {
        /// Which request.
        key: RequestKey,
        /// The peer's port (informational; the key names the request).
        peer_port: u16,
        /// The answer.
        verdict: Verdict,
    },
    /// Connect to `dst`.
    Connect {
        /// Destination.
        dst: SocketAddrV4,
        /// Source address (None: the daemon chooses).
        src: Option<Ipv4Addr>,
        /// Source port (0: the daemon chooses one; the application's own
        /// bind reserved it in the kernel).
        src_port: u16,
        /// Report the outcome as FD_CONNECT instead of completing the command.
        nonblocking: bool,
        /// Ring sizes of the connection.
        bufs: Bufs,
    },
    /// Close whatever the socket is.
    Close,
    /// Close, resetting a connection (the peer sees ECONNRESET; unsent
    /// bytes are dropped), as a close with SO_LINGER {1, 0} does on TCP.
    /// On anything but a connection, the same as [`Op::Close`].
    Abort,
    /// Select which events signal the socket's registered eventfd.
    EventSelect {
        /// FD_* bits.
        mask: u32,
    },
    /// The socket's stream has news (see [`crate::stream`]).
    Kick,
    /// Serve the connection that socket `from_sock` of attachment
    /// `from_app` holds through this socket from now on: its rings move
    /// here, and the holder keeps a claim on it (the connection ends when
    /// the last holder closes it, as a TCP socket shared across fork does).
    Claim {
        /// The attachment holding it.
        from_app: u64,
        /// Its socket there.
        from_sock: u32,
        /// The connection's claim key ([`crate::stream::StreamShm::claim_key`]).
        key: u64,
    },
}

/// A connection's ring sizes, in bytes (powers of two in range; see
/// [`crate::stream::ring_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bufs {
    /// Send ring.
    pub snd: usize,
    /// Receive ring.
    pub rcv: usize,
}

impl Default for Bufs {
    fn default() -> Self {
        Bufs {
            snd: crate::stream::DEFAULT_RING,
            rcv: crate::stream::DEFAULT_RING,
        }
    }
}

impl Bufs {
    fn parse(a: &[u8]) -> Result<Bufs, ParseError> {
        match (size_from_log2(a[0]), size_from_log2(a[1])) {
            (Some(snd), Some(rcv)) => Ok(Bufs { snd, rcv }),
            _ => Err(ParseError::Field("ring size")),
        }
    }
    fn emit(&self, a: &mut [u8]) {
        a[0] = crate::stream::size_log2(self.snd);
        a[1] = crate::stream::size_log2(self.rcv);
    }
}

/// A command, application -> daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// The socket it concerns.
    pub sock: u32,
    /// Carried back by the completion.
    pub seq: u32,
    /// What it asks.
    pub op: Op,
}

impl Command {
    /// Parses and checks a slot.
    ///
    /// # Errors
    /// See [`ParseError`].
    pub fn parse(slot: &Slot) -> Result<Command, ParseError> {
        let v = CommandView::new_checked(&slot[..])?;
        let b = v.b();
        if !zero(&b[field::RESERVED_HEAD]) || !zero(&b[field::RESERVED_SEQ]) {
            return Err(ParseError::Reserved);
        }
        let sock = v.sock();
        if sock as usize >= MAX_SOCKETS {
            return Err(ParseError::Socket);
        }
        let a = v.args(); // argument offsets below are relative to byte 16
        let used = |n: usize| -> Result<(), ParseError> {
            if zero(&a[n..]) {
                Ok(())
            } else {
                Err(ParseError::Reserved)
            }
        };
        let op = match v.kind() {
            kind::LISTEN => {
                used(20)?;
                if a[14] > 1 || a[15] != 0 {
                    return Err(ParseError::Reserved);
                }
                let port = u16_at(a, 4);
                let area = u16_at(a, 6);
                if port == 0 {
                    return Err(ParseError::Field("port"));
                }
                if usize::from(area) >= MAX_LISTENERS {
                    return Err(ParseError::Field("area"));
                }
                Op::Listen {
                    addr: SocketAddrV4::new(Ipv4Addr::from(u32_at(a, 0)), port),
                    backlog: u32_at(a, 8) as i32,
                    area,
                    bufs: Bufs::parse(&a[12..14])?,
                    takeover: u32_at(a, 16),
                    reuse_port: a[14] == 1,
                }
            }
            kind::DECIDE => {
                used(20)?;
                if a[15] != 0 {
                    return Err(ParseError::Reserved);
                }
                let new_sock = u32_at(a, 16);
                let verdict = match a[14] {
                    0 if (new_sock as usize) < MAX_SOCKETS => Verdict::Accept { new_sock },
                    0 => return Err(ParseError::Field("new socket")),
                    1 if new_sock == 0 => Verdict::Reject,
                    1 => return Err(ParseError::Reserved),
                    _ => return Err(ParseError::Field("verdict")),
                };
                Op::Decide {
                    key: RequestKey {
                        conn_id: u64_at(a, 0),
                        peer_ip: Ipv4Addr::from(u32_at(a, 8)),
                    },
                    peer_port: u16_at(a, 12),
                    verdict,
                }
            }
            kind::CONNECT => {
                used(16)?;
                let ip = Ipv4Addr::from(u32_at(a, 0));
                let port = u16_at(a, 4);
                if port == 0 || ip.is_unspecified() {
                    return Err(ParseError::Field("destination"));
                }
                if a[6] & !1 != 0 || a[7] != 0 {
                    return Err(ParseError::Reserved);
                }
                let src = Ipv4Addr::from(u32_at(a, 8));
                Op::Connect {
                    dst: SocketAddrV4::new(ip, port),
                    src: (!src.is_unspecified()).then_some(src),
                    src_port: u16_at(a, 14),
                    nonblocking: a[6] & 1 == 1,
                    bufs: Bufs::parse(&a[12..14])?,
                }
            }
            kind::CLOSE => {
                used(0)?;
                Op::Close
            }
            kind::KICK => {
                used(0)?;
                Op::Kick
            }
            kind::ABORT => {
                used(0)?;
                Op::Abort
            }
            kind::CLAIM => {
                used(24)?;
                if !zero(&a[12..16]) {
                    return Err(ParseError::Reserved);
                }
                let from_sock = u32_at(a, 8);
                if from_sock as usize >= MAX_SOCKETS {
                    return Err(ParseError::Field("claimed socket"));
                }
                Op::Claim {
                    from_app: u64_at(a, 0),
                    from_sock,
                    key: u64_at(a, 16),
                }
            }
            kind::EVENT_SELECT => {
                used(4)?;
                let mask = u32_at(a, 0);
                if mask & !FD_ALL != 0 {
                    return Err(ParseError::Field("event mask"));
                }
                Op::EventSelect { mask }
            }
            k => return Err(ParseError::UnknownKind(k)),
        };
        Ok(Command {
            sock,
            seq: v.seq(),
            op,
        })
    }

    /// Writes the command into a slot (every byte).
    pub fn emit(&self, slot: &mut Slot) {
        *slot = [0; SLOT];
        slot[field::SOCK].copy_from_slice(&self.sock.to_le_bytes());
        slot[field::SEQ].copy_from_slice(&self.seq.to_le_bytes());
        let a = &mut slot[field::ARGS..];
        let put = |a: &mut [u8], at: usize, bytes: &[u8]| {
            a[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let k = match self.op {
            Op::Listen {
                addr,
                backlog,
                area,
                bufs,
                takeover,
                reuse_port,
            } => {
                put(a, 0, &u32::from(*addr.ip()).to_le_bytes());
                put(a, 4, &addr.port().to_le_bytes());
                put(a, 6, &area.to_le_bytes());
                put(a, 8, &backlog.to_le_bytes());
                bufs.emit(&mut a[12..14]);
                a[14] = u8::from(reuse_port);
                put(a, 16, &takeover.to_le_bytes());
                kind::LISTEN
            }
            Op::Decide {
                key,
                peer_port,
                verdict,
            } => {
                put(a, 0, &key.conn_id.to_le_bytes());
                put(a, 8, &u32::from(key.peer_ip).to_le_bytes());
                put(a, 12, &peer_port.to_le_bytes());
                match verdict {
                    Verdict::Accept { new_sock } => put(a, 16, &new_sock.to_le_bytes()),
                    Verdict::Reject => a[14] = 1,
                }
                kind::DECIDE
            }
            Op::Connect {
                dst,
                src,
                src_port,
                nonblocking,
                bufs,
            } => {
                bufs.emit(&mut a[12..14]);
                put(a, 14, &src_port.to_le_bytes());
                put(a, 0, &u32::from(*dst.ip()).to_le_bytes());
                put(a, 4, &dst.port().to_le_bytes());
                a[6] = u8::from(nonblocking);
                put(
                    a,
                    8,
                    &u32::from(src.unwrap_or(Ipv4Addr::UNSPECIFIED)).to_le_bytes(),
                );
                kind::CONNECT
            }
            Op::Close => kind::CLOSE,
            Op::Abort => kind::ABORT,
            Op::Kick => kind::KICK,
            Op::Claim {
                from_app,
                from_sock,
                key,
            } => {
                put(a, 0, &from_app.to_le_bytes());
                put(a, 8, &from_sock.to_le_bytes());
                put(a, 16, &key.to_le_bytes());
                kind::CLAIM
            }
            Op::EventSelect { mask } => {
                put(a, 0, &mask.to_le_bytes());
                kind::EVENT_SELECT
            }
        };
        slot[field::KIND] = k;
    }

    /// The command as a fresh slot.
    pub fn to_slot(&self) -> Slot {
        let mut s = [0; SLOT];
        self.emit(&mut s);
        s
    }
}

impl<T: AsRef<[u8]>> RequestView<T> {
    /// Peer IPv4.
    pub fn peer_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32_at(self.b(), field::PEER_IP.start))
    }
    /// Peer port.
    pub fn peer_port(&self) -> u16 {
        u16_at(self.b(), field::PEER_PORT.start)
    }
    /// Local port.
    pub fn local_port(&self) -> u16 {
        u16_at(self.b(), field::LOCAL_PORT.start)
    }
    /// Local IPv4.
    pub fn local_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32_at(self.b(), field::LOCAL_IP.start))
    }
    /// Connection id.
    pub fn conn_id(&self) -> u64 {
        u64_at(self.b(), field::CONN_ID.start)
    }
    /// Expiry (CLOCK_MONOTONIC ns; 0: none).
    pub fn expires_ns(&self) -> u64 {
        u64_at(self.b(), field::EXPIRES.start)
    }
}

/// A connection request waiting for the application's answer, daemon -> application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The connecting peer.
    pub peer: SocketAddrV4,
    /// The local address it asked for.
    pub local: SocketAddrV4,
    /// Wire connection id.
    pub conn_id: u64,
    /// When the daemon drops it unanswered (CLOCK_MONOTONIC ns, see
    /// [`crate::sys::monotonic_ns`]; 0: never): its client has given up by
    /// then, so an application skips it without asking its condition function.
    pub expires_ns: u64,
}

impl Request {
    /// Whether it has expired at `now_ns` (CLOCK_MONOTONIC).
    pub fn expired(&self, now_ns: u64) -> bool {
        self.expires_ns != 0 && now_ns >= self.expires_ns
    }

    /// The key a decision names it by.
    pub fn key(&self) -> RequestKey {
        RequestKey {
            peer_ip: *self.peer.ip(),
            conn_id: self.conn_id,
        }
    }

    /// Parses and checks a slot.
    ///
    /// # Errors
    /// See [`ParseError`].
    pub fn parse(slot: &Slot) -> Result<Request, ParseError> {
        let v = RequestView::new_checked(&slot[..])?;
        if v.kind() != kind::REQUEST {
            return Err(ParseError::UnknownKind(v.kind()));
        }
        if !zero(&v.b()[field::RESERVED_HEAD]) || !zero(&v.b()[field::REQ_RESERVED]) {
            return Err(ParseError::Reserved);
        }
        Ok(Request {
            peer: SocketAddrV4::new(v.peer_ip(), v.peer_port()),
            local: SocketAddrV4::new(v.local_ip(), v.local_port()),
            conn_id: v.conn_id(),
            expires_ns: v.expires_ns(),
        })
    }

    /// Writes the request into a slot (every byte).
    pub fn emit(&self, slot: &mut Slot) {
        *slot = [0; SLOT];
        slot[field::KIND] = kind::REQUEST;
        slot[field::PEER_IP].copy_from_slice(&u32::from(*self.peer.ip()).to_le_bytes());
        slot[field::PEER_PORT].copy_from_slice(&self.peer.port().to_le_bytes());
        slot[field::LOCAL_PORT].copy_from_slice(&self.local.port().to_le_bytes());
        slot[field::LOCAL_IP].copy_from_slice(&u32::from(*self.local.ip()).to_le_bytes());
        slot[field::CONN_ID].copy_from_slice(&self.conn_id.to_le_bytes());
        slot[field::EXPIRES].copy_from_slice(&self.expires_ns.to_le_bytes());
    }

    /// The request as a fresh slot.
    pub fn to_slot(&self) -> Slot {
        let mut s = [0; SLOT];
        self.emit(&mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(a, b, c, d)
    }

    #[test]
    fn construct_and_deconstruct_a_listen() {
        let c = Command {
            sock: 3,
            seq: 7,
            op: Op::Listen {
                addr: SocketAddrV4::new(ip(198, 18, 0, 2), 5000),
                backlog: -1,
                area: 2,
                bufs: Bufs::default(),
                takeover: 0,
                reuse_port: false,
            },
        };
        let s = c.to_slot();
        assert_eq!(
            &s[..28],
            &[
                1, 0, 0, 0, 3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, // head
                2, 0, 18, 198, 0x88, 0x13, 2, 0, 0xff, 0xff, 0xff, 0xff
            ]
        );
        assert_eq!(&s[28..30], &[18, 18], "256 KiB rings");
        assert!(s[30..].iter().all(|b| *b == 0));
        assert_eq!(Command::parse(&s), Ok(c));
        let mut bad = s;
        bad[28] = 21;
        assert_eq!(Command::parse(&bad), Err(ParseError::Field("ring size")));
    }

    #[test]
    fn construct_and_deconstruct_a_request() {
        let r = Request {
            peer: SocketAddrV4::new(ip(198, 18, 0, 1), 49152),
            local: SocketAddrV4::new(ip(198, 18, 0, 2), 80),
            conn_id: 0x0102_0304_0506_0708,
            expires_ns: 0x10,
        };
        let s = r.to_slot();
        assert_eq!(&s[24..32], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!r.expired(0xf) && r.expired(0x10));
        assert_eq!(
            &s[..24],
            &[0x81, 0, 0, 0, 1, 0, 18, 198, 0, 0xc0, 80, 0, 2, 0, 18, 198, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(Request::parse(&s), Ok(r));
        assert_eq!(
            r.key(),
            RequestKey {
                peer_ip: ip(198, 18, 0, 1),
                conn_id: 0x0102_0304_0506_0708
            }
        );
    }

    #[test]
    fn every_kind_round_trips() {
        let key = RequestKey {
            peer_ip: ip(198, 18, 0, 9),
            conn_id: 42,
        };
        for op in [
            Op::Decide {
                key,
                peer_port: 7,
                verdict: Verdict::Accept { new_sock: 5 },
            },
            Op::Decide {
                key,
                peer_port: 7,
                verdict: Verdict::Reject,
            },
            Op::Connect {
                dst: SocketAddrV4::new(ip(198, 18, 0, 2), 9),
                src: Some(ip(198, 18, 0, 1)),
                src_port: 4321,
                nonblocking: true,
                bufs: Bufs {
                    snd: 4096,
                    rcv: 1 << 20,
                },
            },
            Op::Connect {
                dst: SocketAddrV4::new(ip(198, 18, 0, 2), 9),
                src: None,
                src_port: 0,
                nonblocking: false,
                bufs: Bufs::default(),
            },
            Op::Close,
            Op::Abort,
            Op::Kick,
            Op::EventSelect { mask: FD_ALL },
            Op::Claim {
                from_app: u64::MAX - 1,
                from_sock: 1023,
                key: 0x0102_0304_0506_0708,
            },
        ] {
            let c = Command {
                sock: 1,
                seq: 2,
                op,
            };
            assert_eq!(Command::parse(&c.to_slot()), Ok(c));
        }
    }

    #[test]
    fn bad_commands_are_named() {
        let good = Command {
            sock: 1,
            seq: 1,
            op: Op::Close,
        }
        .to_slot();
        let mut s = good;
        s[0] = 99;
        assert_eq!(Command::parse(&s), Err(ParseError::UnknownKind(99)));
        let mut s = good;
        s[2] = 1;
        assert_eq!(Command::parse(&s), Err(ParseError::Reserved));
        let mut s = good;
        s[4..8].copy_from_slice(&(MAX_SOCKETS as u32).to_le_bytes());
        assert_eq!(Command::parse(&s), Err(ParseError::Socket));
        let mut s = good;
        s[40] = 1;
        assert_eq!(Command::parse(&s), Err(ParseError::Reserved));
        let mut s = Command {
            sock: 1,
            seq: 1,
            op: Op::EventSelect { mask: FD_ALL },
        }
        .to_slot();
        s[16] = 0xff;
        assert_eq!(Command::parse(&s), Err(ParseError::Field("event mask")));
        let mut s = Command {
            sock: 1,
            seq: 1,
            op: Op::Listen {
                addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 1),
                backlog: 1,
                area: 0,
                bufs: Bufs::default(),
                takeover: 0,
                reuse_port: false,
            },
        }
        .to_slot();
        s[22..24].copy_from_slice(&(MAX_LISTENERS as u16).to_le_bytes());
        assert_eq!(Command::parse(&s), Err(ParseError::Field("area")));
        s[20..22].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(Command::parse(&s), Err(ParseError::Field("port")));
        let mut s = [0u8; SLOT];
        s[0] = kind::REQUEST;
        s[40] = 1;
        assert_eq!(Request::parse(&s), Err(ParseError::Reserved));
        assert_eq!(PARSE_REASONS[ParseError::Socket.index()], "socket");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_emit_inverts_parse(bytes in proptest::collection::vec(any::<u8>(), SLOT)) {
            let s: Slot = bytes.try_into().unwrap();
            if let Ok(c) = Command::parse(&s) {
                prop_assert_eq!(Command::parse(&c.to_slot()), Ok(c));
                prop_assert_eq!(c.to_slot(), s);
            }
            if let Ok(r) = Request::parse(&s) {
                prop_assert_eq!(r.to_slot(), s);
            }
        }
    }
}
