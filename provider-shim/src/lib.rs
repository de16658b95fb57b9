//! dsan's SAN service provider, linked into applications.
//!
//! Layers:
//! * [`Provider`]: the attachment to the local `dsand` (control socket,
//!   shared region, doorbell) and the provider calls (`socket`, `bind`,
//!   `listen`, `event_select`, `enum_network_events`, `accept` with a
//!   condition function, `connect`, `close`) as ring messages to the
//!   daemon, with typed [`Error`]s;
//! * [`SanSocket`]: an owned socket handle for Rust callers (closed on drop);
//! * `capi`: the C ABI of `include/dsan_provider.h` (`libdsan_provider.so`),
//!   every function behind a panic boundary, returning a non-negative value
//!   or a negative errno; [`cabi`]: the panic boundary and the checks of
//!   C callers' buffers that it shares with the switch's C ABI.
//!
//! Semantics follow Windows Sockets Direct; `docs/c-api.md` documents each call.
#![deny(unsafe_code)] // only the modules that need it allow it

pub mod cabi;
mod capi;
mod provider;
pub mod sockaddr;

pub use capi::*;
pub use provider::{
    ClaimTicket, Decision, Error, NetworkEvents, Provider, Readiness, SanSocket, SocketId,
    StreamInfo, Subnet, FD_ACCEPT, FD_ALL, FD_CLOSE, FD_CONNECT, FD_READ, FD_WRITE, MSG_DONTWAIT,
    MSG_OOB, MSG_PEEK, TICKET_BYTES,
};
