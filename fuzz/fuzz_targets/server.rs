//! Connections, bytes, closes, datagrams and time applied to the rendezvous server, checked
//! against a model of the driver. See `n4_fuzz::server`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: n4_fuzz::server::Input| {
    n4_fuzz::server::run(&input);
});
