//! The SAN protocol core: sans-IO, deterministic, no clock and no threads.
//!
//! Inputs are `handle_*(now, ...)` calls and application commands; outputs
//! are drained with `poll_*` (see [`endpoint`] for the order). Time is an
//! [`Instant`](crate::time::Instant) passed in by the caller; randomness comes
//! through [`rng::Rng`] so that a simulation replays exactly.
//!
//! | file | what |
//! |---|---|
//! | `endpoint` | the state of one host, its inputs, outputs and timers |
//! | `server` | listeners, pending requests, decisions, expiry |
//! | `client` | connect attempts, retransmission, outcomes |
//! | `connection` | established connections, the close handshake |
//! | `stream` | one connection's byte stream: sequence, window, acknowledgement and retransmission arithmetic (the node's `streams` holds the rings, timers and transmit queue around it) |
//! | `slab` | handles and the connection tables' slots |
//! | `tombstone` | consistent answers for finished requests |
//! | `types`, `config` | vocabulary and parameters |
//! | `resolve`, `rng` | address resolution, randomness |

mod client;
mod config;
mod connection;
pub mod endpoint;
pub mod resolve;
pub mod rng;
mod server;
pub mod slab;
pub mod stream;
mod tombstone;
mod types;

#[cfg(test)]
mod tests;

pub use config::{PortOwner, PortSet, ProtoConfig, Subnet};
pub use connection::{Connection, Role, ACCEPT_SENDS};
pub use endpoint::{Endpoint, WIRE_INDEX_ENTRY_BYTES};
pub use server::Incoming;
pub use types::*;
