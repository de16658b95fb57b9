//! Which descriptors of the program are switch sockets (the switch's one
//! number table, `dsan_switch::app`, and each socket's one record,
//! `dsan_switch::Socket`), and which threads run the library's own code.

use std::cell::Cell;

thread_local! {
    /// Set while this thread runs the library's own code (or for the
    /// switch's threads, always): calls it makes pass straight to the C
    /// library.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// This thread is inside the library until the value is dropped.
pub(crate) struct Inside(());

/// Enters the library: None if this thread is inside it already (the
/// caller passes the call to the C library).
pub(crate) fn enter() -> Option<Inside> {
    INSIDE
        .try_with(|c| {
            if c.get() {
                None
            } else {
                c.set(true);
                Some(Inside(()))
            }
        })
        .ok()
        .flatten()
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|c| c.set(false));
    }
}

/// Marks this thread as the library's own for good (the switch's threads).
pub(crate) fn mark_internal() {
    let _ = INSIDE.try_with(|c| c.set(true));
}

pub(crate) use dsan_switch::app::{
    all, any, fork_prepare, fork_release, get, insert, kept, mark_inherited, maybe_ours,
    other_number, other_numbers, remove, take, Passed, State,
};

/// A socket of the program that the switch serves: every descriptor
/// number that refers to it (dup) maps to it.
pub(crate) type PFd = dsan_switch::Socket;
