//! The application's control requests and the daemon's replies
//! (`dsan_channel::ctl`) on arbitrary bytes: parse never panics, and
//! whatever it accepts emits back to the same bytes.
#![no_main]
#![deny(unsafe_code)]

use dsan_channel::ctl::{Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        assert_eq!(r.emit(), data, "a request emits back to its bytes");
        let (fewest, most) = r.descriptors();
        assert!(fewest <= most);
    }
    if let Ok(r) = Reply::parse(data) {
        assert_eq!(r.emit(), data, "a reply emits back to its bytes");
    }
});
