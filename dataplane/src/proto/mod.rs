//! The SAN protocol core: sans-IO, deterministic, no clock and no threads.
//!
//! Inputs are `handle_*(now, ...)` / `on_*` calls; outputs are drained with
//! `poll_*`. Time is an [`Instant`](crate::time::Instant) passed in by the caller.

pub mod resolve;
