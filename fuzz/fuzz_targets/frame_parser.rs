//! The SAN frame parser on arbitrary bytes: it never panics, and whatever it
//! accepts emits back to the same frame.
#![no_main]

use dataplane::wire::{Frame, Repr, DEFAULT_ETHERTYPE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::new_checked(data) {
        let _ = (
            f.kind(),
            f.src_ip(),
            f.dst_ip(),
            f.src_port(),
            f.dst_port(),
            f.body(),
        );
    }
    if let Ok(r) = Repr::parse_bytes(data, DEFAULT_ETHERTYPE) {
        let bytes = r.to_bytes(DEFAULT_ETHERTYPE);
        assert_eq!(
            &bytes[..],
            &data[..bytes.len()],
            "emit differs from the parsed input"
        );
        assert_eq!(Repr::parse_bytes(&bytes, DEFAULT_ETHERTYPE), Ok(r));
    }
});
