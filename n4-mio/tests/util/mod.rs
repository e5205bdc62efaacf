//! Real `n4` processes for the tests (on loopback, or inside a lab's network namespaces):
//! spawn, watch their log and stdout, wait with a deadline, and kill on drop so a failing test
//! leaves nothing behind.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use n4_core::{Ident, Message};

pub const N4: &str = env!("CARGO_BIN_EXE_n4");

/// Lines a reader thread collects from a child's pipe.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// A running `n4`, killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    stderr: Lines,
    stdout: Lines,
}

/// Collects the lines of `reader` on a thread of its own, each also sent to `tx` if given.
pub fn collect(reader: impl Read + Send + 'static, tx: Option<mpsc::Sender<String>>) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Waits for `child` until `limit`; `None` if it is still running then.
pub fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Proc {
    /// `n4 ARGS`.
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let mut command = Command::new(N4);
        command.args(args);
        Self::spawn_command(name, command)
    }

    /// `command` (which runs `n4` in the end, e.g. through `ip netns exec`: the pid must be
    /// n4's for [`Proc::signal`]), with stdout and stderr collected.
    pub fn spawn_command(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: spawn {:?}: {e}", command.get_program()));
        let stderr = collect(child.stderr.take().unwrap(), None);
        let stdout = collect(child.stdout.take().unwrap(), None);
        Self {
            name: name.to_string(),
            child,
            stderr,
            stdout,
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The log's `ERROR` lines.
    pub fn errors(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .map(String::from)
            .collect()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until a stderr line contains `needle`; panics with the log after `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < end,
                "{}: no {needle:?} within {limit:?}; log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the first stdout line.
    pub fn wait_stdout(&self, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            if let Some(l) = self.stdout.lock().unwrap().first() {
                return l.clone();
            }
            assert!(
                Instant::now() < end,
                "{}: nothing on stdout within {limit:?}; log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit status; panics with the log (and kills it, on drop) after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = wait_until(&mut self.child, limit).unwrap_or_else(|| {
            panic!(
                "{}: still running after {limit:?}; log:\n{}",
                self.name,
                self.log()
            )
        });
        // Let the reader threads catch the last lines.
        thread::sleep(Duration::from_millis(50));
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGINT or SIGTERM.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for TCP and UDP right now, with the next port (the probe port) free for UDP.
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        if port < 65535
            && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port + 1)).is_ok()
        {
            return port;
        }
    }
}

/// Starts `n4 -s -l PORT` (plus `extra`) and waits until it listens. A port that another
/// test took between `free_port` and the bind is tried again with another one.
pub fn server(extra: &[&str]) -> (Proc, u16) {
    for _ in 0..5 {
        let port = free_port();
        let p = port.to_string();
        let mut args = vec!["-s", "-l", &p];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn("server", &args);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if proc.log().contains("Listening on") {
                return (proc, port);
            }
            if !proc.is_running() {
                thread::sleep(Duration::from_millis(50));
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            proc.log().contains("Address already in use"),
            "server did not start:\n{}",
            proc.log()
        );
    }
    panic!("no free port for the server after 5 tries")
}

/// Starts `n4 -c -h 127.0.0.1 -p PORT -b START` plus `extra`.
pub fn client(name: &str, port: u16, start: u16, extra: &[&str]) -> Proc {
    let (p, b) = (port.to_string(), start.to_string());
    let mut args = vec!["-c", "-h", "127.0.0.1", "-p", &p, "-b", &b];
    args.extend_from_slice(extra);
    Proc::spawn(name, &args)
}

fn err(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// What a v1 client saw.
#[derive(Debug)]
pub struct V1Win {
    pub local_port: u16,
    pub peer: SocketAddr,
    pub peer_info: SocketAddr,
    pub ready: [u8; 8],
}

/// The original client's round, by hand with std sockets and n4-core's codec: TCP HELLO, read
/// READY (only byte 0 matters to v1), EXCHANGE ×3 from its one UDP socket, read PEERINFO,
/// PUNCH ×5 to peer port + `offset`, wait for the peer's PUNCH, acknowledge it ×10.
///
/// Its TCP and UDP sockets are bound to `ip` (any 127.x.y.z works on Linux loopback): v1
/// clients carry no token, so a server can tell two of them apart only by their IPs.
pub fn v1_client(ip: [u8; 4], server: u16, ident: &str, offset: i32) -> Result<V1Win, String> {
    let ip = Ipv4Addr::from(ip);
    let server: SocketAddr = (Ipv4Addr::LOCALHOST, server).into();
    let ident = Ident::new(ident).unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(err("socket"))?;
    socket
        .bind(&SocketAddr::from((ip, 0)).into())
        .map_err(err("bind tcp"))?;
    socket
        .connect_timeout(&server.into(), Duration::from_secs(5))
        .map_err(err("connect"))?;
    let mut tcp = TcpStream::from(socket);
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let udp = UdpSocket::bind((ip, 0)).map_err(err("bind"))?;
    tcp.write_all(&Message::Hello(ident).to_bytes())
        .map_err(err("hello"))?;
    let mut ready = [0u8; 8];
    tcp.read_exact(&mut ready).map_err(err("ready"))?;
    if ready[0] != 0x02 {
        return Err(format!("not READY: {ready:?}"));
    }
    for _ in 0..3 {
        udp.send_to(&Message::Exchange(ident).to_bytes(), server)
            .map_err(err("exchange"))?;
    }
    let mut info = [0u8; 8];
    tcp.read_exact(&mut info).map_err(err("peerinfo"))?;
    let Ok(Message::PeerInfo(peer_info)) = Message::decode(&info) else {
        return Err(format!("not PEERINFO: {info:?}"));
    };
    let port = u16::try_from(i32::from(peer_info.port()) + offset).map_err(|e| e.to_string())?;
    let target = SocketAddr::from((*peer_info.ip(), port));
    let punch = Message::Punch(ident).to_bytes();
    for _ in 0..5 {
        udp.send_to(&punch, target).map_err(err("punch"))?;
    }
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64];
    let peer = loop {
        if Instant::now() > end {
            return Err("no punch from the peer within 10 s".into());
        }
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            if buf[..n] == punch && from.ip() == *peer_info.ip() {
                break from;
            }
        }
    };
    for _ in 0..10 {
        let _ = udp.send_to(&punch, peer);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(V1Win {
        local_port: udp.local_addr().unwrap().port(),
        peer,
        peer_info: peer_info.into(),
        ready,
    })
}
