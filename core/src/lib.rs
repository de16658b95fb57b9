//! dsan's sans-IO core: what the SAN protocol is, with no I/O in it.
//!
//! * [`wire`]: typed zero-copy views of SAN frames, parse and emit;
//! * [`proto`]: the protocol state machines (connection set-up, teardown
//!   and byte streams), sans-IO: frames, application calls and time go in
//!   as arguments, frames to send and events come out;
//! * [`time`]: the core's notion of time (a nanosecond count the caller
//!   passes in);
//! * [`net`]: SAN subnets.
//!
//! The protocol's vocabulary that the process-daemon contract speaks too
//! (a request's key, SAN subnets, the backlog clamp) is declared here, where
//! the core owns it; the channel crate (`dsan-channel`) uses it from here.
//! The daemon's dataplane (`dataplane`) drives this core from its lcore;
//! the simulators in `dataplane/tests` drive it on a simulated fabric.
#![deny(unsafe_code)]

pub mod net;
pub mod proto;
pub mod time;
pub mod wire;
