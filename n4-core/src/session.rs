//! What a client says to its peer and how it judges what the peer says: the PUNCH, and between
//! two clients of ours the ACK and CONFIRM that make a confirmed WIN — plain (8 bytes, with
//! the identifier) or, in a keyed session, with a MAC under the session key. Also the keyed
//! handshake's state (nonces, session key).

use crate::codec::{Frame, Ident, LongMessage, Message, Nonce, Payload, Side};
use crate::key::{Datagram, Key, SessionKey};

/// A datagram from the peer's side, once judged genuine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerSays {
    /// "I punch you."
    Punch,
    /// "Your PUNCH reached me, on this pair."
    Ack,
    /// "This pair is the hole." (from the leader)
    Confirm,
}

/// The keyed handshake of one server connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handshake {
    pub(crate) key: Key,
    pub(crate) room: Ident,
    pub(crate) mine: Nonce,
    pub(crate) theirs: Option<Nonce>,
    /// The partner's auth MAC checked out.
    pub(crate) verified: bool,
}

impl Handshake {
    pub(crate) fn new(key: Key, ident: Ident, mine: Nonce) -> Self {
        Self {
            key,
            room: key.room(ident),
            mine,
            theirs: None,
            verified: false,
        }
    }

    /// The keyed HELLO that opens it.
    pub(crate) fn hello(&self) -> LongMessage {
        LongMessage::KeyedHello {
            room: self.room,
            nonce: self.mine,
            proof: self.key.hello_proof(self.room, &self.mine),
        }
    }

    /// How datagrams are made and judged once both nonces are known.
    pub(crate) fn wire(&self) -> Option<Wire> {
        let theirs = self.theirs?;
        Some(Wire::Keyed {
            session: self.key.session(self.room, &self.mine, &theirs),
            low: self.mine < theirs,
        })
    }
}

/// How the datagrams between the two clients look.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wire {
    /// v1's PUNCH (and our plain ACK and CONFIRM), each carrying the identifier.
    Plain(Ident),
    /// Each with a MAC under the session key; `low`: our nonce is the lower one.
    Keyed { session: SessionKey, low: bool },
}

impl Wire {
    /// `what`, from our side `ours` (a plain ACK or CONFIRM carries it; a PUNCH, which v1
    /// peers take too, and keyed datagrams, whose MAC says it, do not).
    pub(crate) fn make(&self, what: PeerSays, ours: Side) -> Payload {
        match *self {
            Self::Plain(ident) => match what {
                PeerSays::Punch => Message::Punch(ident),
                PeerSays::Ack => Message::Ack(ident, ours),
                PeerSays::Confirm => Message::Confirm(ident, ours),
            }
            .to_bytes()
            .into(),
            Self::Keyed { session, low } => {
                let mac = session.mac(kind(what), low);
                match what {
                    PeerSays::Punch => LongMessage::Punch(mac),
                    PeerSays::Ack => LongMessage::Ack(mac),
                    PeerSays::Confirm => LongMessage::Confirm(mac),
                }
                .to_bytes()
            }
        }
    }

    /// What `bytes` are, if the peer's side sent them: anything else (another identifier, a
    /// bad MAC, our own datagram reflected back) is `None`. `ours`: our side, once known (a
    /// plain ACK or CONFIRM from our own side is a reflection).
    pub(crate) fn judge(&self, bytes: &[u8], ours: Option<Side>) -> Option<PeerSays> {
        let theirs = |side: Side| side == Side::Unknown || Some(side) != ours;
        match (*self, Frame::decode(bytes).ok()?) {
            (Self::Plain(ident), Frame::Short(m)) => match m {
                Message::Punch(i) if i == ident => Some(PeerSays::Punch),
                Message::Ack(i, side) if i == ident && theirs(side) => Some(PeerSays::Ack),
                Message::Confirm(i, side) if i == ident && theirs(side) => Some(PeerSays::Confirm),
                _ => None,
            },
            (Self::Keyed { session, low }, Frame::Long(m)) => {
                let (what, mac) = match m {
                    LongMessage::Punch(mac) => (PeerSays::Punch, mac),
                    LongMessage::Ack(mac) => (PeerSays::Ack, mac),
                    LongMessage::Confirm(mac) => (PeerSays::Confirm, mac),
                    _ => return None,
                };
                // The peer is the other side: its MACs carry the other `low`.
                session.verify(kind(what), !low, &mac).then_some(what)
            }
            _ => None,
        }
    }
}

fn kind(what: PeerSays) -> Datagram {
    match what {
        PeerSays::Punch => Datagram::Punch,
        PeerSays::Ack => Datagram::Ack,
        PeerSays::Confirm => Datagram::Confirm,
    }
}
