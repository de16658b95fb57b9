//! The SAN protocol core: sans-IO, deterministic, no clock and no threads.
//!
//! Inputs are `handle_*(now, ...)` calls and application commands; outputs
//! are drained with `poll_*` (see [`endpoint`] for the order). Time is an
//! [`Instant`](crate::time::Instant) passed in by the caller; randomness comes
//! through [`rng::Rng`] so that a simulation replays exactly.
//!
//! | file | what |
//! |---|---|
//! | `endpoint` | the state of one host and all of its behaviour: inputs, outputs and timers, in sections (set-up, the client side, the server side, established connections, tombstones) |
//! | `server` | the types of listeners and pending requests |
//! | `client` | the type of a connect attempt |
//! | `connection` | established connections and their table, retransmission backoff |
//! | `stream` | one connection's byte stream: sequence, window, acknowledgement and retransmission arithmetic |
//! | `streams` | every connection's stream in the slot of its handle, the stream timers, the transmit queue and the streams held until their client confirms (the rings are the edge's) |
//! | `slab` | handles and the connection tables' slots |
//! | `tombstone` | what a finished request's retransmission is answered |
//! | `types`, `config` | vocabulary and parameters |
//! | `resolve`, `rng` | address resolution, randomness |
//!
//! `Endpoint` is implemented in one file: the files it holds the state of
//! (`server`, `client`, `connection`, `tombstone`, `streams`, `slab`,
//! `types`) import nothing from it, so the module has no import circle.

mod client;
mod config;
mod connection;
pub mod endpoint;
pub mod resolve;
pub mod rng;
mod server;
pub mod slab;
pub mod stream;
mod streams;
mod tombstone;
mod types;

#[cfg(test)]
mod tests;

pub use config::{effective_backlog, PortOwner, PortSet, ProtoConfig, Subnet, MAX_BACKLOG};
pub use connection::{Connection, Role, ACCEPT_SENDS};
pub use endpoint::{Endpoint, WIRE_INDEX_ENTRY_BYTES};
pub use streams::STREAM_SLOT_BYTES;
pub use types::*;
