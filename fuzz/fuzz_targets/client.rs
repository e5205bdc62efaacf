//! Server bytes, connect results, datagrams and time applied to the punching client, checked
//! against a model of the driver. See `n4_fuzz::client`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: n4_fuzz::client::Input| {
    n4_fuzz::client::run(&input);
});
