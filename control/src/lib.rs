//! dsan's control plane.
//!
//! * [`config`]: dsand's TOML configuration and its checks;
//! * [`ctl`]: the control-socket protocol (JSON lines) spoken by dsand and dsanctl;
//! * [`metrics`]: the Prometheus endpoint;
//! * [`lab`]: the NIC-less lab (network namespaces, veths, one dsand per host);
//! * [`lcore`]: asking the dataplane lcore, and rendering its counters;
//! * [`os`]: namespaces, interface addresses, privileges.
//!
//! The binaries are `dsand` (the appliance daemon) and `dsanctl`.
#![deny(unsafe_code)]

pub mod config;
pub mod ctl;
pub mod lab;
pub mod lcore;
pub mod metrics;
pub mod os;
