//! A lasting link: punch, hand the hole over (keep it, relay it, or give it to WireGuard),
//! notice when the NAT forgets it, and punch again — without a human.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use n4_core::DEAD_AFTER_KEEPALIVES;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{debug, info, warn};

use crate::client::{run_client, AfterWin, ClientOptions, ClientOutcome};
use crate::{wg, Error};

/// `--wg IFACE`: WireGuard takes the hole.
#[derive(Clone, Debug)]
pub struct WireGuardOptions {
    /// The interface (it exists, has a private key and is up).
    pub iface: String,
    /// The peer's public key (base64); `None`: handed over in the keyed handshake.
    pub peer: Option<String>,
    /// Persistent keepalive, which also tells us the hole is alive.
    pub keepalive: Duration,
    /// Allowed IPs to set on the peer (`None`: as the interface has them; a new peer alone on
    /// the interface gets everything).
    pub allowed_ips: Option<String>,
}

/// How long the first handshake after a punch may take (prompted along the way).
const FIRST_HANDSHAKE: Duration = Duration::from_secs(10);
/// The side that starts the handshake waits this long after its WIN, so that the other side
/// (which wins up to a one-way delay later) has handed its port to WireGuard.
const INITIATE_AFTER: Duration = Duration::from_millis(200);
/// The other side starts one itself if none came by then.
const TAKE_OVER_AFTER: Duration = Duration::from_secs(3);
/// A handshake not done by then is started again.
const RETRY_EVERY: Duration = Duration::from_millis(1200);
/// How often the peer's counters are read.
const WATCH: Duration = Duration::from_millis(250);

/// Runs the client until the link is given up (signal, `--timeout`, `--rounds`, an error):
/// in `--keepalive`/`--forward` mode and with WireGuard, a hole that dies is punched again,
/// from the next window of ports.
pub fn run_link(
    mut options: ClientOptions,
    wireguard: Option<WireGuardOptions>,
) -> Result<ClientOutcome, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let base = options.config.port_start;
    let slots = options.config.window_slots();
    let mut our_key = String::new();
    if let Some(wg) = &wireguard {
        our_key = wg::public_key(&wg.iface)?;
        info!("WireGuard: interface {} (public key {our_key})", wg.iface);
        options.config.peer_data = wg::parse_key(&our_key);
    }
    for attempt in 0u32.. {
        if attempt > 0 {
            options.config.port_start = window_start(base, slots, attempt);
            // Fresh nonces for every handshake: a seed used twice would repeat them, and a
            // recorded handshake could be replayed.
            options.config.rng_seed = crate::random_seed();
            // `--timeout` bounds the wait for the first WIN, not the life of the link.
            options.timeout = None;
        }
        let outcome = run_client(options.clone())?;
        if stop.load(Ordering::Relaxed) {
            return Ok(outcome);
        }
        let report = match outcome {
            ClientOutcome::HoleDied(report) => {
                warn!(
                    "Nothing from the peer {} for {} keepalives: the hole died; punching again",
                    report.peer, DEAD_AFTER_KEEPALIVES
                );
                // The local program keeps talking to the same relay address.
                if let (AfterWin::Forward { bind, .. }, Some(via)) =
                    (&mut options.after_win, report.forward_via)
                {
                    *bind = via;
                }
                continue;
            }
            ClientOutcome::Won(report) if wireguard.is_some() => report,
            other => return Ok(other),
        };
        let wg = wireguard.as_ref().expect("checked above");
        let Some(peer) = wg.peer.clone().or(report.peer_wg_key.clone()) else {
            return Err(Error::WireGuard {
                iface: wg.iface.clone(),
                reason: "the partner handed over no WireGuard key (is it running --wg?)".into(),
            });
        };
        let allowed = match &wg.allowed_ips {
            Some(ips) => Some(ips.clone()),
            None => default_allowed_ips(&wg.iface, &peer)?,
        };
        wg::configure(
            &wg.iface,
            report.local_port,
            &peer,
            report.peer,
            allowed.as_deref(),
        )?;
        info!(
            "WireGuard: {} listens on {}, peer {peer} at {} (keepalive {} s)",
            wg.iface,
            report.local_port,
            report.peer,
            wg.keepalive.as_secs()
        );
        // Both sides starting a handshake at once spoils both (each answers the other's and
        // drops the answer to its own): the side with the lower public key starts it.
        let initiator = our_key < peer;
        if !watch(wg, &peer, report.peer, initiator, &stop)? {
            return Ok(ClientOutcome::Won(report));
        }
    }
    unreachable!("the loop returns")
}

/// Starts the handshake (the initiator at once, the other side if none came), then watches
/// the WireGuard peer until the hole dies (`true`) or a signal stops us (`false`).
fn watch(
    wg: &WireGuardOptions,
    peer: &str,
    endpoint: SocketAddr,
    initiator: bool,
    stop: &AtomicBool,
) -> Result<bool, Error> {
    let configured = Instant::now();
    let configured_unix = unix_now();
    let mut next_try = configured
        + if initiator {
            INITIATE_AFTER
        } else {
            TAKE_OVER_AFTER
        };
    let mut tries = 0u32;
    let mut handshake_at = None;
    let mut last_rx = wg::peer_state(&wg.iface, peer)?.map_or(0, |s| s.rx);
    let mut last_rx_at = Instant::now();
    let dead_after = wg.keepalive.saturating_mul(DEAD_AFTER_KEEPALIVES) + WATCH;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(WATCH);
        let now = Instant::now();
        let state = wg::peer_state(&wg.iface, peer)?;
        let Some(state) = state else {
            warn!(
                "WireGuard: {} no longer has the peer; punching again",
                wg.iface
            );
            return Ok(true);
        };
        if state.rx > last_rx {
            last_rx = state.rx;
            last_rx_at = now;
        }
        if handshake_at.is_none() {
            if state.latest_handshake >= configured_unix {
                handshake_at = Some(now);
                last_rx_at = now;
                info!(
                    "WireGuard: handshake with the peer {:.1} s after the punch",
                    now.duration_since(configured).as_secs_f64()
                );
                // Keepalives from now on (from the initiator they already flow).
                wg::keepalive(&wg.iface, peer, wg.keepalive)?;
                continue;
            }
            if now.duration_since(configured) >= FIRST_HANDSHAKE {
                warn!("WireGuard: no handshake within {FIRST_HANDSHAKE:?}; punching again");
                return Ok(true);
            }
            if now >= next_try {
                debug!("WireGuard: starting a handshake (try {})", tries + 1);
                if tries == 0 {
                    wg::keepalive(&wg.iface, peer, wg.keepalive)?;
                } else {
                    wg::reinitiate(&wg.iface, peer, endpoint, wg.keepalive)?;
                }
                tries += 1;
                next_try = now + RETRY_EVERY;
            }
            continue;
        }
        if now.duration_since(last_rx_at) >= dead_after {
            warn!(
                "WireGuard: nothing from the peer for {:.0} s: the hole died; punching again",
                now.duration_since(last_rx_at).as_secs_f64()
            );
            return Ok(true);
        }
    }
    info!("Stopped");
    Ok(false)
}

/// Allowed IPs for a peer not given `--wg-allowed-ips`: those it has already; everything when
/// it is new and alone on the interface (a point-to-point link: the interface's own address and
/// routes decide what goes through it); none, with a warning, beside other peers (everything
/// would take their traffic).
fn default_allowed_ips(iface: &str, peer: &str) -> Result<Option<String>, Error> {
    let peers = wg::peers(iface)?;
    if peers.iter().any(|p| p == peer) {
        return Ok(None);
    }
    if peers.is_empty() {
        info!("WireGuard: the peer is the interface's only one: allowed IPs 0.0.0.0/0, ::/0");
        return Ok(Some("0.0.0.0/0,::/0".into()));
    }
    warn!(
        "WireGuard: {iface} has other peers: the new peer gets no allowed IPs \
         (set --wg-allowed-ips)"
    );
    Ok(None)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first port of attempt `n`'s window: the window after the last, wrapping back to `base`
/// before passing 65535 (0: ephemeral ports, always).
fn window_start(base: u16, slots: u16, n: u32) -> u16 {
    if base == 0 {
        return 0;
    }
    let room = (65536 - u32::from(base)) / u32::from(slots.max(1));
    let k = if room == 0 { 0 } else { n % room };
    (u32::from(base) + k * u32::from(slots)) as u16
}

#[cfg(test)]
mod tests {
    use super::window_start;

    #[test]
    fn each_attempt_takes_the_next_window_and_wraps() {
        assert_eq!(window_start(30000, 64, 0), 30000);
        assert_eq!(window_start(30000, 64, 1), 30064);
        assert_eq!(window_start(65000, 64, 8), 65000);
        assert_eq!(window_start(0, 64, 5), 0);
    }
}
