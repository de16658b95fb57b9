//! The channel between dsand and the processes it serves: the contract
//! between two processes that do not trust each other.
//!
//! * [`region`]: the per-process shared region (sealed memfd): socket table,
//!   command ring, backlog rings; who writes each word.
//! * [`ring`]: the single-producer, single-consumer ring of 64-byte slots
//!   that every queue in the region is; each side keeps its own indices and
//!   treats the other's as untrusted input.
//! * [`msg`]: the typed messages in those slots (commands from the process,
//!   connection requests from the daemon): views and values, parse checks
//!   everything, emit is the only writer.
//! * [`ctl`]: the application's requests on the control socket and the
//!   daemon's replies, typed and versioned.
//! * [`stream`]: per-connection send and receive byte rings, and who
//!   writes which of their words.
//! * [`doorbell`]: how a process wakes a sleeping lcore.
//! * [`net`]: the subnet type (SAN addresses and their prefixes), the
//!   protocol core's (`dsan-core`), as are [`msg::RequestKey`] and the
//!   backlog clamp ([`region::effective_backlog`]).
//! * [`sys`]: eventfds, futexes, sealed mappings, control-socket lines with
//!   descriptors.
//! * [`wake`]: wake sockets, the readiness descriptors the daemon's lcore
//!   signals itself without ever blocking.
//!
//! The daemon (`control`, `dataplane`) and the application libraries
//! (`provider-shim`, the switch) both depend on this crate and on nothing of
//! each other; this crate depends only on the sans-IO core (`dsan-core`),
//! for the protocol's vocabulary.
#![deny(unsafe_code)] // only the modules that need it allow it

pub mod ctl;
pub mod doorbell;
pub mod msg;
pub mod net;
pub mod region;
pub mod ring;
pub mod stream;
pub mod sys;
pub mod wake;
