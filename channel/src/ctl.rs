//! The application's requests on the daemon's control socket, and the
//! daemon's replies: typed, versioned and checked as the ring messages are
//! ([`crate::msg`]). The operator's requests (`dsanctl`: status, ping,
//! listeners, connections, stats, trace) stay JSON lines on the same
//! socket; a message that starts with [`MAGIC`] is one of these.
//!
//! Every message is a header of [`HEADER`] bytes and a body:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | [`MAGIC`] (`0xd5`: never the start of a JSON line) |
//! | 1 | [`VERSION`] |
//! | 2 | kind ([`Request`] below 128, [`Reply`] from 128) |
//! | 3 | reserved, 0 |
//! | 4..8 | body length, little-endian, at most [`MAX_BODY`] |
//!
//! Integers in bodies are little-endian; reserved bytes are zero; a body's
//! length is exactly its kind's. Descriptors travel beside the message
//! (`SCM_RIGHTS` on its first byte); how many each kind carries is
//! [`Request::descriptors`].
//!
//! `parse` checks everything and `emit` is the only writer; the fuzz target
//! `ctl_message` drives `parse` with arbitrary bytes.

use crate::net::Subnet;
use std::net::Ipv4Addr;

/// First byte of every typed control message.
pub const MAGIC: u8 = 0xd5;
/// The version of this format; a message of another is refused.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER: usize = 8;
/// Longest body.
pub const MAX_BODY: usize = 4096;
/// Most subnets a reply carries.
pub const MAX_SUBNETS: usize = 256;
/// Longest refusal message, in bytes (longer ones are cut at a character).
pub const MAX_MESSAGE: usize = 1024;

/// Declares a set of reasons once: the enum, its wire codes and its labels
/// (metrics and logs use the labels, in this order).
macro_rules! reasons {
    ($(#[$m:meta])* $name:ident, $labels:ident { $($(#[$vm:meta])* $var:ident = $code:literal, $label:literal;)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $var = $code),* }
        /// The labels, by code.
        pub const $labels: [&str; [$($code),*].len()] = [$($label),*];
        impl $name {
            /// Every reason, by code.
            pub const ALL: [$name; [$($code),*].len()] = [$($name::$var),*];
            /// Its label.
            pub fn label(self) -> &'static str {
                $labels[self as usize]
            }
            /// The reason with `label`.
            pub fn from_label(label: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|r| r.label() == label)
            }
            fn from_code(c: u8) -> Option<Self> {
                Self::ALL.get(usize::from(c)).copied()
            }
        }
    };
}

reasons! {
    /// Why the switch fell back to kernel TCP
    /// (`dsan_switch_fallbacks_total{reason}`).
    FallbackReason, FALLBACK_REASONS {
        /// The SAN connect took longer than the switch waits.
        TimedOut = 0, "timed_out";
        /// The peer's daemon answered that the port is served on TCP only.
        TcpOnly = 1, "tcp_only";
        /// No SAN socket could be made.
        NoSanSocket = 2, "no_san_socket";
    }
}

reasons! {
    /// Why a switch listener serves kernel TCP only
    /// (`dsan_switch_san_listen_failures_total{reason}`).
    ListenFailure, LISTEN_FAILURE_REASONS {
        /// The SAN port is held by another listener.
        InUse = 0, "in_use";
        /// The process may not take that port.
        Denied = 1, "denied";
        /// Anything else.
        Other = 2, "other";
    }
}

/// An application's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Attach this connection: the reply is [`Reply::Attached`] with three
    /// descriptors (the region's memfd, the doorbell page, the doorbell).
    Attach,
    /// Socket `sock`'s event descriptor (an eventfd; a second one is the
    /// descriptor FD_WRITE signals instead).
    EventFd {
        /// The socket's slot.
        sock: u32,
    },
    /// Socket `sock`'s connection's life (the read end of a pipe).
    Life {
        /// The socket's slot.
        sock: u32,
    },
    /// The claim key of the connection whose life's write end comes with
    /// it: the reply is [`Reply::Key`].
    LifeKey,
    /// The host's SAN addresses: the reply is [`Reply::Subnets`].
    Subnets,
    /// The switch fell back to kernel TCP.
    SwitchFallback(FallbackReason),
    /// A switch listener serves kernel TCP only: its SAN side failed.
    SwitchListenFailed {
        /// Why.
        reason: ListenFailure,
        /// The port.
        port: u16,
        /// The errno of the failure.
        errno: i32,
    },
}

/// The daemon's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Attached (with three descriptors, see [`Request::Attach`]).
    Attached {
        /// The attachment's id.
        app: u64,
        /// The region's size in bytes.
        region_size: u64,
        /// The region's layout version (`region::REGION_VERSION`).
        region_version: u32,
        /// The host's SAN addresses.
        subnets: Vec<Subnet>,
    },
    /// The host's SAN addresses.
    Subnets(Vec<Subnet>),
    /// A connection's claim key.
    Key(u64),
    /// Refused: an errno for the caller and a message for people.
    Refused {
        /// The errno the library returns (EINVAL, EMFILE, EACCES, ...).
        errno: i32,
        /// Why, in words.
        message: String,
    },
}

/// Why a control message did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    /// Shorter than its header or its declared body.
    #[error("truncated control message")]
    Truncated,
    /// The first byte is not [`MAGIC`].
    #[error("not a typed control message")]
    Magic,
    /// Another version of the format.
    #[error("control message version {0} (this side speaks {VERSION})")]
    Version(u8),
    /// The kind byte names no message of this direction.
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    /// A reserved byte is not zero.
    #[error("reserved bytes set")]
    Reserved,
    /// The body's length is not its kind's, or over [`MAX_BODY`].
    #[error("bad body length")]
    Length,
    /// A field holds a value its type does not have.
    #[error("bad field {0}")]
    Field(&'static str),
}

mod kind {
    pub(super) const ATTACH: u8 = 1;
    pub(super) const EVENT_FD: u8 = 2;
    pub(super) const LIFE: u8 = 3;
    pub(super) const LIFE_KEY: u8 = 4;
    pub(super) const SUBNETS: u8 = 5;
    pub(super) const SWITCH_FALLBACK: u8 = 6;
    pub(super) const SWITCH_LISTEN_FAILED: u8 = 7;
    pub(super) const OK: u8 = 128;
    pub(super) const ATTACHED: u8 = 129;
    pub(super) const SUBNET_LIST: u8 = 130;
    pub(super) const KEY: u8 = 131;
    pub(super) const REFUSED: u8 = 132;
}

/// Splits a message into its kind and body, checking the header.
fn split(b: &[u8]) -> Result<(u8, &[u8]), CtlError> {
    if b.len() < HEADER {
        return Err(CtlError::Truncated);
    }
    if b[0] != MAGIC {
        return Err(CtlError::Magic);
    }
    if b[1] != VERSION {
        return Err(CtlError::Version(b[1]));
    }
    if b[3] != 0 {
        return Err(CtlError::Reserved);
    }
    let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
    if len > MAX_BODY {
        return Err(CtlError::Length);
    }
    match b.len() - HEADER {
        n if n < len => Err(CtlError::Truncated),
        n if n > len => Err(CtlError::Length),
        _ => Ok((b[2], &b[HEADER..])),
    }
}

/// The length of the whole message whose first bytes are `head`, once its
/// header is there (`None`: not yet). For a reader that takes a message in
/// pieces.
pub fn message_len(head: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(head.get(4..8)?.try_into().ok()?) as usize;
    Some(HEADER + len.min(MAX_BODY + 1))
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.extend_from_slice(&[MAGIC, VERSION, kind, 0]);
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn exact(body: &[u8], len: usize) -> Result<(), CtlError> {
    if body.len() == len {
        Ok(())
    } else {
        Err(CtlError::Length)
    }
}

impl Request {
    /// Parses a whole request.
    ///
    /// # Errors
    /// Anything but a well-formed request of this version.
    pub fn parse(b: &[u8]) -> Result<Request, CtlError> {
        let (k, body) = split(b)?;
        match k {
            kind::ATTACH | kind::LIFE_KEY | kind::SUBNETS => {
                exact(body, 0)?;
                Ok(match k {
                    kind::ATTACH => Request::Attach,
                    kind::LIFE_KEY => Request::LifeKey,
                    _ => Request::Subnets,
                })
            }
            kind::EVENT_FD | kind::LIFE => {
                exact(body, 4)?;
                let sock = u32_at(body, 0);
                Ok(if k == kind::EVENT_FD {
                    Request::EventFd { sock }
                } else {
                    Request::Life { sock }
                })
            }
            kind::SWITCH_FALLBACK => {
                exact(body, 4)?;
                if body[1..4] != [0; 3] {
                    return Err(CtlError::Reserved);
                }
                FallbackReason::from_code(body[0])
                    .map(Request::SwitchFallback)
                    .ok_or(CtlError::Field("reason"))
            }
            kind::SWITCH_LISTEN_FAILED => {
                exact(body, 8)?;
                if body[1] != 0 {
                    return Err(CtlError::Reserved);
                }
                let reason = ListenFailure::from_code(body[0]).ok_or(CtlError::Field("reason"))?;
                let port = u16::from_le_bytes([body[2], body[3]]);
                let errno = u32_at(body, 4) as i32;
                Ok(Request::SwitchListenFailed {
                    reason,
                    port,
                    errno,
                })
            }
            other => Err(CtlError::UnknownKind(other)),
        }
    }

    /// The request as bytes (the only writer of the format).
    pub fn emit(&self) -> Vec<u8> {
        match *self {
            Request::Attach => frame(kind::ATTACH, &[]),
            Request::LifeKey => frame(kind::LIFE_KEY, &[]),
            Request::Subnets => frame(kind::SUBNETS, &[]),
            Request::EventFd { sock } => frame(kind::EVENT_FD, &sock.to_le_bytes()),
            Request::Life { sock } => frame(kind::LIFE, &sock.to_le_bytes()),
            Request::SwitchFallback(r) => frame(kind::SWITCH_FALLBACK, &[r as u8, 0, 0, 0]),
            Request::SwitchListenFailed {
                reason,
                port,
                errno,
            } => {
                let mut b = [0u8; 8];
                b[0] = reason as u8;
                b[2..4].copy_from_slice(&port.to_le_bytes());
                b[4..8].copy_from_slice(&errno.to_le_bytes());
                frame(kind::SWITCH_LISTEN_FAILED, &b)
            }
        }
    }

    /// How many descriptors may come with it: (fewest, most).
    pub fn descriptors(&self) -> (usize, usize) {
        match self {
            Request::EventFd { .. } => (1, 2),
            Request::Life { .. } | Request::LifeKey => (1, 1),
            _ => (0, 0),
        }
    }

    /// Its name in logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Attach => "attach",
            Request::EventFd { .. } => "event_fd",
            Request::Life { .. } => "life",
            Request::LifeKey => "life_key",
            Request::Subnets => "subnets",
            Request::SwitchFallback(_) => "switch_fallback",
            Request::SwitchListenFailed { .. } => "switch_listen_failed",
        }
    }
}

/// Subnets as 8 bytes each: the address, the prefix, three reserved.
fn emit_subnets(out: &mut Vec<u8>, s: &[Subnet]) {
    let n = s.len().min(MAX_SUBNETS);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for s in &s[..n] {
        out.extend_from_slice(&u32::from(s.addr).to_le_bytes());
        out.extend_from_slice(&[s.prefix, 0, 0, 0]);
    }
}

fn parse_subnets(b: &[u8]) -> Result<Vec<Subnet>, CtlError> {
    if b.len() < 4 {
        return Err(CtlError::Length);
    }
    let n = u32_at(b, 0) as usize;
    if n > MAX_SUBNETS {
        return Err(CtlError::Field("subnet count"));
    }
    exact(&b[4..], n * 8)?;
    b[4..]
        .chunks_exact(8)
        .map(|c| {
            if c[5..8] != [0; 3] {
                return Err(CtlError::Reserved);
            }
            if c[4] > 32 {
                return Err(CtlError::Field("prefix"));
            }
            Ok(Subnet {
                addr: Ipv4Addr::from(u32_at(c, 0)),
                prefix: c[4],
            })
        })
        .collect()
}

impl Reply {
    /// Parses a whole reply.
    ///
    /// # Errors
    /// Anything but a well-formed reply of this version.
    pub fn parse(b: &[u8]) -> Result<Reply, CtlError> {
        let (k, body) = split(b)?;
        match k {
            kind::OK => exact(body, 0).map(|()| Reply::Ok),
            kind::ATTACHED => {
                if body.len() < 24 {
                    return Err(CtlError::Length);
                }
                let app = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
                let region_size = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
                let region_version = u32_at(body, 16);
                if body[20..24] != [0; 4] {
                    return Err(CtlError::Reserved);
                }
                Ok(Reply::Attached {
                    app,
                    region_size,
                    region_version,
                    subnets: parse_subnets(&body[24..])?,
                })
            }
            kind::SUBNET_LIST => parse_subnets(body).map(Reply::Subnets),
            kind::KEY => {
                exact(body, 8)?;
                Ok(Reply::Key(u64::from_le_bytes(
                    body.try_into().expect("8 bytes"),
                )))
            }
            kind::REFUSED => {
                if body.len() < 8 {
                    return Err(CtlError::Length);
                }
                let errno = u32_at(body, 0) as i32;
                let len = u32_at(body, 4) as usize;
                if len > MAX_MESSAGE {
                    return Err(CtlError::Field("message length"));
                }
                exact(&body[8..], len)?;
                let message = std::str::from_utf8(&body[8..])
                    .map_err(|_| CtlError::Field("message"))?
                    .to_string();
                Ok(Reply::Refused { errno, message })
            }
            other => Err(CtlError::UnknownKind(other)),
        }
    }

    /// The reply as bytes (the only writer of the format).
    pub fn emit(&self) -> Vec<u8> {
        match self {
            Reply::Ok => frame(kind::OK, &[]),
            Reply::Attached {
                app,
                region_size,
                region_version,
                subnets,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&app.to_le_bytes());
                b.extend_from_slice(&region_size.to_le_bytes());
                b.extend_from_slice(&region_version.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
                emit_subnets(&mut b, subnets);
                frame(kind::ATTACHED, &b)
            }
            Reply::Subnets(s) => {
                let mut b = Vec::new();
                emit_subnets(&mut b, s);
                frame(kind::SUBNET_LIST, &b)
            }
            Reply::Key(k) => frame(kind::KEY, &k.to_le_bytes()),
            Reply::Refused { errno, message } => {
                let mut end = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let mut b = Vec::new();
                b.extend_from_slice(&errno.to_le_bytes());
                b.extend_from_slice(&(end as u32).to_le_bytes());
                b.extend_from_slice(&message.as_bytes()[..end]);
                frame(kind::REFUSED, &b)
            }
        }
    }

    /// A refusal.
    pub fn refused(errno: i32, message: impl Into<String>) -> Reply {
        Reply::Refused {
            errno,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn requests() -> Vec<Request> {
        let mut v = vec![
            Request::Attach,
            Request::LifeKey,
            Request::Subnets,
            Request::EventFd { sock: 7 },
            Request::Life { sock: u32::MAX },
        ];
        v.extend(FallbackReason::ALL.map(Request::SwitchFallback));
        v.extend(
            ListenFailure::ALL.map(|reason| Request::SwitchListenFailed {
                reason,
                port: 8080,
                errno: -98,
            }),
        );
        v
    }

    fn replies() -> Vec<Reply> {
        let s = vec![
            "198.18.0.1/24".parse().unwrap(),
            "198.19.255.254/32".parse().unwrap(),
        ];
        vec![
            Reply::Ok,
            Reply::Attached {
                app: 3,
                region_size: 1 << 30,
                region_version: 4,
                subnets: s.clone(),
            },
            Reply::Subnets(s),
            Reply::Subnets(vec![]),
            Reply::Key(u64::MAX),
            Reply::refused(libc::EMFILE, "EMFILE: the share is used up (ü)"),
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_cut_is_refused() {
        for r in requests() {
            let b = r.emit();
            assert_eq!(Request::parse(&b), Ok(r));
            assert_eq!(message_len(&b), Some(b.len()));
            for n in 0..b.len() {
                assert!(Request::parse(&b[..n]).is_err(), "{r:?} cut at {n}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Request::parse(&long).is_err());
            // A reply is not a request, nor a request a reply.
            assert!(Reply::parse(&b).is_err());
        }
        for r in replies() {
            let b = r.emit();
            assert_eq!(Reply::parse(&b), Ok(r.clone()));
            for n in 0..b.len() {
                assert!(Reply::parse(&b[..n]).is_err(), "{r:?} cut at {n}");
            }
            assert!(Request::parse(&b).is_err());
        }
    }

    #[test]
    fn another_version_and_reserved_bytes_are_refused() {
        let mut b = Request::Attach.emit();
        b[1] = VERSION + 1;
        assert_eq!(Request::parse(&b), Err(CtlError::Version(VERSION + 1)));
        let mut b = Request::Attach.emit();
        b[3] = 1;
        assert_eq!(Request::parse(&b), Err(CtlError::Reserved));
        let mut b = Request::SwitchFallback(FallbackReason::TcpOnly).emit();
        b[HEADER] = 9;
        assert_eq!(Request::parse(&b), Err(CtlError::Field("reason")));
        assert_eq!(
            Request::parse(b"{\"cmd\":\"status\"}"),
            Err(CtlError::Magic)
        );
    }

    #[test]
    fn labels_are_declared_once_and_found_again() {
        assert_eq!(FALLBACK_REASONS, ["timed_out", "tcp_only", "no_san_socket"]);
        assert_eq!(LISTEN_FAILURE_REASONS, ["in_use", "denied", "other"]);
        for r in FallbackReason::ALL {
            assert_eq!(FallbackReason::from_label(r.label()), Some(r));
        }
        assert_eq!(ListenFailure::from_label("nope"), None);
    }

    /// The fuzz target's seed corpus (`fuzz/seeds/ctl_message`) is one of
    /// every example above; `DSAN_BLESS=1` writes it again.
    #[test]
    fn the_fuzz_seeds_are_every_example() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/ctl_message");
        let seeds: Vec<(String, Vec<u8>)> = requests()
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("request_{i:02}_{}.bin", r.name()), r.emit()))
            .chain(
                replies()
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("reply_{i:02}.bin"), r.emit())),
            )
            .collect();
        if std::env::var_os("DSAN_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, b) in &seeds {
                std::fs::write(dir.join(name), b).unwrap();
            }
        }
        for (name, b) in &seeds {
            let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
                panic!("{name}: {e} (DSAN_BLESS=1 cargo test -p dsan-channel writes the seeds)")
            });
            assert_eq!(
                &on_disk, b,
                "{name} differs from its message (DSAN_BLESS=1 writes it again)"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_emit_inverts_it(bytes in proptest::collection::vec(any::<u8>(), 0..64), kind in 0u8..=255) {
            let mut b = vec![MAGIC, VERSION, kind, 0];
            b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            b.extend_from_slice(&bytes);
            if let Ok(r) = Request::parse(&b) {
                prop_assert_eq!(r.emit(), b.clone());
            }
            if let Ok(r) = Reply::parse(&b) {
                prop_assert_eq!(r.emit(), b);
            }
        }
    }
}
