//! Socket set-up through socket2: the options mio does not expose.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

/// A window slot: UDP on `0.0.0.0:port`, not shared. The original set SO_REUSEADDR, which
/// on Linux lets any other user bind the same UDP port and receive the peer's punch: the hole
/// would be theirs. A closed UDP port is free again at once (no TIME_WAIT), so sharing buys
/// nothing.
pub(crate) fn bind_slot(port: u16) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
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

/// The server's UDP port: [`bind_udp`] with a receive queue large enough to ride out a burst
/// (v1 clients send each EXCHANGE only three times, all at once, and never again, so a datagram
/// dropped because the queue was full is a pair lost). The kernel caps the size at
/// `net.core.rmem_max` (and doubles it for its bookkeeping); an 8-byte datagram costs about
/// 1 KiB of it.
pub(crate) fn bind_server_udp(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!("UDP receive buffer: {e}");
    }
    if let Ok(size) = socket.recv_buffer_size() {
        tracing::debug!("UDP receive buffer: {size} bytes");
    }
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// What the server asks for its accept queue (see [`listen_tcp`]).
const LISTEN_BACKLOG: i32 = 65_535;

/// What the server asks for its UDP receive queue (see [`bind_server_udp`]).
const UDP_RECV_BUFFER: usize = 8 << 20;

/// A nonblocking TCP listener with SO_REUSEADDR (restart without waiting out TIME_WAIT; on
/// Linux it does not let two listeners share a port) and a long accept queue: thousands of
/// clients may connect within one turn of the loop, and a SYN dropped on a full queue costs
/// its client a one-second retransmission. The kernel caps it at `net.core.somaxconn`.
pub(crate) fn listen_tcp(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Our messages are 8 bytes and must not wait for an ACK (Nagle). On Linux accepted sockets
    // inherit this, which saves a system call per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Raises this process's limit on open files (`RLIMIT_NOFILE`) so that `want` descriptors fit,
/// as far as it may: the usual soft limit (1024) is far below what one thread can serve (the
/// server: every waiting client holds a TCP connection; the load generator: every client it
/// plays).
///
/// The soft limit goes up to the hard one. Only when the hard limit is below `want` does it try
/// to raise the hard one (and the soft one) to `want`, which takes a privileged process
/// (`CAP_SYS_RESOURCE`) and at most `fs.nr_open`; otherwise the hard limit stays. It never
/// lowers a limit.
///
/// Returns the soft limit in force afterwards; `u64::MAX` when it cannot be read (and on
/// systems without `getrlimit`).
pub fn raise_fd_limit(want: u64) -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return u64::MAX;
            }
            let before = limit.rlim_cur;
            if limit.rlim_max < want as libc::rlim_t {
                let raised = libc::rlimit {
                    rlim_cur: want as libc::rlim_t,
                    rlim_max: want as libc::rlim_t,
                };
                // Fails without CAP_SYS_RESOURCE, or above fs.nr_open: keep the hard limit.
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
            if limit.rlim_cur < limit.rlim_max {
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    limit.rlim_cur = before;
                }
            }
            if limit.rlim_cur != before {
                tracing::debug!("open files: {before} -> {}", limit.rlim_cur);
            }
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
            let files = limit.rlim_cur as u64;
            files
        }
    }
    #[cfg(not(unix))]
    {
        let _ = want;
        u64::MAX
    }
}

/// Datagrams received per system call by [`Datagrams::recv`].
pub(crate) const BATCH: usize = 64;
/// Bytes kept of each datagram: every N4 message is 8; anything longer is garbage whatever
/// follows, so a cut copy is judged the same.
const DATAGRAM_BUF: usize = 64;

/// A batch of received datagrams: on Linux up to [`BATCH`] per `recvmmsg` call, elsewhere one
/// per `recv_from`. Under a flood of garbage this is what keeps each datagram cheap.
pub(crate) struct Datagrams {
    bufs: Box<[[u8; DATAGRAM_BUF]; BATCH]>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    count: usize,
}

impl Datagrams {
    pub(crate) fn new() -> Self {
        Self {
            bufs: Box::new([[0; DATAGRAM_BUF]; BATCH]),
            lens: [0; BATCH],
            from: [None; BATCH],
            count: 0,
        }
    }

    /// The received datagrams with their source (those whose source is not an IP address,
    /// which cannot happen on an IP socket, are skipped).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        (0..self.count).filter_map(|i| Some((self.from[i]?, &self.bufs[i][..self.lens[i]])))
    }

    /// Receives what is queued, up to a batch: `Ok(n)` with `n ≥ 1`, or `WouldBlock`. A batch
    /// shorter than [`BATCH`] means the queue was empty.
    #[cfg(target_os = "linux")]
    pub(crate) fn recv(&mut self, socket: &mio::net::UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;

        self.count = 0;
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: DATAGRAM_BUF,
            };
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a buffer and an address slot of ours that outlive the
        // call, with their true sizes.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = (msgs[i].msg_len as usize).min(DATAGRAM_BUF);
            self.from[i] = socket_addr(&addrs[i]);
        }
        self.count = n;
        Ok(n)
    }

    /// Receives one datagram: `Ok(1)`, or `WouldBlock`.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn recv(&mut self, socket: &mio::net::UdpSocket) -> io::Result<usize> {
        self.count = 0;
        let (n, from) = socket.recv_from(&mut self.bufs[0])?;
        self.lens[0] = n;
        self.from[0] = Some(from);
        self.count = 1;
        Ok(1)
    }
}

/// The IP address the kernel wrote into a `recvmmsg` address slot.
#[cfg(target_os = "linux")]
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv6Addr, SocketAddrV6};

    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the slot holds a sockaddr_in, which fits in the storage.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the slot holds a sockaddr_in6, which fits in the storage.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                u32::from_be(a.sin6_flowinfo),
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
