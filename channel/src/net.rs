//! SAN addresses: the one subnet type of the project (the daemon's
//! configuration, the protocol core's routing, the switch's rules),
//! declared by the protocol core (`dsan_core::net`).

pub use dsan_core::net::Subnet;
