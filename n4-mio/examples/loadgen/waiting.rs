//! Waiting clients (`--waiting`): each says HELLO with an identifier nobody else uses and then
//! nothing, held to the end, so the server must keep them all. They measure what a waiting
//! client costs the server, and that pairs still go through next to them.

use mio::net::TcpStream;
use mio::{Interest, Token};
use n4_core::Message;

use crate::generator::{ident, Generator, WAIT_BASE};
use crate::net::{addr, connect_from, server_closed, try_send};

/// Connections allowed in the SYN/accept stage at once while opening waiting clients.
pub const OPEN_BATCH: usize = 512;

/// A waiting client.
pub struct Waiter {
    /// `None` once the server closed it (or it could not connect).
    pub stream: Option<TcpStream>,
    pub said_hello: bool,
}

impl Waiter {
    /// Connected (or connecting) but HELLO not sent yet.
    pub fn opening(&self) -> bool {
        self.stream.is_some() && !self.said_hello
    }
}

impl Generator {
    /// Opens waiting client `k` (from 127.230 upwards) and says HELLO if it can already.
    pub fn open_waiter(&mut self, k: usize) {
        let mut w = Waiter {
            stream: None,
            said_hello: false,
        };
        if let Ok(mut stream) = connect_from(addr(230, k), self.cli.server) {
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(WAIT_BASE + k),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok()
            {
                w.stream = Some(stream);
            }
        }
        self.waiters.push(w);
        self.waiter_event(k);
    }

    /// Says HELLO once connected; notes when the server closes the connection.
    pub fn waiter_event(&mut self, k: usize) {
        let hello = Message::Hello(ident(b'w', k)).to_bytes();
        let w = &mut self.waiters[k];
        let Some(stream) = w.stream.as_mut() else {
            return;
        };
        if !w.said_hello {
            match try_send(stream, &hello) {
                Ok(true) => w.said_hello = true,
                Ok(false) => return,
                Err(_) => {
                    w.stream = None;
                    return;
                }
            }
        }
        if server_closed(stream) {
            w.stream = None;
        }
    }
}
