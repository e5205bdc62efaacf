//! The attack traffic, spread over the run in proportion to the pairs started: silent TCP
//! connections (connect, never send), garbage TCP connections (connect, send 8..16 bytes that are
//! not a HELLO; the server must close each), garbage datagrams to the server's UDP port. It only
//! sends and watches for the server closing; it never answers anything.

use mio::net::TcpStream;
use mio::{Interest, Token};
use n4_core::{Hint, Ident, Message, Token as WireToken};

use crate::generator::{ident, Generator, ABUSE_BASE};
use crate::net::{addr, connect_from, server_closed, try_send};

/// xorshift64* with a fixed seed: garbage needs no quality, only variety and reproducibility
/// (every run sends the same garbage in the same order).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        Self(0x9E37_79B9_7F4A_7C15)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AbuseKind {
    /// Connects and never sends (`--silent`).
    Silent,
    /// Connects and sends garbage (`--garbage-conns`).
    Garbage,
}

/// An abuse connection.
pub struct Abuse {
    pub kind: AbuseKind,
    stream: Option<TcpStream>,
    /// Its garbage is sent.
    sent: bool,
    /// The server closed it (EOF or reset).
    pub closed_by_server: bool,
    /// It could not connect, register or send.
    pub failed: bool,
}

impl Abuse {
    /// Still open, as far as we know.
    pub fn open(&self) -> bool {
        self.stream.is_some()
    }
}

impl Generator {
    /// Opens and sends the abuse due after `launched` of `units` pairs: each kind's count times
    /// `launched / units`, silent connections first, then garbage connections, then datagrams.
    /// With `launched == units`, all of it.
    pub fn abuse_up_to(&mut self, launched: usize, units: usize) {
        let due = |n: usize| n * launched / units;
        while self.silent_opened < due(self.cli.silent) {
            self.open_abuse(AbuseKind::Silent);
            self.silent_opened += 1;
        }
        while self.garbage_opened < due(self.cli.garbage_conns) {
            self.open_abuse(AbuseKind::Garbage);
            self.garbage_opened += 1;
        }
        while self.garbage_sent < due(self.cli.garbage_datagrams) {
            self.send_garbage_datagram();
        }
    }

    fn open_abuse(&mut self, kind: AbuseKind) {
        let k = self.abuse.len();
        let ip = match kind {
            AbuseKind::Silent => addr(200, k),
            AbuseKind::Garbage => addr(210, k),
        };
        let mut a = Abuse {
            kind,
            stream: None,
            sent: false,
            closed_by_server: false,
            failed: false,
        };
        match connect_from(ip, self.cli.server) {
            Ok(mut stream) => {
                let ok = self
                    .poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(ABUSE_BASE + k),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok();
                a.failed = !ok;
                a.stream = ok.then_some(stream);
            }
            Err(_) => a.failed = true,
        }
        self.abuse.push(a);
        if kind == AbuseKind::Garbage {
            self.abuse_event(k);
        }
    }

    fn garbage_bytes(&mut self) -> Vec<u8> {
        let r = self.rng.next();
        match r % 4 {
            0 => b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            1 => r.to_le_bytes().to_vec(),
            // A READY, as if the client were a server.
            2 => Message::Ready(None).to_bytes().to_vec(),
            // Half a HELLO then garbage: 16 bytes, the first 8 undecodable.
            _ => {
                let mut v = vec![0x01, 0x00, b'a', b'b', 0xff, 0xfe, 0x00, 0x00];
                v.extend_from_slice(&r.to_be_bytes());
                v
            }
        }
    }

    /// Sends a garbage connection's bytes once connected; notes when the server closes it.
    pub fn abuse_event(&mut self, k: usize) {
        if self.abuse[k].kind == AbuseKind::Garbage && !self.abuse[k].sent {
            let bytes = self.garbage_bytes();
            let a = &mut self.abuse[k];
            let Some(stream) = a.stream.as_mut() else {
                return;
            };
            match try_send(stream, &bytes) {
                Ok(true) => a.sent = true,
                Ok(false) => return,
                Err(_) => {
                    a.stream = None;
                    a.failed = true;
                    return;
                }
            }
        }
        let a = &mut self.abuse[k];
        let Some(stream) = a.stream.as_mut() else {
            return;
        };
        if server_closed(stream) {
            a.closed_by_server = true;
            a.stream = None;
        }
    }

    fn send_garbage_datagram(&mut self) {
        let r = self.rng.next();
        let bytes: Vec<u8> = match r % 8 {
            0 => r.to_le_bytes().to_vec(),
            1 => vec![0x03],
            2 => vec![0x03; 100],
            // An EXCHANGE for an identifier nobody uses.
            3 => Message::Exchange(ident(b'g', (r >> 8) as usize))
                .to_bytes()
                .to_vec(),
            // An EXCHANGE for an identifier in use, from an address no client has: the v1
            // attribution must find nothing, cheaply.
            4 | 5 => {
                let pair = (r >> 8) as usize % (self.clients.len() / 2).max(1);
                let ident = self
                    .clients
                    .get(2 * pair)
                    .map_or_else(Ident::default, |c| c.ident);
                Message::Exchange(ident).to_bytes().to_vec()
            }
            // A token EXCHANGE with a guessed token.
            6 => Message::ExchangeToken {
                token: WireToken((r >> 16) as u32),
                round: 1,
                hint: Hint::NONE,
            }
            .to_bytes()
            .to_vec(),
            _ => Message::Hello(Ident::default()).to_bytes().to_vec(),
        };
        // From addresses no client uses, each a little different.
        let from = std::net::Ipv4Addr::new(127, 220, (r >> 40) as u8, (r >> 48) as u8 | 1);
        self.sender.queue(from, &bytes);
        self.garbage_sent += 1;
    }
}
