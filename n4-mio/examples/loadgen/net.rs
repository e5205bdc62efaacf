//! TCP sockets of the generator's clients, and where on loopback each of them lives: pair clients
//! at 127.`--ip-base`.0.1 upwards, silent connections at 127.200, garbage connections at 127.210,
//! garbage datagrams from 127.220, waiting clients at 127.230 (Linux routes all of 127/8 to `lo`).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

/// The `idx`-th address of a /16 block: 127.`second`.x.y with y in 1..=254.
pub fn addr(second: u8, idx: usize) -> Ipv4Addr {
    let host = idx % 254 + 1;
    let net = idx / 254;
    let base = u32::from(Ipv4Addr::new(127, second, 0, 0));
    Ipv4Addr::from(base + (net as u32) * 256 + host as u32)
}

/// A nonblocking TCP connection to `server` from `ip`, under way (`EINPROGRESS` is success).
pub fn connect_from(ip: Ipv4Addr, server: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // The port is picked at connect time, against the full 4-tuple: cheaper than a search at
    // bind time, and it never runs out.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a pointer to a live int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    match socket.connect(&SocketAddr::from(server).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// A refused connection: nothing listens (a v1 server closes its listener between pairs).
pub fn is_refused(e: &io::Error) -> bool {
    e.kind() == ErrorKind::ConnectionRefused
}

/// Writes all of `bytes` on a fresh connection: `Ok(false)` if it is not connected yet.
pub fn try_send(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<bool> {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(true),
        Ok(_) => Err(io::Error::other("short write")),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::NotConnected => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Reads and discards what the server sent: `true` once it closed the connection (EOF or
/// reset), `false` while it is open (or, before the connect completes, not open yet).
pub fn server_closed(stream: &mut TcpStream) -> bool {
    let mut tmp = [0u8; 64];
    loop {
        match stream.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {
                return false
            }
            Err(_) => return true,
        }
    }
}
