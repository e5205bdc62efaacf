//! The shared UDP sender: every EXCHANGE (unless `--udp-per-client`) and every garbage datagram
//! leaves through one socket, from the address of whoever sends it, batched with `sendmmsg`. The
//! server sees the same datagrams as from sockets of their own; the generator does less work.

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

/// The longest datagram [`Sender`] sends.
const MAX_DATAGRAM: usize = 128;

/// One UDP socket on `0.0.0.0:port` that sends datagrams from any loopback address
/// (`IP_PKTINFO`'s `ipi_spec_dst`), many per `sendmmsg` call.
pub struct Sender {
    socket: UdpSocket,
    /// The socket's port: a client's exchange address is its own IP and this port.
    pub port: u16,
    to: libc::sockaddr_in,
    queue: Vec<(Ipv4Addr, [u8; MAX_DATAGRAM], usize)>,
}

impl Sender {
    /// A socket on an ephemeral port that sends to `server`.
    pub fn new(server: SocketAddrV4) -> io::Result<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_nonblocking(true)?;
        let port = socket.local_addr()?.port();
        // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_port = server.port().to_be();
        to.sin_addr.s_addr = u32::from(*server.ip()).to_be();
        Ok(Self {
            socket,
            port,
            to,
            queue: Vec::new(),
        })
    }

    /// Queues a datagram (cut to [`MAX_DATAGRAM`] bytes) from `from` to the server.
    pub fn queue(&mut self, from: Ipv4Addr, bytes: &[u8]) {
        let mut b = [0u8; MAX_DATAGRAM];
        let n = bytes.len().min(MAX_DATAGRAM);
        b[..n].copy_from_slice(&bytes[..n]);
        self.queue.push((from, b, n));
    }

    /// Sends what is queued (called before every poll). Errors are printed, not returned: a
    /// datagram lost is a pair the verdict will miss.
    pub fn flush(&mut self) {
        const BATCH: usize = 256;
        const SPACE: usize =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as usize;
        let mut pending = std::mem::take(&mut self.queue);
        for chunk in pending.chunks_mut(BATCH) {
            let n = chunk.len();
            // SAFETY: all of these are plain old data; zero is a valid value for each.
            let mut iovs: Vec<libc::iovec> = Vec::with_capacity(n);
            let mut cmsgs = vec![[0u64; SPACE.div_ceil(8)]; n];
            let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(n);
            for (k, (from, bytes, len)) in chunk.iter_mut().enumerate() {
                iovs.push(libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: *len,
                });
                let cmsg = cmsgs[k].as_mut_ptr().cast::<libc::cmsghdr>();
                // SAFETY: the buffer is CMSG_SPACE bytes, 8-aligned: room for the header and
                // an in_pktinfo after it.
                unsafe {
                    (*cmsg).cmsg_len =
                        libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    let info = libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>();
                    info.write_unaligned(libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(*from).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    });
                }
            }
            for k in 0..n {
                // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = (&mut self.to as *mut libc::sockaddr_in).cast();
                hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                hdr.msg_iov = &mut iovs[k];
                hdr.msg_iovlen = 1;
                hdr.msg_control = cmsgs[k].as_mut_ptr().cast();
                hdr.msg_controllen = SPACE as _;
                msgs.push(libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                });
            }
            let mut sent = 0;
            while sent < n {
                // SAFETY: msgs[sent..n] are valid mmsghdrs whose buffers live until we return.
                let r = unsafe {
                    libc::sendmmsg(
                        self.socket.as_raw_fd(),
                        msgs[sent..].as_mut_ptr(),
                        (n - sent) as u32,
                        0,
                    )
                };
                if r <= 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    // Loopback drops what the receiver cannot queue without telling us; an
                    // error here is ours (e.g. no such local address): report it once.
                    eprintln!("sendmmsg: {e}");
                    break;
                }
                sent += r as usize;
            }
        }
        pending.clear();
        self.queue = pending;
    }
}
