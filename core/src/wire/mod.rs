//! SAN frames on the wire: typed zero-copy views and plain `Repr`s.
//!
//! Two levels, as in smoltcp:
//! * a *view* ([`Frame`]) over any `T: AsRef<[u8]>`, with field offsets in a
//!   private `field` module. Untrusted input must go through
//!   [`Frame::new_checked`]; once it succeeds, no accessor panics.
//! * a *representation* ([`Repr`]), a plain value with `parse`, `buffer_len` and
//!   `emit`. Emitting uses [`Frame::new_unchecked`] on a buffer of exactly
//!   `buffer_len()` bytes.
//!
//! Unknown codes never fail at the view level: [`Kind`] and [`RejectReason`] have
//! an `Unknown(raw)` variant; [`Repr::parse`] turns them into [`Error`].
//!
//! The byte-level specification is `docs/wire-protocol.md`.

mod frame;

pub use frame::{
    body, body_layout, payload, BodyField, BodyLayout, EthernetAddress, Frame, Ipv4, Kind, Message,
    Offer, RejectReason, Repr, ResetReason, SanHeader, Segment, DATA_HEADER_LEN, DEFAULT_ETHERTYPE,
    ETH_HEADER_LEN, PAYLOAD_OFFSET, SAN_HEADER_LEN, SEG_FIN, SEG_NAK, SEG_PROBE, SEG_URG, VERSION,
};

/// The one parse error: the bytes are not a well-formed SAN frame of this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the header and the message kind need.
    #[error("frame truncated")]
    Truncated,
    /// A version this implementation does not speak.
    #[error("unsupported SAN protocol version")]
    Version,
    /// An unknown message kind or reject reason, or a reserved field that is not zero.
    #[error("malformed SAN frame")]
    Malformed,
    /// The EtherType is not the SAN's.
    #[error("not a SAN frame")]
    EtherType,
}

/// Result of parsing.
pub type Result<T> = core::result::Result<T, Error>;
