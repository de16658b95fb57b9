//! dsan's polling dataplane.
//!
//! Layers, strictly separated (only the I/O edge contains `unsafe`):
//! * [`wire`]: typed zero-copy views of SAN frames, parse and emit;
//! * [`proto`]: the connection state machines, sans-IO (time is an argument);
//! * the I/O edge: [`device`] (the [`device::Device`] trait and the in-memory
//!   loopback), [`engine`] (the lcore loop and idle policies), [`sys`]
//!   (eventfd), and `dpdk` (EAL, mempools, ports, mbufs; feature `dpdk`);
//! * [`node`]: the handler that the daemon runs in the loop, joining the
//!   protocol core to a device and to the attached processes (their shared
//!   regions, rings and messages are the `dsan-channel` crate's).
#![deny(unsafe_code)]

pub mod device;
pub mod engine;
pub mod node;
pub mod proto;
pub mod sys;
pub mod time;
pub mod wire;

#[cfg(feature = "dpdk")]
pub mod dpdk;
