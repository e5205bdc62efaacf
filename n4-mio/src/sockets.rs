//! Socket set-up through socket2: the options mio does not expose.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

/// A window slot: UDP on `0.0.0.0:port` with SO_REUSEADDR and SO_REUSEPORT, like the original,
/// so a port freed by the previous round (or by the user's `nc`) can be bound again at once.
pub(crate) fn bind_slot(port: u16) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// A plain nonblocking UDP socket without address sharing: the server's port and the
/// forwarding socket, where a second owner must be an error ("address in use"), not a silent
/// split of the traffic.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// A nonblocking TCP listener with SO_REUSEADDR (restart without waiting out TIME_WAIT; on
/// Linux it does not let two listeners share a port).
pub(crate) fn listen_tcp(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Raises the soft limit on open files to the hard limit: every waiting client holds a TCP
/// connection, and the usual soft limit (1024) is far below what one thread can serve.
pub(crate) fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                && limit.rlim_cur < limit.rlim_max
            {
                let before = limit.rlim_cur;
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    tracing::debug!("open files: {before} -> {}", limit.rlim_max);
                }
            }
        }
    }
}
