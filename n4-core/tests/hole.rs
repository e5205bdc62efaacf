//! After WIN: which datagrams are the peer's, keepalives, and when a kept hole is dead.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use n4_core::{ClientConfig, FromPeer, Hole, DEAD_AFTER_KEEPALIVES, KEEPALIVE};

const K: Duration = Duration::from_secs(5);

fn peer() -> SocketAddr {
    "203.0.113.12:40000".parse().unwrap()
}

fn hole(now: Instant, keepalive: Option<Duration>) -> Hole {
    Hole::new(now, &ClientConfig::default(), 3, peer(), keepalive)
}

#[test]
fn only_the_exact_path_of_a_slot_is_the_peer() {
    let t = Instant::now();
    let config = ClientConfig::default();
    let mut h = hole(t, Some(K));
    assert_eq!(
        h.handle_datagram(t, 3, peer(), b"hello", false, false),
        FromPeer::Data
    );
    // Another port of the peer's IP, the server, a probe slot, a stranger: not the peer.
    let other_port: SocketAddr = "203.0.113.12:40001".parse().unwrap();
    assert_eq!(
        h.handle_datagram(t, 3, other_port, b"x", false, false),
        FromPeer::NotThePeer
    );
    let server = SocketAddr::from(config.server);
    assert_eq!(
        h.handle_datagram(t, 3, server, b"x", false, false),
        FromPeer::NotThePeer
    );
    let probe_slot = usize::from(config.window_slots());
    assert_eq!(
        h.handle_datagram(t, probe_slot, peer(), b"x", false, false),
        FromPeer::NotThePeer
    );
    assert_eq!(
        h.handle_datagram(t, 4, peer(), b"x", false, false),
        FromPeer::NotThePeer
    );
    // The peer's PUNCH on another slot opens that slot's path, from exactly that address.
    assert_eq!(
        h.handle_datagram(t, 4, other_port, b"p", true, false),
        FromPeer::Handshake
    );
    assert_eq!(
        h.handle_datagram(t, 4, other_port, b"x", false, false),
        FromPeer::Data
    );
    assert_eq!(h.slots().collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(
        h.handle_datagram(t, 3, peer(), &KEEPALIVE, false, false),
        FromPeer::Handshake
    );
}

#[test]
fn keepalives_leave_the_winning_slot_every_interval_unless_traffic_went_out() {
    let t = Instant::now();
    let mut h = hole(t, Some(K));
    assert_eq!(h.poll_timeout(), Some(t + K));
    h.handle_timeout(t + K - Duration::from_millis(1));
    assert!(h.poll_transmit().is_none());
    h.handle_timeout(t + K);
    let ka = h.poll_transmit().expect("a keepalive is due");
    assert_eq!(
        (ka.slot, ka.destination, &ka.payload[..]),
        (3, peer(), &KEEPALIVE[..])
    );
    // The user's traffic keeps the mapping too: the next keepalive waits a full interval.
    h.handle_sent(t + K + Duration::from_secs(2));
    h.handle_timeout(t + 2 * K);
    assert!(h.poll_transmit().is_none());
    assert_eq!(h.poll_timeout(), Some(t + 2 * K + Duration::from_secs(2)));
    // Not kept: no keepalives, never dead.
    let mut exit = hole(t, None);
    exit.handle_timeout(t + 100 * K);
    assert!(exit.poll_transmit().is_none() && exit.poll_timeout().is_none());
    assert!(!exit.is_dead(t + 100 * K));
}

#[test]
fn a_hole_the_peer_keeps_dies_after_three_silent_intervals_a_v1_peers_never() {
    let t = Instant::now();
    let dead_after = K * DEAD_AFTER_KEEPALIVES;
    // A v1 peer never sends keepalives: its silence says nothing.
    let v1 = hole(t, Some(K));
    assert!(!v1.is_dead(t + 10 * dead_after));
    // Ours: its keepalive shows it keeps the hole; silence from then on is death.
    let mut ours = hole(t, Some(K));
    let last = t + Duration::from_secs(1);
    ours.handle_datagram(last, 3, peer(), &KEEPALIVE, false, false);
    assert!(!ours.is_dead(last + dead_after - Duration::from_millis(1)));
    assert!(ours.is_dead(last + dead_after));
    // A confirmed WIN (the peer is ours) counts as well; traffic on the path postpones death.
    let mut confirmed = hole(t, Some(K));
    confirmed.handle_datagram(t, 3, peer(), b"data", false, true);
    confirmed.handle_datagram(t + dead_after, 3, peer(), b"data", false, true);
    assert!(!confirmed.is_dead(t + dead_after + Duration::from_secs(1)));
    // Datagrams off the path do not keep it alive.
    let stranger: SocketAddr = "198.51.100.77:40000".parse().unwrap();
    confirmed.handle_datagram(t + 2 * dead_after, 3, stranger, b"x", false, true);
    assert!(confirmed.is_dead(t + 2 * dead_after));
}
