//! The `codec` target: arbitrary bytes into [`Message::decode`] and a [`StreamDecoder`].
//!
//! Input layout: the whole input is decoded as one message (it must round-trip if it decodes);
//! then its first byte chooses how the rest is cut into chunks, and the rest is fed to a
//! `StreamDecoder` chunk by chunk. However the stream is cut, the decoder must yield exactly
//! what decoding whole 8-byte pieces yields, and stop at the same first error.

use n4_core::{check_round_trip, Message, StreamDecoder, MESSAGE_LEN};

/// Runs one input; panics on a broken promise.
pub fn run(data: &[u8]) {
    check_round_trip(data);
    let Some((&pattern, stream)) = data.split_first() else {
        return;
    };

    // The reference: whole 8-byte pieces, up to the first that does not decode.
    let mut expected = Vec::new();
    let mut expected_err = None;
    for piece in stream.chunks_exact(MESSAGE_LEN) {
        check_round_trip(piece);
        match Message::decode(piece) {
            Ok(m) => expected.push(m),
            Err(e) => {
                expected_err = Some(e);
                break;
            }
        }
    }

    let mut decoder = StreamDecoder::default();
    let mut got = Vec::new();
    let mut err = None;
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(pattern, i).min(rest.len()));
        rest = tail;
        i += 1;
        if let Err(e) = decoder.feed(chunk, |m| got.push(m)) {
            err = Some(e);
            break;
        }
        assert!(decoder.pending() < MESSAGE_LEN);
    }
    assert_eq!(
        got, expected,
        "stream decoder disagrees with whole-piece decoding"
    );
    assert_eq!(err, expected_err, "stream decoder stopped at another error");
    if err.is_none() {
        assert_eq!(decoder.pending(), stream.len() % MESSAGE_LEN);
    }
}

/// Length of chunk `i` (0..=17, so empty chunks and chunks spanning two messages both occur).
/// Never 0 forever: that would need `pattern ≡ 0` and `pattern + 7 ≡ 0 (mod 18)` at once.
fn chunk_len(pattern: u8, i: usize) -> usize {
    (usize::from(pattern) + (usize::from(pattern) + 7) * i) % 18
}
