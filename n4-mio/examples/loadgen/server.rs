//! The server under test when the generator starts it (`--spawn`): started, waited for until it
//! listens, stopped with SIGTERM at the end.

use std::net::{SocketAddrV4, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `cmd` (split on whitespace), its stderr appended to `log` or discarded, and returns
/// once it accepts connections on `server`. Panics if it exits or does not listen within 10 s.
pub fn spawn(cmd: &str, log: Option<&str>, server: SocketAddrV4) -> Child {
    let mut words = cmd.split_whitespace();
    let program = words.next().expect("--spawn: empty command");
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("--server-log: cannot open"),
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(program)
        .args(words)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("--spawn {cmd:?}: {e}"));
    // Ready when it accepts a connection (which then closes without a word: harmless).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&server.into(), Duration::from_millis(200)).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("--spawn {cmd:?} exited: {status}");
        }
        assert!(Instant::now() < end, "server not listening on {server}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    child
}

/// Stops the server: SIGTERM, then waits for it to exit.
pub fn stop(mut child: Child) {
    // SAFETY: kill(2) with our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}
