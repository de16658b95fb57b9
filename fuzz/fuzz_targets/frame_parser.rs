//! The SAN frame parser on arbitrary bytes: it never panics, and whatever it
//! accepts emits back to the same frame.
#![no_main]
#![deny(unsafe_code)]

use dataplane::wire::{Frame, Message, Repr, DEFAULT_ETHERTYPE, PAYLOAD_OFFSET};
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
        // A Data frame's payload is the caller's to fill (emit leaves zeros).
        let n = match r.message {
            Message::Data(_) => PAYLOAD_OFFSET,
            _ => bytes.len(),
        };
        assert_eq!(
            &bytes[..n],
            &data[..n],
            "emit differs from the parsed input"
        );
        if n == PAYLOAD_OFFSET {
            assert_eq!(
                dataplane::wire::payload(data).len(),
                bytes.len() - n,
                "the payload is what the header says"
            );
        }
        assert_eq!(Repr::parse_bytes(&bytes, DEFAULT_ETHERTYPE), Ok(r));
    }
});
