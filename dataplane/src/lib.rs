//! dsan's polling dataplane.
//!
//! Layers, strictly separated (only the I/O edge contains `unsafe`):
//! * [`wire`], [`proto`], [`time`]: the sans-IO core (the `dsan-core`
//!   crate, re-exported here): frames, the protocol state machines, time as
//!   an argument;
//! * the I/O edge: [`device`] (the [`device::Device`] trait and the in-memory
//!   loopback), [`engine`] (the lcore loop and idle policies), [`sys`]
//!   (eventfd), and `dpdk` (EAL, mempools, ports, mbufs; feature `dpdk`);
//! * [`node`]: the handler that the daemon runs in the loop, joining the
//!   protocol core to a device and to the attached processes (their shared
//!   regions, rings and messages are the `dsan-channel` crate's).
#![deny(unsafe_code)]

pub use dsan_core::{net, proto, time, wire};

pub mod device;
pub mod engine;
pub mod node;
pub mod sys;

#[cfg(feature = "dpdk")]
pub mod dpdk;
