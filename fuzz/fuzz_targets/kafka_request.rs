//! The Kafka front's request decoder on arbitrary frames: it must return (a request, an
//! unsupported-version answer, or an error) and never panic, hang or allocate beyond the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = aqueduct::kafka::codec::decode_frame_bytes(data);
});
