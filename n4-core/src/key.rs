//! The shared key of a keyed session and what is derived from it, all with HMAC-SHA256
//! (RustCrypto `hmac` and `sha2`; nothing home-made).
//!
//! From the secret the user gives (`--key-file`, `N4_KEY`) comes a 32-byte master key; from it,
//! each under its own label:
//! - the **room**: 6 ASCII characters the server pairs by, instead of the identifier (the
//!   server never sees the identifier or the key; without the key nobody can compute the room);
//! - the **hello proof**: lets a private server (`n4 -s --key-file`) check a client's key;
//! - the **auth MAC** each client sends its partner through the server, over the room and both
//!   fresh nonces (its own first), so a replayed or forged handshake fails;
//! - the **session key** (room and both nonces), under which every keyed PUNCH, ACK and
//!   CONFIRM carries a MAC.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use crate::codec::{Ident, Mac, Nonce, MAC_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Why a secret cannot be a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing left after trimming surrounding whitespace.
    #[error("the key is empty")]
    Empty,
}

/// A shared key. `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    master: [u8; 32],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// A keyed datagram's kind, as bound into its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// A PUNCH.
    Punch = 1,
    /// An ACK ("your PUNCH reached me").
    Ack = 2,
    /// A CONFIRM ("this pair is the hole").
    Confirm = 3,
}

impl Key {
    /// The key for `secret` (surrounding whitespace, such as a file's final newline, is not
    /// part of it).
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        let secret = secret.trim_ascii();
        if secret.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self {
            master: hmac(b"n4 key v1", &[secret]),
        })
    }

    /// The room for `ident`: what a keyed client says in its HELLO instead of the identifier.
    pub fn room(&self, ident: Ident) -> Ident {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let h = hmac(&self.master, &[b"room", ident.as_bytes()]);
        let mut room = [0u8; 6];
        for (c, b) in room.iter_mut().zip(h) {
            *c = ALPHABET[usize::from(b & 63)];
        }
        Ident::from_wire(room).expect("the alphabet is ASCII")
    }

    /// The proof in a keyed HELLO, for a private server.
    pub fn hello_proof(&self, room: Ident, nonce: &Nonce) -> Mac {
        truncate(hmac(&self.master, &[b"hello", room.as_bytes(), nonce]))
    }

    /// Whether `proof` is the hello proof for `room` and `nonce` (constant time).
    pub fn verify_hello(&self, room: Ident, nonce: &Nonce, proof: &Mac) -> bool {
        verify(&self.master, &[b"hello", room.as_bytes(), nonce], proof)
    }

    /// The MAC a client with nonce `mine` sends a partner with nonce `theirs`.
    pub fn auth(&self, room: Ident, mine: &Nonce, theirs: &Nonce) -> Mac {
        truncate(hmac(
            &self.master,
            &[b"auth", room.as_bytes(), mine, theirs],
        ))
    }

    /// Whether `mac` is the auth MAC of a partner with nonce `theirs` (compared in constant
    /// time).
    pub fn verify_auth(&self, room: Ident, theirs: &Nonce, mine: &Nonce, mac: &Mac) -> bool {
        verify(&self.master, &[b"auth", room.as_bytes(), theirs, mine], mac)
    }

    /// The MAC over `data` a client with nonce `mine` hands a partner with nonce `theirs`.
    pub fn peer_data(&self, room: Ident, mine: &Nonce, theirs: &Nonce, data: &[u8]) -> Mac {
        truncate(hmac(
            &self.master,
            &[b"data", room.as_bytes(), mine, theirs, data],
        ))
    }

    /// Whether `mac` is the MAC over `data` from a partner with nonce `theirs`.
    pub fn verify_peer_data(
        &self,
        room: Ident,
        theirs: &Nonce,
        mine: &Nonce,
        data: &[u8],
        mac: &Mac,
    ) -> bool {
        verify(
            &self.master,
            &[b"data", room.as_bytes(), theirs, mine, data],
            mac,
        )
    }

    /// The session key of the handshake between nonces `a` and `b` (in either order).
    pub fn session(&self, room: Ident, a: &Nonce, b: &Nonce) -> SessionKey {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        SessionKey {
            key: hmac(&self.master, &[b"session", room.as_bytes(), low, high]),
        }
    }
}

/// The key of one session's datagrams. `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey {
    key: [u8; 32],
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// The MAC of a `kind` datagram sent by the side whose nonce is the lower one (`low`) or
    /// the higher one: the sides' MACs differ, so a datagram reflected back is no answer.
    pub fn mac(&self, kind: Datagram, low: bool) -> Mac {
        truncate(hmac(&self.key, &[&[kind as u8, u8::from(low)]]))
    }

    /// Whether `mac` is that MAC (compared in constant time).
    pub fn verify(&self, kind: Datagram, low: bool, mac: &Mac) -> bool {
        verify(&self.key, &[&[kind as u8, u8::from(low)]], mac)
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        // Each part is length-prefixed, so no two part lists give the same input.
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], mac: &Mac) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    m.verify_truncated_left(mac).is_ok()
}

fn truncate(full: [u8; 32]) -> Mac {
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(&full[..MAC_LEN]);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_depend_on_key_and_identifier_and_are_ascii() {
        let k1 = Key::new(b"correct horse battery staple\n").unwrap();
        let k2 = Key::new(b"another secret").unwrap();
        let id = Ident::default();
        assert_eq!(
            k1.room(id),
            Key::new(b"correct horse battery staple").unwrap().room(id)
        );
        assert_ne!(k1.room(id), k2.room(id));
        assert_ne!(k1.room(id), k1.room(Ident::new("other").unwrap()));
        assert!(k1.room(id).as_bytes().iter().all(u8::is_ascii_graphic));
        assert_eq!(Key::new(b" \n"), Err(KeyError::Empty));
    }

    #[test]
    fn auth_verifies_only_with_the_key_and_both_nonces_in_order() {
        let k = Key::new(b"k").unwrap();
        let room = k.room(Ident::default());
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let mac = k.auth(room, &a, &b);
        assert!(k.verify_auth(room, &a, &b, &mac));
        assert!(!k.verify_auth(room, &b, &a, &mac), "reflected");
        assert!(
            !k.verify_auth(room, &a, &c, &mac),
            "replayed in another handshake"
        );
        assert!(
            !Key::new(b"x").unwrap().verify_auth(room, &a, &b, &mac),
            "wrong key"
        );
        let s = k.session(room, &a, &b);
        assert_eq!(s, k.session(room, &b, &a));
        let punch = s.mac(Datagram::Punch, true);
        assert!(s.verify(Datagram::Punch, true, &punch));
        assert!(!s.verify(Datagram::Punch, false, &punch));
        assert!(!s.verify(Datagram::Ack, true, &punch));
        assert!(!k
            .session(room, &a, &c)
            .verify(Datagram::Punch, true, &punch));
    }
}
