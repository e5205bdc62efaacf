//! The 8-byte N4 messages: v1 wire format plus our in-band extensions.
//!
//! Every message is exactly 8 bytes: byte 0 command, byte 1 reserved (0 in v1), bytes 2–7 data.
//! Decoding is strict (anything that does not re-encode to the same bytes is an error) and never
//! panics. See `docs/PROTOCOL.md` for the byte layouts.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use bytes::{Buf, BufMut};

/// Length of every N4 message, on TCP and UDP alike.
pub const MESSAGE_LEN: usize = 8;

const CMD_HELLO: u8 = 0x01;
const CMD_READY: u8 = 0x02;
const CMD_EXCHANGE: u8 = 0x03;
const CMD_PEER_INFO: u8 = 0x04;
const CMD_PUNCH: u8 = 0x05;
const CMD_SEEN: u8 = 0x06;
const CMD_PROBE: u8 = 0x07;
const CMD_HINT: u8 = 0x08;
const CMD_PROBE_OTHER: u8 = 0x09;

/// First two data bytes of an extended READY: `"N4"`.
const READY_MAGIC: [u8; 2] = *b"N4";

/// A session identifier: ASCII, at most 6 characters, stored space-padded to 6 like v1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ident([u8; 6]);

impl Ident {
    /// Pads `s` on the right with spaces to 6 bytes, as the original does.
    pub fn new(s: &str) -> Result<Self, IdentError> {
        if !s.is_ascii() {
            return Err(IdentError::NotAscii);
        }
        if s.len() > 6 {
            return Err(IdentError::TooLong(s.len()));
        }
        let mut raw = [b' '; 6];
        raw[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Self(raw))
    }

    /// Accepts 6 raw bytes from the wire; any ASCII byte is allowed, as in v1.
    pub fn from_wire(raw: [u8; 6]) -> Result<Self, IdentError> {
        if raw.is_ascii() {
            Ok(Self(raw))
        } else {
            Err(IdentError::NotAscii)
        }
    }

    /// The 6 padded bytes.
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// The identifier without its right padding.
    pub fn as_str(&self) -> &str {
        // Invariant: only ASCII bytes are ever stored, so this cannot fail.
        std::str::from_utf8(&self.0)
            .expect("ident is ASCII")
            .trim_end_matches(' ')
    }
}

impl Default for Ident {
    /// `n4n4n4`, the original's default.
    fn default() -> Self {
        Self(*b"n4n4n4")
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ident({:?})", self.as_str())
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Ident {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    /// More than 6 bytes.
    #[error("identifier is {0} characters long; at most 6 are allowed")]
    TooLong(usize),
    /// Contains a non-ASCII character.
    #[error("identifier must be ASCII")]
    NotAscii,
}

/// A per-seat secret our server hands out in an extended READY; our client echoes it in its
/// EXCHANGE so the server attributes the datagram to exactly that seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u32);

/// One N4 message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// 0x01, client → server (TCP): wants a partner with this identifier.
    Hello(Ident),
    /// 0x02, server → client (TCP): a partner is seated. `None` is v1's all-zero data; `Some`
    /// is our extension (data `"N4"` + token), which v1 clients ignore.
    Ready(Option<Token>),
    /// 0x03, client → server (UDP): "this is my public UDP address" (v1, carries the identifier).
    Exchange(Ident),
    /// 0x03 with a non-zero reserved byte, client → server (UDP): extension. Carries the seat's
    /// token, the round of the session (the reserved byte, ≥ 1) and the sender's [`Hint`].
    ExchangeToken {
        /// The seat's token from READY.
        token: Token,
        /// Session round, 1-based; a later round's EXCHANGE starts a new punch round.
        round: u8,
        /// Where the peer should aim relative to this EXCHANGE's public port.
        hint: Hint,
    },
    /// 0x04, server → client (TCP): the partner's public UDP address.
    PeerInfo(SocketAddrV4),
    /// 0x05, client ↔ client (UDP): the punch; equal bytes on both sides.
    Punch(Ident),
    /// 0x06, server → extended client only: the address the server saw the client's own
    /// EXCHANGE (TCP) or PROBE (UDP reply) come from — its own public mapping.
    Seen(SocketAddrV4),
    /// 0x07, client → server's probe port (UDP), extension: "tell me my public address". The
    /// server answers with [`Message::Seen`] by UDP. Data is zero.
    Probe,
    /// 0x08, server → extended client (TCP), extension: the partner's [`Hint`], sent just before
    /// PEERINFO when the partner gave one.
    Hint(Hint),
    /// 0x09, client → server (UDP), extension: like [`Message::Probe`], but "answer from your
    /// other UDP port" — whether that answer gets through shows the NAT's filtering.
    ProbeOther,
}

/// A client's advice on where to aim at it: "my punches will leave my NAT around my EXCHANGE's
/// public port + `offset`". Zero means no advice (use your own `-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Hint(pub i16);

impl Hint {
    /// No advice.
    pub const NONE: Hint = Hint(0);
    /// "My NAT allocates ports at random: do not aim, spray."
    pub const RANDOM: Hint = Hint(i16::MIN);
}

/// Why 8 bytes are not an N4 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not exactly 8 bytes.
    #[error("message is {0} bytes; N4 messages are 8")]
    Length(usize),
    /// Unknown command byte.
    #[error("unknown command 0x{0:02x}")]
    Command(u8),
    /// Reserved byte is not one this command allows.
    #[error("reserved byte 0x{0:02x} not allowed for this command")]
    Reserved(u8),
    /// Data bytes are not valid for this command.
    #[error("malformed data for this command")]
    Data,
}

impl Message {
    /// The command byte.
    pub fn command(&self) -> u8 {
        match self {
            Self::Hello(_) => CMD_HELLO,
            Self::Ready(_) => CMD_READY,
            Self::Exchange(_) | Self::ExchangeToken { .. } => CMD_EXCHANGE,
            Self::PeerInfo(_) => CMD_PEER_INFO,
            Self::Punch(_) => CMD_PUNCH,
            Self::Seen(_) => CMD_SEEN,
            Self::Probe => CMD_PROBE,
            Self::Hint(_) => CMD_HINT,
            Self::ProbeOther => CMD_PROBE_OTHER,
        }
    }

    /// Writes the 8 bytes into `buf`.
    pub fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(&self.to_bytes());
    }

    /// The 8 wire bytes.
    pub fn to_bytes(&self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[0] = self.command();
        let data = &mut out[2..];
        match self {
            Self::Hello(id) | Self::Exchange(id) | Self::Punch(id) => {
                data.copy_from_slice(id.as_bytes())
            }
            Self::Ready(None) | Self::Probe | Self::ProbeOther => {}
            Self::Hint(Hint(h)) => data[..2].copy_from_slice(&h.to_be_bytes()),
            Self::Ready(Some(Token(t))) => {
                data[..2].copy_from_slice(&READY_MAGIC);
                data[2..].copy_from_slice(&t.to_be_bytes());
            }
            Self::ExchangeToken {
                token: Token(t),
                round,
                hint: Hint(h),
            } => {
                out[1] = *round;
                out[2..6].copy_from_slice(&t.to_be_bytes());
                out[6..].copy_from_slice(&h.to_be_bytes());
            }
            Self::PeerInfo(addr) | Self::Seen(addr) => put_addr(data, *addr),
        }
        out
    }

    /// Decodes exactly one message from exactly 8 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw: &[u8; MESSAGE_LEN] = bytes
            .try_into()
            .map_err(|_| DecodeError::Length(bytes.len()))?;
        let (cmd, reserved) = (raw[0], raw[1]);
        let mut data = [0u8; 6];
        data.copy_from_slice(&raw[2..]);
        let ident = || Ident::from_wire(data).map_err(|_| DecodeError::Data);
        let msg = match (cmd, reserved) {
            (CMD_HELLO, 0) => Self::Hello(ident()?),
            (CMD_READY, 0) if data == [0; 6] => Self::Ready(None),
            (CMD_READY, 0) if data[..2] == READY_MAGIC => {
                Self::Ready(Some(Token((&data[2..]).get_u32())))
            }
            (CMD_READY, 0) => return Err(DecodeError::Data),
            (CMD_EXCHANGE, 0) => Self::Exchange(ident()?),
            (CMD_EXCHANGE, round) => Self::ExchangeToken {
                token: Token((&data[..4]).get_u32()),
                round,
                hint: Hint((&data[4..]).get_i16()),
            },
            (CMD_PEER_INFO, 0) => Self::PeerInfo(get_addr(&data)),
            (CMD_PUNCH, 0) => Self::Punch(ident()?),
            (CMD_SEEN, 0) => Self::Seen(get_addr(&data)),
            (CMD_PROBE, 0) if data == [0; 6] => Self::Probe,
            (CMD_PROBE_OTHER, 0) if data == [0; 6] => Self::ProbeOther,
            (CMD_HINT, 0) if data[2..] == [0; 4] => Self::Hint(Hint((&data[..2]).get_i16())),
            (CMD_PROBE | CMD_HINT | CMD_PROBE_OTHER, 0) => return Err(DecodeError::Data),
            (CMD_HELLO..=CMD_PROBE_OTHER, r) => return Err(DecodeError::Reserved(r)),
            (c, _) => return Err(DecodeError::Command(c)),
        };
        Ok(msg)
    }
}

fn put_addr(mut data: &mut [u8], addr: SocketAddrV4) {
    data.put_slice(&addr.ip().octets());
    data.put_u16(addr.port());
}

fn get_addr(mut data: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::from(data.get_u32());
    SocketAddrV4::new(ip, data.get_u16())
}

/// Accumulates a TCP byte stream and yields whole messages.
///
/// Holds at most 7 bytes between calls, so a connection's memory is bounded whatever it sends.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    buf: [u8; MESSAGE_LEN],
    len: usize,
}

impl StreamDecoder {
    /// Feeds `bytes`; calls `on_message` for each complete message in order. Stops at the first
    /// malformed message and returns its error (the stream is then unusable).
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_message: impl FnMut(Message),
    ) -> Result<(), DecodeError> {
        while !bytes.is_empty() {
            let take = (MESSAGE_LEN - self.len).min(bytes.len());
            self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
            if self.len == MESSAGE_LEN {
                self.len = 0;
                on_message(Message::decode(&self.buf)?);
            }
        }
        Ok(())
    }

    /// Bytes of an incomplete message held.
    pub fn pending(&self) -> usize {
        self.len
    }
}

/// For fuzz targets: decodes `bytes` and, when that succeeds, asserts that re-encoding gives the
/// same bytes back (decoding is strict, so this must always hold).
#[doc(hidden)]
pub fn check_round_trip(bytes: &[u8]) {
    if let Ok(msg) = Message::decode(bytes) {
        assert_eq!(msg.to_bytes()[..], bytes[..], "{msg:?} did not round-trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn golden_bytes() {
        let id = Ident::default();
        let cases: &[(Message, [u8; 8])] = &[
            (Message::Hello(id), *b"\x01\x00n4n4n4"),
            (Message::Ready(None), [2, 0, 0, 0, 0, 0, 0, 0]),
            (
                Message::Ready(Some(Token(0x0102_0304))),
                [2, 0, b'N', b'4', 1, 2, 3, 4],
            ),
            (Message::Exchange(id), *b"\x03\x00n4n4n4"),
            (
                Message::ExchangeToken {
                    token: Token(0xdead_beef),
                    round: 2,
                    hint: Hint(-300),
                },
                [3, 2, 0xde, 0xad, 0xbe, 0xef, 0xfe, 0xd4],
            ),
            (
                Message::PeerInfo(addr("203.0.113.12:5793")),
                [4, 0, 203, 0, 113, 12, 0x16, 0xa1],
            ),
            (
                Message::Punch(Ident::new("ab").unwrap()),
                *b"\x05\x00ab    ",
            ),
            (
                Message::Seen(addr("198.51.100.3:1801")),
                [6, 0, 198, 51, 100, 3, 0x07, 0x09],
            ),
            (Message::Probe, [7, 0, 0, 0, 0, 0, 0, 0]),
            (Message::ProbeOther, [9, 0, 0, 0, 0, 0, 0, 0]),
            (Message::Hint(Hint(45)), [8, 0, 0, 45, 0, 0, 0, 0]),
            (Message::Hint(Hint::RANDOM), [8, 0, 0x80, 0, 0, 0, 0, 0]),
        ];
        for (msg, bytes) in cases {
            assert_eq!(&msg.to_bytes(), bytes, "{msg:?}");
            assert_eq!(Message::decode(bytes).as_ref(), Ok(msg));
        }
    }

    #[test]
    fn ident_pads_and_validates() {
        assert_eq!(Ident::new("ab").unwrap().as_bytes(), b"ab    ");
        assert_eq!(Ident::new("").unwrap().as_bytes(), b"      ");
        assert_eq!(Ident::new("abcdefg"), Err(IdentError::TooLong(7)));
        assert_eq!(Ident::new("é"), Err(IdentError::NotAscii));
        assert_eq!(Ident::default().to_string(), "n4n4n4");
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        assert_eq!(Message::decode(&[1; 7]), Err(DecodeError::Length(7)));
        assert_eq!(Message::decode(&[1; 9]), Err(DecodeError::Length(9)));
        assert_eq!(
            Message::decode(b"\x0a\x00n4n4n4"),
            Err(DecodeError::Command(10))
        );
        assert_eq!(
            Message::decode(b"\x01\x07n4n4n4"),
            Err(DecodeError::Reserved(7))
        );
        assert_eq!(
            Message::decode(&[1, 0, 0xff, 0, 0, 0, 0, 0]),
            Err(DecodeError::Data)
        );
        assert_eq!(
            Message::decode(&[2, 0, 1, 0, 0, 0, 0, 0]),
            Err(DecodeError::Data)
        );
        assert_eq!(
            Message::decode(&[7, 0, 0, 0, 0, 0, 0, 1]),
            Err(DecodeError::Data)
        );
        assert_eq!(
            Message::decode(&[0x10, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Command(0x10))
        );
    }

    #[test]
    fn stream_decoder_reassembles_split_messages() {
        let mut bytes = Message::Hello(Ident::default()).to_bytes().to_vec();
        bytes.extend(Message::Ready(None).to_bytes());
        let mut dec = StreamDecoder::default();
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            dec.feed(chunk, |m| got.push(m)).unwrap();
        }
        assert_eq!(
            got,
            vec![Message::Hello(Ident::default()), Message::Ready(None)]
        );
        assert_eq!(dec.pending(), 0);
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let ident = "[ -~]{0,6}".prop_map(|s| Ident::new(&s).unwrap());
        let addr = (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(ip), port));
        prop_oneof![
            ident.clone().prop_map(Message::Hello),
            proptest::option::of(any::<u32>().prop_map(Token)).prop_map(Message::Ready),
            ident.clone().prop_map(Message::Exchange),
            (any::<u32>(), 1..=255u8, any::<i16>()).prop_map(|(t, round, h)| {
                Message::ExchangeToken {
                    token: Token(t),
                    round,
                    hint: Hint(h),
                }
            }),
            Just(Message::Probe),
            Just(Message::ProbeOther),
            any::<i16>().prop_map(|h| Message::Hint(Hint(h))),
            addr.clone().prop_map(Message::PeerInfo),
            ident.prop_map(Message::Punch),
            addr.prop_map(Message::Seen),
        ]
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(msg in any_message()) {
            prop_assert_eq!(Message::decode(&msg.to_bytes()), Ok(msg));
        }

        #[test]
        fn decode_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(msg) = Message::decode(&bytes) {
                prop_assert_eq!(&msg.to_bytes()[..], &bytes[..]);
            }
        }

        #[test]
        fn stream_decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..10)) {
            let mut dec = StreamDecoder::default();
            for c in &chunks {
                if dec.feed(c, |_| {}).is_err() { break; }
                prop_assert!(dec.pending() < MESSAGE_LEN);
            }
        }
    }
}
