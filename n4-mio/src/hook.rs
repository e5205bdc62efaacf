//! `--exec CMD`: a user's command run after each WIN, with the result as JSON on stdin and in
//! environment variables, so a script can hand the hole to another program.

use std::io::Write;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

use crate::client::WinReport;

/// Starts `sh -c CMD` with `json` (one line) on its stdin and the result in `N4_*` variables;
/// does not wait for it (a thread reaps it and logs a failure).
pub(crate) fn run(cmd: &str, report: &WinReport, json: &str) {
    let mut command = Command::new("sh");
    command
        .args(["-c", cmd])
        .stdin(Stdio::piped())
        // Our stdout carries only the `--json` result; the hook's output goes to stderr.
        .stdout(Stdio::from(std::io::stderr()))
        // The key stays with us.
        .env_remove("N4_KEY")
        .env("N4_LOCAL_PORT", report.local_port.to_string())
        .env("N4_PEER", report.peer.to_string())
        .env("N4_PEER_IP", report.peer.ip().to_string())
        .env("N4_PEER_PORT", report.peer.port().to_string())
        .env("N4_ROUND", report.round.to_string())
        .env("N4_ELAPSED_MS", report.elapsed_ms.to_string())
        .env("N4_STRATEGY", report.strategy);
    if let Some(via) = report.forward_via {
        command.env("N4_FORWARD_VIA", via.to_string());
    }
    if let Some(key) = &report.peer_wg_key {
        command.env("N4_PEER_WG_KEY", key);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            warn!("--exec: cannot start sh: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: a broken pipe is not an error here.
        let _ = writeln!(stdin, "{json}");
    }
    info!("--exec: started (pid {})", child.id());
    let cmd = cmd.to_string();
    std::thread::spawn(move || match child.wait() {
        Ok(status) if status.success() => debug!("--exec {cmd:?}: {status}"),
        Ok(status) => warn!("--exec {cmd:?}: {status}"),
        Err(e) => warn!("--exec {cmd:?}: {e}"),
    });
}
