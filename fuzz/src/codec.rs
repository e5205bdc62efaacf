//! The `codec` target: arbitrary bytes into [`Message::decode`], [`Frame::decode`], a
//! [`StreamDecoder`] and a [`FrameDecoder`].
//!
//! Input layout: the whole input is decoded as one message and as one frame (each must
//! round-trip if it decodes); then its first byte chooses how the rest is cut into chunks, and
//! the rest is fed to each stream decoder chunk by chunk:
//! - the `StreamDecoder` must yield exactly what decoding whole 8-byte pieces yields, and stop
//!   at the same first error;
//! - the `FrameDecoder` (what the server and client machines read TCP with) must yield the same
//!   frames and the same first error however the stream is cut as when it is fed at once; every
//!   frame re-encodes to exactly the bytes it was cut from, and it never holds a whole frame.

use n4_core::{
    check_round_trip, DecodeError, Frame, FrameDecoder, Message, StreamDecoder, MAX_FRAME,
    MESSAGE_LEN,
};

/// Runs one input; panics on a broken promise.
pub fn run(data: &[u8]) {
    check_round_trip(data);
    let Some((&pattern, stream)) = data.split_first() else {
        return;
    };
    let chunks = chunks(stream, pattern);
    stream_decoder(stream, &chunks);
    frame_decoder(stream, &chunks);
}

/// `stream` cut as `pattern` says.
fn chunks(stream: &[u8], pattern: u8) -> Vec<&[u8]> {
    let mut rest = stream;
    let mut out = Vec::new();
    let mut i = 0;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(pattern, i).min(rest.len()));
        out.push(chunk);
        rest = tail;
        i += 1;
    }
    out
}

fn stream_decoder(stream: &[u8], chunks: &[&[u8]]) {
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
    for chunk in chunks {
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

/// What a `FrameDecoder` makes of `parts` fed in order: the frames, the first error, and the
/// bytes it holds at the end (if no error).
fn frames_of(parts: &[&[u8]]) -> (Vec<Frame>, Option<DecodeError>, usize) {
    let mut decoder = FrameDecoder::default();
    let mut frames = Vec::new();
    for part in parts {
        let mut input = *part;
        while let Some(frame) = decoder.next(&mut input) {
            match frame {
                Ok(f) => frames.push(f),
                Err(e) => return (frames, Some(e), 0),
            }
        }
        assert!(input.is_empty(), "the decoder left input unread");
        assert!(decoder.pending() < MAX_FRAME, "holds a whole frame");
    }
    (frames, None, decoder.pending())
}

fn frame_decoder(stream: &[u8], chunks: &[&[u8]]) {
    let whole = frames_of(&[stream]);
    // Frames re-encode to the bytes they were cut from, back to back.
    let mut at = 0;
    for f in &whole.0 {
        let wire = f.to_bytes();
        assert_eq!(&stream[at..at + wire.len()], &wire[..], "{f:?}");
        at += wire.len();
    }
    if whole.1.is_none() {
        assert_eq!(whole.2, stream.len() - at, "pending bytes");
    }
    assert_eq!(
        frames_of(chunks),
        whole,
        "the frame decoder depends on how the stream is cut"
    );
}

/// Length of chunk `i` (0..=17, so empty chunks and chunks spanning two messages both occur).
/// Never 0 forever: that would need `pattern ≡ 0` and `pattern + 7 ≡ 0 (mod 18)` at once.
fn chunk_len(pattern: u8, i: usize) -> usize {
    (usize::from(pattern) + (usize::from(pattern) + 7) * i) % 18
}
