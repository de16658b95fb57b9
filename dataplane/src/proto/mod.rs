//! The SAN protocol core: sans-IO, deterministic, no clock and no threads.
//!
//! Inputs are `handle_*(now, ...)` calls and application commands; outputs
//! are drained with `poll_*` (see [`endpoint`] for the order). Time is an
//! [`Instant`](crate::time::Instant) passed in by the caller; randomness comes
//! through [`rng::Rng`] so that a simulation replays exactly.

pub mod endpoint;
pub mod resolve;
pub mod rng;

#[cfg(test)]
mod tests;

pub use endpoint::{
    AcceptError, CloseError, ConnHandle, ConnectError, ConnectFailure, Connection, Decision,
    Endpoint, Event, Incoming, ListenError, ListenerId, ProtoConfig, ProtoStats, Role, SockAddr,
    Subnet, CONNECT_BUCKETS_S,
};
