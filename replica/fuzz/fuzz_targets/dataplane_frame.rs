//! Fuzzes the data-plane frame decoder and request validation with arbitrary bytes.
//!
//! Whatever arrives on a replica's data port (and, for the replies an engine decodes:
//! HELLO's, errors, REPLICA_SET's, on the engine's) passes through exactly these
//! functions before anything else sees it; they must never panic, never allocate more than the
//! bytes present allow, and re-encode every frame they accept to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_replica_protocol::data::frame;
use tessera_replica_protocol::data::message::{decode_error_payload, Hello, HelloReply, Request};
use tessera_replica_protocol::data::ReplicaSet;

fuzz_target!(|data: &[u8]| {
    // Random bytes almost never carry a valid crc, so half the inputs are turned into
    // a well-framed frame (arbitrary header and payload, correct crc) to reach the
    // validation behind the crc check.
    let fixed;
    let mut rest = match data.split_first() {
        Some((sel, body)) if sel & 1 == 1 && body.len() >= frame::HEADER_LEN => {
            let mut h = [0u8; frame::HEADER_LEN];
            h.copy_from_slice(&body[..frame::HEADER_LEN]);
            let payload = &body[frame::HEADER_LEN..];
            match frame::encode(&frame::Header::decode(&h), payload) {
                Ok(f) => {
                    fixed = f;
                    &fixed[..]
                }
                Err(_) => return,
            }
        }
        _ => data,
    };
    while let Ok(Some((f, used))) = frame::decode(rest) {
        let again = frame::encode(&f.header, &f.payload).expect("decoded payload fits");
        assert_eq!(&again[..], &rest[..used]);
        let _ = Hello::decode(&f.payload);
        let _ = HelloReply::decode(&f.payload);
        let _ = decode_error_payload(&f.payload);
        // A REPLICA_SET reply an engine accepts re-encodes to the same bytes.
        if let Ok(set) = ReplicaSet::decode(&f.payload) {
            assert_eq!(set.encode().expect("a decoded set encodes"), f.payload);
        }
        let _ = Request::parse(&f.header, f.payload);
        rest = &rest[used..];
    }
});
