//! WireGuard, driven through its own tool `wg` (wireguard-tools): the same for the kernel
//! module and for wireguard-go. `n4` reads the interface's public key, points the interface
//! at the punched hole (`wg set … listen-port … peer … endpoint …`) and watches the peer's
//! counters to notice when the hole dies.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::Error;

/// What `wg show IFACE dump` says of one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerState {
    /// Unix time of the latest handshake (0: none yet).
    pub(crate) latest_handshake: u64,
    /// Bytes received from the peer.
    pub(crate) rx: u64,
}

fn wg(iface: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new("wg")
        .args(args)
        .output()
        .map_err(|e| Error::WireGuard {
            iface: iface.to_string(),
            reason: format!("cannot run `wg` (package wireguard-tools): {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::WireGuard {
            iface: iface.to_string(),
            reason: format!("`wg {}`: {}", args.join(" "), err.trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The interface's public key (base64).
pub(crate) fn public_key(iface: &str) -> Result<String, Error> {
    let key = wg(iface, &["show", iface, "public-key"])?;
    match parse_key(&key) {
        Some(_) => Ok(key),
        None => Err(Error::WireGuard {
            iface: iface.to_string(),
            reason: "it has no private key yet (`wg set IFACE private-key FILE`)".into(),
        }),
    }
}

/// A base64 WireGuard key's 32 bytes.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// Points the interface at the hole: it listens on the punched local port and sends to the
/// peer's address as the hole shows it. No keepalive yet, so it sends nothing by itself:
/// who starts the handshake is decided apart (see `link.rs`). `allowed_ips` is set only when
/// given.
pub(crate) fn configure(
    iface: &str,
    listen_port: u16,
    peer: &str,
    endpoint: SocketAddr,
    allowed_ips: Option<&str>,
) -> Result<(), Error> {
    let port = listen_port.to_string();
    let endpoint = endpoint.to_string();
    let mut args = vec![
        "set",
        iface,
        "listen-port",
        &port,
        "peer",
        peer,
        "endpoint",
        &endpoint,
        "persistent-keepalive",
        "off",
    ];
    if let Some(ips) = allowed_ips {
        args.extend(["allowed-ips", ips]);
    }
    wg(iface, &args).map(drop)
}

/// Turns the peer's persistent keepalive on. Turning it on sends a keepalive at once, which
/// starts a handshake when there is no session; afterwards it keeps the NATs' mappings and
/// tells us the hole is alive.
pub(crate) fn keepalive(iface: &str, peer: &str, every: Duration) -> Result<(), Error> {
    let every = every.as_secs().max(1).to_string();
    wg(
        iface,
        &["set", iface, "peer", peer, "persistent-keepalive", &every],
    )
    .map(drop)
}

/// Starts a handshake again at once: WireGuard sends at most one initiation per peer every
/// 5 s, so a lost first one would cost 5 s; a peer removed and added again starts afresh.
pub(crate) fn reinitiate(
    iface: &str,
    peer: &str,
    endpoint: SocketAddr,
    every: Duration,
) -> Result<(), Error> {
    // Removing the peer would lose a preshared key we cannot read back into `wg set`
    // without a file: with one, WireGuard's own retry (5 s) has to do.
    let psk = wg(iface, &["show", iface, "preshared-keys"])?
        .lines()
        .any(|l| {
            l.split_once('\t')
                .is_some_and(|(k, v)| k == peer && v != "(none)")
        });
    if psk {
        return keepalive(iface, peer, every);
    }
    let allowed = wg(iface, &["show", iface, "allowed-ips"])?
        .lines()
        .find_map(|l| {
            let (key, ips) = l.split_once('\t')?;
            (key == peer).then(|| ips.split_whitespace().collect::<Vec<_>>().join(","))
        })
        .filter(|ips| !ips.is_empty() && ips != "(none)");
    wg(iface, &["set", iface, "peer", peer, "remove"])?;
    let endpoint = endpoint.to_string();
    let every = every.as_secs().max(1).to_string();
    let mut args = vec![
        "set",
        iface,
        "peer",
        peer,
        "endpoint",
        &endpoint,
        "persistent-keepalive",
        &every,
    ];
    if let Some(ips) = &allowed {
        args.extend(["allowed-ips", ips]);
    }
    wg(iface, &args).map(drop)
}

/// The public keys of the interface's peers.
pub(crate) fn peers(iface: &str) -> Result<Vec<String>, Error> {
    Ok(wg(iface, &["show", iface, "peers"])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The peer's handshake time and received bytes, if the interface has the peer.
pub(crate) fn peer_state(iface: &str, peer: &str) -> Result<Option<PeerState>, Error> {
    let dump = wg(iface, &["show", iface, "dump"])?;
    Ok(parse_dump(&dump, peer))
}

/// `wg show IFACE dump`: the interface's line, then one per peer: public key, preshared key,
/// endpoint, allowed IPs, latest handshake, rx bytes, tx bytes, persistent keepalive.
fn parse_dump(dump: &str, peer: &str) -> Option<PeerState> {
    dump.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split('\t').collect();
        (f.len() >= 8 && f[0] == peer).then(|| PeerState {
            latest_handshake: f[4].parse().unwrap_or(0),
            rx: f[5].parse().unwrap_or(0),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines_give_the_peers_handshake_and_bytes() {
        let dump = "cHJpdmF0ZQ==\tcHVibGlj\t30012\toff\n\
                    UEVFUg==\t(none)\t203.0.113.12:20034\t10.44.0.2/32\t1764470000\t1234\t5678\t1\n";
        assert_eq!(
            parse_dump(dump, "UEVFUg=="),
            Some(PeerState {
                latest_handshake: 1764470000,
                rx: 1234
            })
        );
        assert_eq!(parse_dump(dump, "other"), None);
        assert_eq!(
            parse_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Some([0; 32])
        );
        assert_eq!(parse_key("not a key"), None);
    }
}
