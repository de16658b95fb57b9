//! `libdsan_preload.so`: unmodified Linux programs over the SAN.
//!
//! Loaded with `LD_PRELOAD`, it interposes the socket calls of the C
//! library and applies the WSD switch's rules to AF_INET stream sockets: a
//! listener bound to a SAN address of this host or the wildcard listens on
//! kernel TCP and on the SAN; a connect to a SAN subnet goes over the SAN,
//! with WSD's fallback to TCP. Everything else (loopback, AF_UNIX, AF_INET6,
//! UDP, other destinations, a process with no daemon) goes to the kernel
//! untouched, after one bitmap test per call (or, for connect and listen,
//! a few system calls to look at the socket).
//!
//! * The program's descriptor numbers stay its own: a socket the switch
//!   takes over keeps its number (the switch socket's descriptor is
//!   duplicated onto it), so select's FD_SETSIZE and dup stay sane, and a
//!   program that waits on kernel and SAN descriptors together is woken by
//!   either, by the kernel, without spinning (`wait`).
//! * The library's own calls (and every call on the switch's threads) go
//!   straight to the C library: a thread-local flag is set while the
//!   library runs.
//! * Rules and logging: `rules` (`DSAN_PRELOAD_CONF`, `DSAN_PRELOAD_LOG=1`).
//! * fork: a child keeps its inherited descriptors (it may close them) and
//!   uses the kernel for new sockets; SAN sockets stay with the parent.
#![deny(unsafe_code)] // only the modules that need it allow it

mod calls;
mod closing;
mod cret;
mod io;
mod opts;
mod pass;
mod real;
mod rules;
mod sock;
mod table;
mod wait;
