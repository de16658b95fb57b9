//! The SAN service provider linked into applications.
//!
//! Not built yet: it is issue #4's work (listen, event-select, accept and connect
//! as ring messages to the dataplane). The crate exists so that the workspace has
//! its final layout; it exports nothing.
#![deny(unsafe_code)]
