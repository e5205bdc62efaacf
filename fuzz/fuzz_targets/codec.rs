//! Arbitrary bytes into the message decoder and the stream decoder: no panic, strict
//! round-trip, and the same messages however the stream is cut. See `n4_fuzz::codec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| n4_fuzz::codec::run(data));
