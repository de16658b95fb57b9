//! The WSD switch: one application socket served by two providers, kernel
//! TCP/IP and the SAN.
//!
//! * [`socket`] returns a real, pollable descriptor (an epoll instance that
//!   watches the kernel TCP socket and the SAN side of the same socket).
//! * [`listen`] listens on kernel TCP first; only if the socket is bound to a
//!   SAN address of this host or to the wildcard does it also create, bind and
//!   listen a SAN socket with the same port and backlog, and event-select
//!   FD_ACCEPT on it. If the SAN side cannot be set up, the socket serves TCP
//!   alone and the application gets no error.
//! * One accept thread per process waits on the SAN listeners' events and
//!   accepts through the provider with a condition function that applies the
//!   application's decision ([`set_condition`]; without one, accept). SAN and
//!   kernel TCP connections both come out of [`accept`] on the same descriptor,
//!   which is readable when either kind is ready.
//! * [`connect`] goes over the SAN when the destination is in a SAN subnet,
//!   else over TCP; a SAN ETIMEDOUT (or a SAN socket that cannot be set up)
//!   falls back to TCP transparently (and is counted by the daemon);
//!   ECONNREFUSED, ECONNRESET and EHOSTUNREACH do not fall back, and the
//!   application sees ECONNREFUSED for both refusals and "no listener".
//! * [`transport`] says which provider serves a connection.
//! * For an interposing library, *lean* sockets ([`adopt_lean`],
//!   [`accept_lean`]): the socket's descriptor is the program's own number,
//!   an eventfd that is the connection's readiness, and a SAN connection
//!   costs the process that one descriptor.
//!
//! The C ABI (`control/include/dsan_switch.h`, `libdsan_switch.so`) is in `capi`.
#![deny(unsafe_code)] // only the modules that need it allow it

pub mod app;
mod capi;
mod switch;

pub use capi::*;
pub use switch::{
    accept, accept_lean, adopt, adopt_lean, at_mark, bind, claim_inherited, claim_passed, close,
    connect, connect_settled, error, high, inherited_listener, input_now, kernel_socket, listen,
    pass_ticket, readable_now, recv, release_inherited, release_kernel_socket, renumber,
    san_connection, san_destination, send, set_condition, set_daemon_socket, set_fd_base,
    set_fork_hooks, set_linger_abort, set_oob_inline, set_san_only, set_takeover, set_thread_hook,
    set_wake_sockets, set_watch_writable, shutdown, socket, take_tcp, transport, watch_writable,
    writable_now, Condition, Inherited, Socket, Transport,
};
