//! Harnesses behind the cargo-fuzz targets in `fuzz_targets/`, kept in a library so that the
//! targets stay a few lines and the seed tests can run the same code.
//!
//! Each harness plays a well-behaved driver around one `n4-core` machine, feeds it what the
//! fuzzer chose, and checks after every step the promises the machine makes in its docs. A
//! broken promise is a panic, which libFuzzer reports as a crash.
//!
//! The structured inputs are `#[derive(Arbitrary)]` types; [`seed`] writes values of them back
//! into the bytes `arbitrary` reads, so the committed seed corpora are real stories (a v1
//! pairing, an extended round that wins…) rather than random bytes.

use n4_core::Ident;

pub mod client;
pub mod codec;
pub mod seed;
pub mod server;

/// Identifiers the fuzzer can name by index. `IDENTS[0]` is the client's in the client target,
/// and the only one allowed in the server target when `only_ident` is set.
pub const IDENTS: [&str; 3] = ["n4n4n4", "ab", ""];

/// `IDENTS[i % 3]`.
pub fn ident(i: u8) -> Ident {
    Ident::new(IDENTS[usize::from(i) % IDENTS.len()]).expect("IDENTS are valid")
}
