use super::{Error, Result};
use core::fmt;

/// The SAN EtherType used unless configured otherwise (IEEE 802 local experimental 2).
pub const DEFAULT_ETHERTYPE: u16 = 0x88B5;
/// The protocol version this implementation emits and accepts.
pub const VERSION: u8 = 1;
/// Length of the Ethernet II header.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of the SAN header that follows it.
pub const SAN_HEADER_LEN: usize = 18;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Self = Self([0xff; 6]);
    /// Whether the group bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Debug for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl core::str::FromStr for EthernetAddress {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or(Error::Malformed)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| Error::Malformed)?;
        }
        if parts.next().is_some() {
            return Err(Error::Malformed);
        }
        Ok(Self(out))
    }
}

/// An IPv4 address as carried on the wire (network order in the frame).
pub type Ipv4 = std::net::Ipv4Addr;

macro_rules! enum_with_unknown {
    ($(#[$m:meta])* pub enum $name:ident($ty:ty) { $( $(#[$vm:meta])* $var:ident = $val:expr ),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vm])* $var, )*
            /// A code this version does not know.
            Unknown($ty),
        }
        impl From<$ty> for $name {
            fn from(v: $ty) -> Self {
                match v { $( $val => Self::$var, )* other => Self::Unknown(other) }
            }
        }
        impl From<$name> for $ty {
            fn from(v: $name) -> $ty {
                match v { $( $name::$var => $val, )* $name::Unknown(other) => other }
            }
        }
    };
}

/// [`enum_with_unknown`] for a code that is counted and labelled: each
/// variant also names its label (metric label, `dsanctl stats` key), and
/// the type gets `COUNT`, `ALL`, `CODES`, `NAMES` and `index()` (the
/// position in the declaration: the counters' order), so that every table
/// about the codes is derived from this one declaration.
macro_rules! labelled_codes {
    ($(#[$m:meta])* pub enum $name:ident(u8) { $( $(#[$vm:meta])* $var:ident = $val:expr => $label:literal ),* $(,)? }) => {
        enum_with_unknown! { $(#[$m])* pub enum $name(u8) { $( $(#[$vm])* $var = $val ),* } }
        impl $name {
            /// How many codes this version knows.
            pub const COUNT: usize = [$($val),*].len();
            /// Every known code, in declaration order.
            pub const ALL: [$name; Self::COUNT] = [$($name::$var),*];
            /// Their wire values, in that order.
            pub const CODES: [u8; Self::COUNT] = [$($val),*];
            /// Their labels, in that order.
            pub const NAMES: [&'static str; Self::COUNT] = [$($label),*];
            const INDEX: [u8; 256] = {
                let mut t = [u8::MAX; 256];
                let mut i = 0;
                while i < Self::COUNT {
                    t[Self::CODES[i] as usize] = i as u8;
                    i += 1;
                }
                t
            };
            /// The position of a known code in [`Self::ALL`] (`None` for an
            /// unknown one).
            pub const fn index(self) -> Option<usize> {
                let i = Self::INDEX[self.code() as usize];
                if i == u8::MAX {
                    None
                } else {
                    Some(i as usize)
                }
            }
            /// The wire value.
            pub const fn code(self) -> u8 {
                match self {
                    $( $name::$var => $val, )*
                    $name::Unknown(c) => c,
                }
            }
            /// The label of a known code.
            pub fn label(self) -> Option<&'static str> {
                self.index().map(|i| Self::NAMES[i])
            }
        }
    };
}

labelled_codes! {
    /// The message kind (byte 1 of the SAN header).
    pub enum Kind(u8) {
        /// A client asks to connect to (dst_ip, dst_port).
        ConnectRequest = 0x01 => "connect_request",
        /// The accepting side accepted the request.
        Accept = 0x02 => "accept",
        /// The request was refused; the body says why.
        Reject = 0x03 => "reject",
        /// Either side tears an established connection down.
        Close = 0x04 => "close",
        /// Acknowledges a Close.
        CloseAck = 0x05 => "close_ack",
        /// The client confirms an Accept (the server stops retransmitting it).
        AcceptAck = 0x06 => "accept_ack",
        /// Stream bytes (and/or the sender's FIN), with an acknowledgement and credit.
        Data = 0x07 => "data",
        /// An acknowledgement with credit (no bytes).
        Ack = 0x08 => "ack",
        /// The connection is aborted; the body says why.
        Reset = 0x09 => "reset",
        /// Who has SAN address dst_ip?
        ResolveRequest = 0x10 => "resolve_request",
        /// The reply: src_ip is at the body's MAC.
        ResolveReply = 0x11 => "resolve_reply",
        /// Echo request (dataplane round-trip probe).
        EchoRequest = 0x20 => "echo_request",
        /// Echo reply.
        EchoReply = 0x21 => "echo_reply",
    }
}

labelled_codes! {
    /// Why a connect request was refused.
    pub enum RejectReason(u8) {
        /// The listener's backlog was full; refused at once, no event raised.
        BacklogFull = 0x01 => "backlog_full",
        /// Nobody listens on (dst_ip, dst_port).
        NoListener = 0x02 => "no_listener",
        /// The accepting application refused (condition function said reject).
        Refused = 0x03 => "refused",
        /// The accepting host is out of resources for new connections.
        NoResources = 0x04 => "no_resources",
        /// The listener went away (closed, its process died, the daemon stops).
        ListenerClosed = 0x05 => "listener_closed",
        /// No SAN listener on that port, but a kernel TCP listener: the
        /// switch connects over TCP at once.
        TcpOnly = 0x06 => "tcp_only",
    }
}

enum_with_unknown! {
    /// Why a connection was reset.
    pub enum ResetReason(u8) {
        /// The application's process went away (or was detached).
        ProcessGone = 0x01,
        /// The application closed with unread data, or data arrived after its close.
        Aborted = 0x02,
        /// The frame names a connection this host does not have.
        NoConnection = 0x03,
        /// The peer stopped answering (keepalive or retransmission budget).
        TimedOut = 0x04,
        /// The daemon stops.
        Shutdown = 0x05,
        /// The peer broke the stream protocol (bytes beyond the credit given).
        Protocol = 0x06,
    }
}

/// What a side offers at connection setup: the size of its receive ring
/// (the credit the peer starts with) and the largest stream payload it
/// can receive in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Offer {
    /// Receive window (bytes).
    pub window: u32,
    /// Largest payload per Data frame (bytes).
    pub mss: u16,
}

impl Offer {
    /// What a 1500-byte link and a 256 KiB ring offer.
    pub const DEFAULT: Offer = Offer {
        window: 256 << 10,
        mss: 1500 - (SAN_HEADER_LEN + DATA_HEADER_LEN) as u16,
    };
    /// The smallest acceptable values.
    pub const MIN: Offer = Offer {
        window: 4096,
        mss: 256,
    };
}

/// Bytes of a Data or Ack body before any payload.
pub const DATA_HEADER_LEN: usize = 44;

/// Segment flag: the sender's FIN follows the payload.
pub const SEG_FIN: u8 = 1;
/// Segment flag: the receiver saw a gap (go back to `ack`).
pub const SEG_NAK: u8 = 2;
/// Segment flag: answer with an Ack at once (keepalive, window probe).
pub const SEG_PROBE: u8 = 4;
/// Segment flag: the payload's last byte is urgent (TCP's out-of-band byte,
/// a send with MSG_OOB); only on Data with a payload.
pub const SEG_URG: u8 = 8;

/// The header of a Data or Ack body (the payload follows a Data header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// The connection.
    pub conn_id: u64,
    /// The receiver's token.
    pub token: u64,
    /// Stream offset of the first payload byte (of the FIN if no payload).
    pub seq: u64,
    /// Every byte of the reverse stream below this offset arrived.
    pub ack: u64,
    /// The sender may send reverse-stream bytes below this offset (credit).
    pub limit: u64,
    /// `SEG_*` bits.
    pub flags: u8,
    /// Payload bytes (Data only; 0 for an Ack).
    pub len: u16,
}

mod field {
    use core::ops::Range;
    pub(super) const ETH_DST: Range<usize> = 0..6;
    pub(super) const ETH_SRC: Range<usize> = 6..12;
    pub(super) const ETHERTYPE: Range<usize> = 12..14;
    // SAN header, offsets from the frame start.
    pub(super) const VERSION: usize = 14;
    pub(super) const KIND: usize = 15;
    pub(super) const FLAGS: Range<usize> = 16..18;
    pub(super) const SRC_PORT: Range<usize> = 18..20;
    pub(super) const SRC_IP: Range<usize> = 20..24;
    pub(super) const DST_IP: Range<usize> = 24..28;
    pub(super) const DST_PORT: Range<usize> = 28..30;
    pub(super) const BODY_LEN: Range<usize> = 30..32;
    pub(super) const BODY: usize = 32;
}

/// Where one field of a message body lies: its name (as the Wireshark
/// dissector, `deploy/wireshark/dsan.lua`, names it) and its bytes. Every
/// integer is big-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyField {
    /// The dissector's field name.
    pub name: &'static str,
    /// Offset in the body.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
}

impl BodyField {
    const fn new(name: &'static str, at: usize, len: usize) -> BodyField {
        BodyField { name, at, len }
    }
    /// Its bytes in the body.
    #[inline(always)]
    pub const fn range(&self) -> core::ops::Range<usize> {
        self.at..self.at + self.len
    }
}

/// The body fields, each declared once: [`body_layout`] lists them per
/// kind, parse and emit read and write through them, and a test holds the
/// dissector to them. Bytes of a body that no field covers are reserved
/// (zero on the wire, checked on parse).
pub mod body {
    use super::BodyField;
    /// The connection (every connection message).
    pub const CONN_ID: BodyField = BodyField::new("conn_id", 0, 8);
    /// The client's token (ConnectRequest, Accept, Reject).
    pub const CLIENT_TOKEN: BodyField = BodyField::new("client_token", 8, 8);
    /// The receiver's token (Close, CloseAck, AcceptAck, Data, Ack, Reset).
    pub const TOKEN: BodyField = BodyField::new("token", 8, 8);
    /// The server's token (Accept).
    pub const SERVER_TOKEN: BodyField = BodyField::new("server_token", 16, 8);
    /// A ConnectRequest's offer: receive window, largest payload (then 2 reserved).
    pub const REQUEST_WINDOW: BodyField = BodyField::new("window", 16, 4);
    /// See [`REQUEST_WINDOW`].
    pub const REQUEST_MSS: BodyField = BodyField::new("mss", 20, 2);
    /// An Accept's offer: receive window, largest payload (then 2 reserved).
    pub const ACCEPT_WINDOW: BodyField = BodyField::new("window", 24, 4);
    /// See [`ACCEPT_WINDOW`].
    pub const ACCEPT_MSS: BodyField = BodyField::new("mss", 28, 2);
    /// Why a request was refused (Reject).
    pub const REJECT_REASON: BodyField = BodyField::new("reason", 16, 1);
    /// Why a connection was reset (Reset).
    pub const RESET_REASON: BodyField = BodyField::new("reset_reason", 16, 1);
    /// A segment's stream offset (Data, Ack).
    pub const SEQ: BodyField = BodyField::new("sseq", 16, 8);
    /// A segment's acknowledgement.
    pub const ACK: BodyField = BodyField::new("ack", 24, 8);
    /// A segment's credit limit.
    pub const LIMIT: BodyField = BodyField::new("limit", 32, 8);
    /// A segment's `SEG_*` flags (then 1 reserved).
    pub const SEG_FLAGS: BodyField = BodyField::new("seg_flags", 40, 1);
    /// A segment's payload length.
    pub const PAYLOAD_LEN: BodyField = BodyField::new("payload_len", 42, 2);
    /// The resolved MAC (ResolveReply; then 2 reserved).
    pub const MAC: BodyField = BodyField::new("mac", 0, 6);
    /// An echo's sequence number.
    pub const ECHO_SEQ: BodyField = BodyField::new("seq", 0, 8);
    /// An echo's stamp.
    pub const ECHO_STAMP: BodyField = BodyField::new("stamp", 8, 8);
}

/// The body of one kind: its fields, its reserved bytes (zero on the wire,
/// checked on parse), which together cover it exactly once (a test
/// checks), and its length (a Data body's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLayout {
    /// The fields, in order.
    pub fields: &'static [BodyField],
    /// The reserved bytes.
    pub reserved: &'static [core::ops::Range<usize>],
    /// The body's length.
    pub len: usize,
}

/// The body of each kind; `None` for an unknown kind.
#[inline]
#[allow(clippy::single_range_in_vec_init)] // lists of reserved ranges, some of one
pub fn body_layout(kind: Kind) -> Option<BodyLayout> {
    use body::*;
    let (fields, reserved, len): (
        &'static [BodyField],
        &'static [core::ops::Range<usize>],
        usize,
    ) = match kind {
        Kind::ConnectRequest => (
            &[CONN_ID, CLIENT_TOKEN, REQUEST_WINDOW, REQUEST_MSS],
            &[22..24],
            24,
        ),
        Kind::Accept => (
            &[
                CONN_ID,
                CLIENT_TOKEN,
                SERVER_TOKEN,
                ACCEPT_WINDOW,
                ACCEPT_MSS,
            ],
            &[30..32],
            32,
        ),
        Kind::Reject => (&[CONN_ID, CLIENT_TOKEN, REJECT_REASON], &[17..24], 24),
        Kind::Close | Kind::CloseAck | Kind::AcceptAck => (&[CONN_ID, TOKEN], &[], 16),
        Kind::Data | Kind::Ack => (
            &[CONN_ID, TOKEN, SEQ, ACK, LIMIT, SEG_FLAGS, PAYLOAD_LEN],
            &[41..42],
            DATA_HEADER_LEN,
        ),
        Kind::Reset => (&[CONN_ID, TOKEN, RESET_REASON], &[17..24], 24),
        Kind::ResolveRequest => (&[], &[], 0),
        Kind::ResolveReply => (&[MAC], &[6..8], 8),
        Kind::EchoRequest | Kind::EchoReply => (&[ECHO_SEQ, ECHO_STAMP], &[], 16),
        Kind::Unknown(_) => return None,
    };
    Some(BodyLayout {
        fields,
        reserved,
        len,
    })
}

/// Body lengths per kind.
fn body_len(kind: Kind) -> Option<usize> {
    body_layout(kind).map(|l| l.len)
}

/// A read/write view of a SAN frame (Ethernet header included).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

macro_rules! be {
    (u16, $b:expr) => {
        u16::from_be_bytes([$b[0], $b[1]])
    };
    (u32, $b:expr) => {
        u32::from_be_bytes([$b[0], $b[1], $b[2], $b[3]])
    };
    (u64, $b:expr) => {
        u64::from_be_bytes([$b[0], $b[1], $b[2], $b[3], $b[4], $b[5], $b[6], $b[7]])
    };
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking its length (for emitting).
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps untrusted bytes: checks that the header and the body that the
    /// header announces are all there. After this, no getter panics.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Checks the length against the header's body length.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < field::BODY {
            return Err(Error::Truncated);
        }
        if len < field::BODY + self.body_len() as usize {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// Destination MAC.
    pub fn dst_mac(&self) -> EthernetAddress {
        EthernetAddress(self.b()[field::ETH_DST].try_into().unwrap())
    }
    /// Source MAC.
    pub fn src_mac(&self) -> EthernetAddress {
        EthernetAddress(self.b()[field::ETH_SRC].try_into().unwrap())
    }
    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        be!(u16, &self.b()[field::ETHERTYPE])
    }
    /// Protocol version.
    pub fn version(&self) -> u8 {
        self.b()[field::VERSION]
    }
    /// Message kind.
    pub fn kind(&self) -> Kind {
        Kind::from(self.b()[field::KIND])
    }
    /// Flags (reserved, zero in version 1).
    pub fn flags(&self) -> u16 {
        be!(u16, &self.b()[field::FLAGS])
    }
    /// Sender's SAN IP.
    pub fn src_ip(&self) -> Ipv4 {
        Ipv4::from(be!(u32, &self.b()[field::SRC_IP]))
    }
    /// Sender's port.
    pub fn src_port(&self) -> u16 {
        be!(u16, &self.b()[field::SRC_PORT])
    }
    /// Destination SAN IP.
    pub fn dst_ip(&self) -> Ipv4 {
        Ipv4::from(be!(u32, &self.b()[field::DST_IP]))
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be!(u16, &self.b()[field::DST_PORT])
    }
    /// Body length as announced by the header.
    pub fn body_len(&self) -> u16 {
        be!(u16, &self.b()[field::BODY_LEN])
    }
    /// The body (after `check_len`, exactly `body_len` bytes).
    pub fn body(&self) -> &[u8] {
        &self.b()[field::BODY..field::BODY + self.body_len() as usize]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Sets the destination MAC.
    pub fn set_dst_mac(&mut self, a: EthernetAddress) {
        self.m()[field::ETH_DST].copy_from_slice(&a.0)
    }
    /// Sets the source MAC.
    pub fn set_src_mac(&mut self, a: EthernetAddress) {
        self.m()[field::ETH_SRC].copy_from_slice(&a.0)
    }
    /// Sets the EtherType.
    pub fn set_ethertype(&mut self, v: u16) {
        self.m()[field::ETHERTYPE].copy_from_slice(&v.to_be_bytes())
    }
    /// Sets the version byte.
    pub fn set_version(&mut self, v: u8) {
        self.m()[field::VERSION] = v
    }
    /// Sets the kind byte.
    pub fn set_kind(&mut self, k: Kind) {
        self.m()[field::KIND] = k.into()
    }
    /// Sets the flags.
    pub fn set_flags(&mut self, v: u16) {
        self.m()[field::FLAGS].copy_from_slice(&v.to_be_bytes())
    }
    /// Sets the source IP.
    pub fn set_src_ip(&mut self, a: Ipv4) {
        self.m()[field::SRC_IP].copy_from_slice(&a.octets())
    }
    /// Sets the source port.
    pub fn set_src_port(&mut self, p: u16) {
        self.m()[field::SRC_PORT].copy_from_slice(&p.to_be_bytes())
    }
    /// Sets the destination IP.
    pub fn set_dst_ip(&mut self, a: Ipv4) {
        self.m()[field::DST_IP].copy_from_slice(&a.octets())
    }
    /// Sets the destination port.
    pub fn set_dst_port(&mut self, p: u16) {
        self.m()[field::DST_PORT].copy_from_slice(&p.to_be_bytes())
    }
    /// Sets the body length.
    pub fn set_body_len(&mut self, v: u16) {
        self.m()[field::BODY_LEN].copy_from_slice(&v.to_be_bytes())
    }
    /// The body, mutable.
    pub fn body_mut(&mut self) -> &mut [u8] {
        let n = self.body_len() as usize;
        &mut self.m()[field::BODY..field::BODY + n]
    }
}

/// The SAN header's addressing, common to every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SanHeader {
    /// Destination MAC.
    pub dst_mac: EthernetAddress,
    /// Source MAC.
    pub src_mac: EthernetAddress,
    /// Sender's SAN IP.
    pub src_ip: Ipv4,
    /// Sender's port (0 where no port applies).
    pub src_port: u16,
    /// Destination SAN IP.
    pub dst_ip: Ipv4,
    /// Destination port (0 where no port applies).
    pub dst_port: u16,
}

/// A message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// Connect request: the client's connection id and token.
    ConnectRequest {
        /// Connection id, random, chosen by the client.
        conn_id: u64,
        /// The client's token; the server echoes it in every reply.
        client_token: u64,
        /// The client's receive window and frame size.
        offer: Offer,
    },
    /// Accept: the request's id, the client's token echoed, the server's token.
    Accept {
        /// Connection id.
        conn_id: u64,
        /// The client's token, echoed.
        client_token: u64,
        /// The server's token, echoed by the client in later frames.
        server_token: u64,
        /// The server's receive window and frame size.
        offer: Offer,
    },
    /// Reject, with a reason.
    Reject {
        /// Connection id.
        conn_id: u64,
        /// The client's token, echoed.
        client_token: u64,
        /// Why.
        reason: RejectReason,
    },
    /// Close an established connection.
    Close {
        /// Connection id.
        conn_id: u64,
        /// The *receiver's* token.
        token: u64,
    },
    /// Acknowledge a close.
    CloseAck {
        /// Connection id.
        conn_id: u64,
        /// The receiver's token.
        token: u64,
    },
    /// Confirm an accept (client to server).
    AcceptAck {
        /// Connection id.
        conn_id: u64,
        /// The receiver's (server's) token.
        token: u64,
    },
    /// Stream bytes; the payload follows the body header in the frame.
    Data(Segment),
    /// Acknowledgement and credit.
    Ack(Segment),
    /// Abort a connection.
    Reset {
        /// Connection id.
        conn_id: u64,
        /// The receiver's token.
        token: u64,
        /// Why.
        reason: ResetReason,
    },
    /// Who has `dst_ip`?
    ResolveRequest,
    /// `src_ip` is at `mac`.
    ResolveReply {
        /// The MAC of `src_ip`.
        mac: EthernetAddress,
    },
    /// Echo request.
    EchoRequest {
        /// Opaque identifier and sequence, echoed.
        seq: u64,
        /// Opaque timestamp, echoed.
        stamp: u64,
    },
    /// Echo reply.
    EchoReply {
        /// Echoed.
        seq: u64,
        /// Echoed.
        stamp: u64,
    },
}

impl Message {
    /// The kind byte for this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::ConnectRequest { .. } => Kind::ConnectRequest,
            Message::Accept { .. } => Kind::Accept,
            Message::Reject { .. } => Kind::Reject,
            Message::Close { .. } => Kind::Close,
            Message::CloseAck { .. } => Kind::CloseAck,
            Message::AcceptAck { .. } => Kind::AcceptAck,
            Message::Data(_) => Kind::Data,
            Message::Ack(_) => Kind::Ack,
            Message::Reset { .. } => Kind::Reset,
            Message::ResolveRequest => Kind::ResolveRequest,
            Message::ResolveReply { .. } => Kind::ResolveReply,
            Message::EchoRequest { .. } => Kind::EchoRequest,
            Message::EchoReply { .. } => Kind::EchoReply,
        }
    }
}

/// A whole SAN frame as a plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Addressing.
    pub header: SanHeader,
    /// Body.
    pub message: Message,
}

impl Repr {
    /// Parses a checked view. `ethertype` is the SAN EtherType in use.
    pub fn parse<T: AsRef<[u8]>>(f: &Frame<T>, ethertype: u16) -> Result<Self> {
        f.check_len()?;
        if f.ethertype() != ethertype {
            return Err(Error::EtherType);
        }
        if f.version() != VERSION {
            return Err(Error::Version);
        }
        if f.flags() != 0 {
            return Err(Error::Malformed);
        }
        let kind = f.kind();
        let layout = body_layout(kind).ok_or(Error::Malformed)?;
        let want = layout.len;
        let have = f.body_len() as usize;
        if have != want && !(kind == Kind::Data && have > want) {
            return Err(Error::Malformed);
        }
        let b = f.body();
        if layout
            .reserved
            .iter()
            .any(|r| b[r.clone()].iter().any(|&x| x != 0))
        {
            return Err(Error::Malformed);
        }
        let u64_at = |x: BodyField| be!(u64, &b[x.range()]);
        let offer = |window: BodyField, mss: BodyField| {
            let o = Offer {
                window: be!(u32, &b[window.range()]),
                mss: be!(u16, &b[mss.range()]),
            };
            if o.window < Offer::MIN.window || o.mss < Offer::MIN.mss {
                return Err(Error::Malformed);
            }
            Ok(o)
        };
        let message = match kind {
            Kind::ConnectRequest => Message::ConnectRequest {
                conn_id: u64_at(body::CONN_ID),
                client_token: u64_at(body::CLIENT_TOKEN),
                offer: offer(body::REQUEST_WINDOW, body::REQUEST_MSS)?,
            },
            Kind::Accept => Message::Accept {
                conn_id: u64_at(body::CONN_ID),
                client_token: u64_at(body::CLIENT_TOKEN),
                server_token: u64_at(body::SERVER_TOKEN),
                offer: offer(body::ACCEPT_WINDOW, body::ACCEPT_MSS)?,
            },
            Kind::Data | Kind::Ack => {
                let seg = Segment {
                    conn_id: u64_at(body::CONN_ID),
                    token: u64_at(body::TOKEN),
                    seq: u64_at(body::SEQ),
                    ack: u64_at(body::ACK),
                    limit: u64_at(body::LIMIT),
                    flags: b[body::SEG_FLAGS.at],
                    len: be!(u16, &b[body::PAYLOAD_LEN.range()]),
                };
                let known = SEG_FIN | SEG_NAK | SEG_PROBE | SEG_URG;
                if seg.flags & !known != 0 {
                    return Err(Error::Malformed);
                }
                if kind == Kind::Data {
                    if usize::from(seg.len) != have - want
                        || (seg.len == 0 && seg.flags & (SEG_FIN | SEG_URG) != SEG_FIN)
                    {
                        return Err(Error::Malformed);
                    }
                    Message::Data(seg)
                } else {
                    if seg.len != 0 || seg.flags & (SEG_FIN | SEG_URG) != 0 {
                        return Err(Error::Malformed);
                    }
                    Message::Ack(seg)
                }
            }
            Kind::Reset => {
                let reason = ResetReason::from(b[body::RESET_REASON.at]);
                if matches!(reason, ResetReason::Unknown(_)) {
                    return Err(Error::Malformed);
                }
                Message::Reset {
                    conn_id: u64_at(body::CONN_ID),
                    token: u64_at(body::TOKEN),
                    reason,
                }
            }
            Kind::Reject => {
                let reason = RejectReason::from(b[body::REJECT_REASON.at]);
                if matches!(reason, RejectReason::Unknown(_)) {
                    return Err(Error::Malformed);
                }
                Message::Reject {
                    conn_id: u64_at(body::CONN_ID),
                    client_token: u64_at(body::CLIENT_TOKEN),
                    reason,
                }
            }
            Kind::Close => Message::Close {
                conn_id: u64_at(body::CONN_ID),
                token: u64_at(body::TOKEN),
            },
            Kind::CloseAck => Message::CloseAck {
                conn_id: u64_at(body::CONN_ID),
                token: u64_at(body::TOKEN),
            },
            Kind::AcceptAck => Message::AcceptAck {
                conn_id: u64_at(body::CONN_ID),
                token: u64_at(body::TOKEN),
            },
            Kind::ResolveRequest => Message::ResolveRequest,
            Kind::ResolveReply => Message::ResolveReply {
                mac: EthernetAddress(b[body::MAC.range()].try_into().unwrap()),
            },
            Kind::EchoRequest => Message::EchoRequest {
                seq: u64_at(body::ECHO_SEQ),
                stamp: u64_at(body::ECHO_STAMP),
            },
            Kind::EchoReply => Message::EchoReply {
                seq: u64_at(body::ECHO_SEQ),
                stamp: u64_at(body::ECHO_STAMP),
            },
            Kind::Unknown(_) => return Err(Error::Malformed),
        };
        Ok(Repr {
            header: SanHeader {
                dst_mac: f.dst_mac(),
                src_mac: f.src_mac(),
                src_ip: f.src_ip(),
                src_port: f.src_port(),
                dst_ip: f.dst_ip(),
                dst_port: f.dst_port(),
            },
            message,
        })
    }

    /// Parses raw bytes (checks them first).
    #[inline]
    pub fn parse_bytes(bytes: &[u8], ethertype: u16) -> Result<Self> {
        Self::parse(&Frame::new_checked(bytes)?, ethertype)
    }

    /// The exact number of bytes `emit` writes.
    #[inline]
    pub fn buffer_len(&self) -> usize {
        field::BODY + self.body_len()
    }

    #[inline]
    fn body_len(&self) -> usize {
        let n = body_len(self.message.kind()).unwrap_or(0);
        match self.message {
            Message::Data(s) => n + usize::from(s.len),
            _ => n,
        }
    }

    /// Writes the frame into a view over exactly `buffer_len()` bytes.
    ///
    /// # Panics
    /// If the buffer is shorter than `buffer_len()`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, f: &mut Frame<T>, ethertype: u16) {
        let h = &self.header;
        f.set_dst_mac(h.dst_mac);
        f.set_src_mac(h.src_mac);
        f.set_ethertype(ethertype);
        f.set_version(VERSION);
        f.set_kind(self.message.kind());
        f.set_flags(0);
        f.set_src_port(h.src_port);
        f.set_src_ip(h.src_ip);
        f.set_dst_ip(h.dst_ip);
        f.set_dst_port(h.dst_port);
        let layout = body_layout(self.message.kind());
        f.set_body_len(self.body_len() as u16);
        let b = f.body_mut();
        for r in layout.map_or(&[][..], |l| l.reserved) {
            b[r.clone()].fill(0);
        }
        let mut put = |x: BodyField, bytes: &[u8]| b[x.range()].copy_from_slice(bytes);
        match self.message {
            Message::ConnectRequest {
                conn_id,
                client_token,
                offer,
            } => {
                put(body::CONN_ID, &conn_id.to_be_bytes());
                put(body::CLIENT_TOKEN, &client_token.to_be_bytes());
                put(body::REQUEST_WINDOW, &offer.window.to_be_bytes());
                put(body::REQUEST_MSS, &offer.mss.to_be_bytes());
            }
            Message::Accept {
                conn_id,
                client_token,
                server_token,
                offer,
            } => {
                put(body::CONN_ID, &conn_id.to_be_bytes());
                put(body::CLIENT_TOKEN, &client_token.to_be_bytes());
                put(body::SERVER_TOKEN, &server_token.to_be_bytes());
                put(body::ACCEPT_WINDOW, &offer.window.to_be_bytes());
                put(body::ACCEPT_MSS, &offer.mss.to_be_bytes());
            }
            Message::Data(s) | Message::Ack(s) => {
                put(body::CONN_ID, &s.conn_id.to_be_bytes());
                put(body::TOKEN, &s.token.to_be_bytes());
                put(body::SEQ, &s.seq.to_be_bytes());
                put(body::ACK, &s.ack.to_be_bytes());
                put(body::LIMIT, &s.limit.to_be_bytes());
                put(body::SEG_FLAGS, &[s.flags]);
                put(body::PAYLOAD_LEN, &s.len.to_be_bytes());
            }
            Message::Reset {
                conn_id,
                token,
                reason,
            } => {
                put(body::CONN_ID, &conn_id.to_be_bytes());
                put(body::TOKEN, &token.to_be_bytes());
                put(body::RESET_REASON, &[reason.into()]);
            }
            Message::Reject {
                conn_id,
                client_token,
                reason,
            } => {
                put(body::CONN_ID, &conn_id.to_be_bytes());
                put(body::CLIENT_TOKEN, &client_token.to_be_bytes());
                put(body::REJECT_REASON, &[reason.into()]);
            }
            Message::Close { conn_id, token }
            | Message::CloseAck { conn_id, token }
            | Message::AcceptAck { conn_id, token } => {
                put(body::CONN_ID, &conn_id.to_be_bytes());
                put(body::TOKEN, &token.to_be_bytes());
            }
            Message::ResolveRequest => {}
            Message::ResolveReply { mac } => put(body::MAC, &mac.0),
            Message::EchoRequest { seq, stamp } | Message::EchoReply { seq, stamp } => {
                put(body::ECHO_SEQ, &seq.to_be_bytes());
                put(body::ECHO_STAMP, &stamp.to_be_bytes());
            }
        }
    }

    /// Emits into a fresh vector (tests, tools; the dataplane emits into mbufs).
    pub fn to_bytes(&self, ethertype: u16) -> Vec<u8> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(&mut Frame::new_unchecked(&mut v[..]), ethertype);
        v
    }
}

/// The payload of a Data frame (its bytes after the body header); empty for
/// any other frame. Call on bytes that parsed.
#[inline]
pub fn payload(frame: &[u8]) -> &[u8] {
    let start = field::BODY + DATA_HEADER_LEN;
    if frame.len() < field::BODY || frame[field::KIND] != u8::from(Kind::Data) {
        return &[];
    }
    let end = field::BODY + usize::from(be!(u16, &frame[field::BODY_LEN]));
    frame.get(start..end).unwrap_or(&[])
}

/// Where a Data frame's payload starts.
pub const PAYLOAD_OFFSET: usize = field::BODY + DATA_HEADER_LEN;

#[cfg(test)]
mod test {
    use super::*;

    const A: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
    const B: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);

    fn hdr() -> SanHeader {
        SanHeader {
            dst_mac: B,
            src_mac: A,
            src_ip: Ipv4::new(198, 18, 0, 1),
            src_port: 40000,
            dst_ip: Ipv4::new(198, 18, 0, 2),
            dst_port: 5000,
        }
    }

    /// The worked example of docs/wire-protocol.md: a connect request.
    static CONNECT_BYTES: [u8; 56] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // dst mac
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // src mac
        0x88, 0xb5, // ethertype
        0x01, 0x01, // version 1, kind ConnectRequest
        0x00, 0x00, // flags
        0x9c, 0x40, // src port 40000
        0xc6, 0x12, 0x00, 0x01, // src ip 198.18.0.1
        0xc6, 0x12, 0x00, 0x02, // dst ip 198.18.0.2
        0x13, 0x88, // dst port 5000
        0x00, 0x18, // body length 24
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // conn id
        0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, // client token
        0x00, 0x04, 0x00, 0x00, // receive window 256 KiB
        0x05, 0x9e, // mss 1438
        0x00, 0x00, // reserved
    ];

    fn connect_repr() -> Repr {
        Repr {
            header: hdr(),
            message: Message::ConnectRequest {
                conn_id: 0x1122334455667788,
                client_token: 0xa1a2a3a4a5a6a7a8,
                offer: Offer::DEFAULT,
            },
        }
    }

    #[test]
    fn deconstruct_connect() {
        let f = Frame::new_checked(&CONNECT_BYTES[..]).unwrap();
        assert_eq!(f.dst_mac(), B);
        assert_eq!(f.src_mac(), A);
        assert_eq!(f.ethertype(), 0x88b5);
        assert_eq!(f.version(), 1);
        assert_eq!(f.kind(), Kind::ConnectRequest);
        assert_eq!(f.src_port(), 40000);
        assert_eq!(f.dst_port(), 5000);
        assert_eq!(f.body_len(), 24);
        assert_eq!(Repr::parse(&f, DEFAULT_ETHERTYPE).unwrap(), connect_repr());
    }

    #[test]
    fn construct_connect() {
        assert_eq!(
            connect_repr().to_bytes(DEFAULT_ETHERTYPE),
            CONNECT_BYTES.to_vec()
        );
    }

    fn roundtrip(m: Message, expect_body: &[u8]) {
        let r = Repr {
            header: hdr(),
            message: m,
        };
        let bytes = r.to_bytes(DEFAULT_ETHERTYPE);
        assert_eq!(&bytes[32..], expect_body, "{m:?}");
        assert_eq!(bytes[15], u8::from(m.kind()));
        assert_eq!(Repr::parse_bytes(&bytes, DEFAULT_ETHERTYPE).unwrap(), r);
    }

    #[test]
    fn every_kind_constructs_and_deconstructs() {
        let id = [1, 2, 3, 4, 5, 6, 7, 8];
        let t1 = [9, 9, 9, 9, 9, 9, 9, 9];
        let t2 = [7, 7, 7, 7, 7, 7, 7, 7];
        let cat = |parts: &[&[u8]]| parts.concat();
        let idv = u64::from_be_bytes(id);
        let t1v = u64::from_be_bytes(t1);
        let t2v = u64::from_be_bytes(t2);
        roundtrip(
            Message::ConnectRequest {
                conn_id: idv,
                client_token: t1v,
                offer: Offer {
                    window: 0x10000,
                    mss: 8948,
                },
            },
            &cat(&[&id, &t1, &[0, 1, 0, 0, 0x22, 0xf4, 0, 0]]),
        );
        roundtrip(
            Message::Accept {
                conn_id: idv,
                client_token: t1v,
                server_token: t2v,
                offer: Offer::DEFAULT,
            },
            &cat(&[&id, &t1, &t2, &[0, 4, 0, 0, 5, 0x9e, 0, 0]]),
        );
        roundtrip(
            Message::Ack(Segment {
                conn_id: idv,
                token: t2v,
                seq: 5,
                ack: 6,
                limit: 7,
                flags: SEG_NAK | SEG_PROBE,
                len: 0,
            }),
            &cat(&[
                &id,
                &t2,
                &5u64.to_be_bytes(),
                &6u64.to_be_bytes(),
                &7u64.to_be_bytes(),
                &[6, 0, 0, 0],
            ]),
        );
        roundtrip(
            Message::Reset {
                conn_id: idv,
                token: t2v,
                reason: ResetReason::ProcessGone,
            },
            &cat(&[&id, &t2, &[1, 0, 0, 0, 0, 0, 0, 0]]),
        );
        for (reason, code) in [
            (RejectReason::BacklogFull, 1u8),
            (RejectReason::NoListener, 2),
            (RejectReason::Refused, 3),
            (RejectReason::NoResources, 4),
            (RejectReason::ListenerClosed, 5),
        ] {
            roundtrip(
                Message::Reject {
                    conn_id: idv,
                    client_token: t1v,
                    reason,
                },
                &cat(&[&id, &t1, &[code, 0, 0, 0, 0, 0, 0, 0]]),
            );
        }
        roundtrip(
            Message::Close {
                conn_id: idv,
                token: t2v,
            },
            &cat(&[&id, &t2]),
        );
        roundtrip(
            Message::CloseAck {
                conn_id: idv,
                token: t2v,
            },
            &cat(&[&id, &t2]),
        );
        roundtrip(
            Message::AcceptAck {
                conn_id: idv,
                token: t2v,
            },
            &cat(&[&id, &t2]),
        );
        roundtrip(Message::ResolveRequest, &[]);
        roundtrip(Message::ResolveReply { mac: A }, &[2, 0, 0, 0, 0, 1, 0, 0]);
        roundtrip(
            Message::EchoRequest {
                seq: idv,
                stamp: t1v,
            },
            &cat(&[&id, &t1]),
        );
        roundtrip(
            Message::EchoReply {
                seq: idv,
                stamp: t1v,
            },
            &cat(&[&id, &t1]),
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let mut b = CONNECT_BYTES.to_vec();
        assert_eq!(Frame::new_checked(&b[..20]).unwrap_err(), Error::Truncated);
        assert_eq!(Frame::new_checked(&b[..55]).unwrap_err(), Error::Truncated);
        assert_eq!(Repr::parse_bytes(&b, 0x88b6).unwrap_err(), Error::EtherType);
        b[14] = 2;
        assert_eq!(
            Repr::parse_bytes(&b, DEFAULT_ETHERTYPE).unwrap_err(),
            Error::Version
        );
        b[14] = 1;
        b[15] = 0x7f;
        assert_eq!(
            Repr::parse_bytes(&b, DEFAULT_ETHERTYPE).unwrap_err(),
            Error::Malformed
        );
        b[15] = 1;
        b[16] = 1;
        assert_eq!(
            Repr::parse_bytes(&b, DEFAULT_ETHERTYPE).unwrap_err(),
            Error::Malformed
        );
        b[16] = 0;
        b[31] = 8; // wrong body length for the kind
        assert_eq!(
            Repr::parse_bytes(&b, DEFAULT_ETHERTYPE).unwrap_err(),
            Error::Malformed
        );
        let mut r = Repr {
            header: hdr(),
            message: Message::Reject {
                conn_id: 1,
                client_token: 2,
                reason: RejectReason::Refused,
            },
        }
        .to_bytes(DEFAULT_ETHERTYPE);
        r[48] = 0xee;
        assert_eq!(
            Repr::parse_bytes(&r, DEFAULT_ETHERTYPE).unwrap_err(),
            Error::Malformed
        );
        assert_eq!(Kind::from(0xee), Kind::Unknown(0xee));
        assert_eq!(u8::from(Kind::Unknown(0xee)), 0xee);
    }

    #[test]
    fn the_urgent_flag_marks_a_data_payload_only() {
        let seg = |flags, len| Segment {
            conn_id: 1,
            token: 2,
            seq: 3,
            ack: 4,
            limit: 5,
            flags,
            len,
        };
        let bytes = |m: Message, payload: usize| {
            let r = Repr {
                header: hdr(),
                message: m,
            };
            let mut b = r.to_bytes(DEFAULT_ETHERTYPE);
            b.resize(b.len() + payload, b'!');
            b
        };
        let b = bytes(Message::Data(seg(SEG_URG, 1)), 1);
        assert_eq!(
            Repr::parse_bytes(&b, DEFAULT_ETHERTYPE).unwrap().message,
            Message::Data(seg(SEG_URG, 1))
        );
        for bad in [
            bytes(Message::Data(seg(SEG_URG | SEG_FIN, 0)), 0),
            bytes(Message::Ack(seg(SEG_URG, 0)), 0),
        ] {
            assert_eq!(
                Repr::parse_bytes(&bad, DEFAULT_ETHERTYPE).unwrap_err(),
                Error::Malformed
            );
        }
    }

    #[test]
    fn mac_parse_and_display() {
        let m: EthernetAddress = "02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(m.to_string(), "02:00:00:00:00:0a");
        assert!("02:00".parse::<EthernetAddress>().is_err());
        assert!(EthernetAddress::BROADCAST.is_multicast());
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96)) {
            let _ = Repr::parse_bytes(&bytes, DEFAULT_ETHERTYPE);
            if let Ok(f) = Frame::new_checked(&bytes[..]) {
                let _ = (f.kind(), f.src_ip(), f.dst_ip(), f.body());
            }
        }

        #[test]
        fn parse_emit_roundtrip(kind in 0u8..12, a in proptest::prelude::any::<u64>(), b in proptest::prelude::any::<u64>(), port in proptest::prelude::any::<u16>()) {
            let message = match kind {
                0 => Message::ConnectRequest { conn_id: a, client_token: b, offer: Offer { window: (b as u32) | 4096, mss: port | 256 } },
                1 => Message::Accept { conn_id: a, client_token: b, server_token: a ^ b, offer: Offer::DEFAULT },
                9 => Message::Data(Segment { conn_id: a, token: b, seq: a ^ 1, ack: b ^ 1, limit: a.wrapping_add(b), flags: if port % 3 == 0 { SEG_FIN } else { 0 }, len: 1 + port % 1400 }),
                10 => Message::Ack(Segment { conn_id: a, token: b, seq: 0, ack: b, limit: a, flags: SEG_PROBE, len: 0 }),
                2 => Message::Reject { conn_id: a, client_token: b, reason: RejectReason::BacklogFull },
                3 => Message::Close { conn_id: a, token: b },
                4 => Message::CloseAck { conn_id: a, token: b },
                5 => Message::ResolveRequest,
                6 => Message::ResolveReply { mac: A },
                7 => Message::EchoRequest { seq: a, stamp: b },
                8 => Message::AcceptAck { conn_id: a, token: b },
                _ => Message::EchoReply { seq: a, stamp: b },
            };
            let mut h = hdr();
            h.src_port = port;
            let r = Repr { header: h, message };
            proptest::prop_assert_eq!(Repr::parse_bytes(&r.to_bytes(0x1234), 0x1234).unwrap(), r);
        }
    }
}

#[cfg(test)]
mod declared_once {
    use super::{Kind, RejectReason};

    /// The Wireshark dissector (deploy/wireshark/dsan.lua) names every kind
    /// and every reject reason as the declaration does.
    #[test]
    fn the_dissector_knows_every_declared_code() {
        let lua = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/wireshark/dsan.lua"),
        )
        .unwrap();
        for k in Kind::ALL {
            let entry = format!("[0x{:02x}] = \"{k:?}\"", k.code());
            assert!(lua.contains(&entry), "dsan.lua lacks {entry}");
            let body = format!("[0x{:02x}] = ", k.code());
            let lens = lua.split("local body_len").nth(1).unwrap_or("");
            assert!(
                lens.contains(&body),
                "dsan.lua has no body length for {k:?}"
            );
        }
        for r in RejectReason::ALL {
            let entry = format!("[0x{:02x}] = \"{}\"", r.code(), r.label().unwrap());
            assert!(lua.contains(&entry), "dsan.lua lacks {entry}");
        }
    }

    #[test]
    fn indices_follow_the_declaration_and_unknown_codes_have_none() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(k.index(), Some(i));
            assert_eq!(Kind::from(k.code()), *k);
        }
        assert_eq!(Kind::from(0x7f).index(), None);
        assert_eq!(RejectReason::TcpOnly.label(), Some("tcp_only"));
        assert_eq!(Kind::COUNT, Kind::NAMES.len());
    }

    /// The dissector reads each kind's body where the layout table says:
    /// every `t:add(f.NAME, buf(b + AT, LEN))` of a kind's branch is one of
    /// its fields, every field is there, and its body length is the table's.
    #[test]
    fn the_dissector_reads_every_body_as_the_layout_table_says() {
        use super::{body_layout, BodyField};
        let lua = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/wireshark/dsan.lua"),
        )
        .unwrap();
        // The branches: `if kind == 0x01 then` / `elseif kind == 0x04 or kind == 0x05 ...`.
        let mut branches: Vec<(Vec<u8>, Vec<BodyField>)> = Vec::new();
        for line in lua.lines().map(str::trim) {
            if (line.starts_with("if kind == ") || line.starts_with("elseif kind == "))
                && line.ends_with("then")
            {
                let codes = line
                    .split("kind == ")
                    .skip(1)
                    .map(|c| {
                        let hex = c
                            .split_whitespace()
                            .next()
                            .unwrap()
                            .trim_start_matches("0x");
                        u8::from_str_radix(hex, 16).unwrap()
                    })
                    .collect();
                branches.push((codes, Vec::new()));
                continue;
            }
            if line == "end" {
                continue;
            }
            let Some((_, fields)) = branches.last_mut() else {
                continue;
            };
            for add in line.split("t:add(f.").skip(1) {
                let name = add.split(',').next().unwrap();
                if name == "payload" {
                    continue;
                }
                let args = add.split("buf(b").nth(1).unwrap();
                let args = args.split(')').next().unwrap();
                let (at, len) = args.split_once(',').unwrap();
                let at = at.trim().trim_start_matches('+').trim();
                let at = if at.is_empty() {
                    0
                } else {
                    at.parse().unwrap()
                };
                let len = len.trim().parse().unwrap();
                let name: &'static str = Box::leak(name.to_string().into_boxed_str());
                fields.push(BodyField { name, at, len });
            }
        }
        for k in Kind::ALL {
            let l = body_layout(k).unwrap();
            let (want, len) = (l.fields, l.len);
            let have = branches
                .iter()
                .find(|(codes, _)| codes.contains(&k.code()))
                .map(|(_, f)| f.clone())
                .unwrap_or_default();
            assert_eq!(have, want, "dsan.lua's fields of {k:?}");
            // Fields and reserved bytes cover the body exactly once.
            let mut covered = vec![0u8; len];
            for r in want
                .iter()
                .map(BodyField::range)
                .chain(l.reserved.iter().cloned())
            {
                for i in r {
                    covered[i] += 1;
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{k:?}: {covered:?}");
            let entry = format!("[0x{:02x}] = {len}", k.code());
            assert!(
                lua.split("local body_len").nth(1).unwrap().contains(&entry),
                "dsan.lua's body length of {k:?} is not {len}"
            );
        }
    }
}
