//! Findings of the attack review that live in the core (docs/SECURITY.md), each pinned by the
//! smallest story that shows it, driving one machine by hand.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::*;

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 1721);
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), 40000);

/// Everything the client says after an input.
#[derive(Default)]
struct Said {
    commands: Vec<Command>,
    transmits: Vec<Transmit>,
    events: Vec<Event>,
}

fn drain(c: &mut Client) -> Said {
    let mut said = Said::default();
    while let Some(cmd) = c.poll_command() {
        said.commands.push(cmd);
    }
    while let Some(t) = c.poll_transmit() {
        said.transmits.push(t);
    }
    while let Some(e) = c.poll_event() {
        said.events.push(e);
    }
    said
}

/// A client connected to `server` that has said HELLO and got a v1 READY (no token).
fn v1_client_after_ready(server: SocketAddrV4, now: Instant) -> Client {
    let config = ClientConfig {
        server,
        strategy: Strategy::V1,
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, now).unwrap();
    let _ = drain(&mut c);
    c.handle_connection_opened(now);
    c.handle_stream_data(now, &Message::Ready(None).to_bytes());
    let _ = drain(&mut c);
    c
}

/// Finding 3: a server that names a non-host (unspecified, loopback while it is remote,
/// multicast, broadcast, reserved) or port 0 gets the round refused: not one PUNCH leaves.
#[test]
fn peer_info_naming_no_real_host_is_refused_and_never_punched() {
    let bad = [
        "0.0.0.0:5353",
        "127.0.0.1:5353",
        "127.1.2.3:9",
        "224.0.0.1:5353",
        "239.255.255.250:1900",
        "255.255.255.255:9",
        "240.0.0.1:9",
        "203.0.113.12:0",
    ];
    for addr in bad {
        let peer: SocketAddrV4 = addr.parse().unwrap();
        let now = Instant::now();
        let mut c = v1_client_after_ready(SERVER, now);
        c.handle_stream_data(now, &Message::PeerInfo(peer).to_bytes());
        let said = drain(&mut c);
        let punches: Vec<_> = said
            .transmits
            .iter()
            .filter(|t| t.destination != SocketAddr::from(SERVER))
            .collect();
        assert!(punches.is_empty(), "{addr}: punched {punches:?}");
        assert!(
            said.events
                .iter()
                .any(|e| matches!(e, Event::PeerRefused { peer: p, .. } if *p == peer)),
            "{addr}: not refused: {:?}",
            said.events
        );
        assert!(
            said.events.iter().any(|e| matches!(
                e,
                Event::Lose {
                    reason: LoseReason::BadPeerAddress,
                    ..
                }
            )),
            "{addr}: {:?}",
            said.events
        );
    }
}

/// The same rule lets a server on this machine name a peer on this machine (tests, labs).
#[test]
fn a_server_on_loopback_may_name_a_loopback_peer() {
    let now = Instant::now();
    let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1721);
    let mut c = v1_client_after_ready(server, now);
    let peer = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 31000);
    c.handle_stream_data(now, &Message::PeerInfo(peer).to_bytes());
    let said = drain(&mut c);
    assert_eq!(said.transmits.len(), 5 * 25, "{:?}", said.events);
}

/// Finding 3: a server speaking our extension that answers every EXCHANGE with a fresh
/// PEERINFO drew 640 datagrams/s from 64 ports, for ever. Over one minute the client now
/// sends at most its budget to peers, and says so.
#[test]
fn a_lying_server_draws_no_more_than_the_punch_budget_per_minute() {
    let t0 = Instant::now();
    let config = ClientConfig {
        server: SERVER,
        ..ClientConfig::default()
    };
    let budget = config.punch_budget_per_minute();
    let mut c = Client::new(config, t0).unwrap();
    let mut now = t0;
    let mut to_peer = 0u32;
    let mut exhausted = false;
    let mut rounds = 0;
    let end = t0 + BUDGET_PERIOD - Duration::from_millis(1);
    loop {
        let said = drain(&mut c);
        let mut exchanged = false;
        for t in &said.transmits {
            if t.destination.ip() == *PEER.ip() {
                to_peer += 1;
            }
            if t.destination == SocketAddr::from(SERVER) {
                exchanged = true;
            }
        }
        exhausted |= said
            .events
            .iter()
            .any(|e| matches!(e, Event::BudgetExhausted { .. }));
        if said.commands.contains(&Command::Connect) {
            c.handle_connection_opened(now);
            c.handle_stream_data(now, &Message::Ready(Some(Token(7))).to_bytes());
            continue;
        }
        if exchanged {
            // The lie: "your partner is here", every time, with a hint so it looks aimed.
            rounds += 1;
            let mut bytes = Message::Hint(Hint(3)).to_bytes().to_vec();
            bytes.extend_from_slice(&Message::PeerInfo(PEER).to_bytes());
            c.handle_stream_data(now, &bytes);
            continue;
        }
        match c.poll_timeout() {
            Some(t) if t <= end => {
                now = t;
                c.handle_timeout(now);
            }
            _ => break,
        }
    }
    assert!(rounds > 50, "the lie ran only {rounds} rounds");
    assert!(to_peer > 0, "nothing was punched at all");
    assert!(
        to_peer <= budget,
        "{to_peer} datagrams to the named peer in a minute (budget {budget})"
    );
    assert!(exhausted, "the spent budget was not reported");
}

/// Finding 6: junk punches that arrive before PEERINFO used to fill the early-punch memory
/// (16 entries) so that a faster real peer's punch was dropped and it lost.
#[test]
fn junk_punches_before_peer_info_do_not_push_out_the_real_peers() {
    let now = Instant::now();
    let mut c = v1_client_after_ready(SERVER, now);
    let punch = Message::Punch(Ident::default()).to_bytes();
    for i in 0..100u16 {
        let junk = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 66), 1000 + i));
        c.handle_datagram(now, usize::from(i % 25), junk, &punch);
    }
    c.handle_datagram(now, 3, PEER.into(), &punch);
    c.handle_stream_data(now, &Message::PeerInfo(PEER).to_bytes());
    let said = drain(&mut c);
    let win = said.events.iter().find_map(|e| match e {
        Event::Win { slot, peer, .. } => Some((*slot, *peer)),
        _ => None,
    });
    assert_eq!(win, Some((3, SocketAddr::from(PEER))), "{:?}", said.events);
}

/// Finding 2: when the server frees a seat nobody came for (its wait timeout), the client
/// says HELLO again on a new connection — same round, same window, no LOSE.
#[test]
fn a_client_whose_wait_the_server_ends_says_hello_again_in_the_same_round() {
    let t0 = Instant::now();
    let config = ClientConfig {
        server: SERVER,
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, t0).unwrap();
    let _ = drain(&mut c);
    c.handle_connection_opened(t0);
    let said = drain(&mut c);
    assert!(said.events.contains(&Event::HelloSent));
    let later = t0 + Duration::from_secs(60);
    c.handle_connection_closed(later);
    let said = drain(&mut c);
    assert!(said.events.contains(&Event::Rehello), "{:?}", said.events);
    assert!(
        !said.events.iter().any(|e| matches!(e, Event::Lose { .. })),
        "{:?}",
        said.events
    );
    let (at, said) = timers_until(&mut c, later + Duration::from_secs(2), |s| {
        !s.commands.is_empty()
    });
    assert_eq!(
        said.commands,
        vec![Command::Connect],
        "same window, new connection"
    );
    c.handle_connection_opened(at);
    let said = drain(&mut c);
    assert!(said.events.contains(&Event::HelloSent));
    assert_eq!(c.round(), 1);
}

/// Finding 9: with `max_rounds`, the first wait for a partner is bounded by the round
/// timeout too (it used to wait for ever).
#[test]
fn a_bounded_client_alone_gives_up_after_its_rounds() {
    let t0 = Instant::now();
    let config = ClientConfig {
        server: SERVER,
        max_rounds: Some(1),
        round_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, t0).unwrap();
    let _ = drain(&mut c);
    c.handle_connection_opened(t0);
    let _ = drain(&mut c);
    let (at, said) = timers_until(&mut c, t0 + Duration::from_secs(1), |s| {
        !s.events.is_empty()
    });
    assert!(at <= t0 + Duration::from_secs(1), "{:?}", at - t0);
    assert!(
        said.events.contains(&Event::GaveUp { rounds: 1 }),
        "{:?}",
        said.events
    );
    assert!(c.is_finished());
}

/// Runs the client's timers up to `limit` until what it says satisfies `done`; returns when,
/// and what it said then (empty if never).
fn timers_until(c: &mut Client, limit: Instant, done: impl Fn(&Said) -> bool) -> (Instant, Said) {
    while let Some(at) = c.poll_timeout().filter(|&t| t <= limit) {
        c.handle_timeout(at);
        let said = drain(c);
        if done(&said) {
            return (at, said);
        }
    }
    (limit, Said::default())
}

fn server_outputs(s: &mut Server) -> Vec<ServerOutput> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

/// Finding 2: waiting seats per IP are capped apart from connections, and the default wait
/// for a partner is finite.
#[test]
fn waiting_seats_per_ip_are_capped_and_the_default_wait_is_finite() {
    let wait = ServerConfig::default()
        .wait_timeout
        .expect("a finite default wait");
    let mut s = Server::new(ServerConfig {
        max_waiting_per_ip: 2,
        ..ServerConfig::default()
    });
    let t0 = Instant::now();
    let squatter = |port: u16| SocketAddr::from((Ipv4Addr::new(198, 51, 100, 9), port));
    for (n, ident) in ["room1", "room2", "room3"].into_iter().enumerate() {
        let conn = ConnId(n as u64);
        s.handle_connection_opened(t0, conn, squatter(5000 + n as u16));
        s.handle_stream_data(
            t0,
            conn,
            &Message::Hello(Ident::new(ident).unwrap()).to_bytes(),
        );
    }
    let out = server_outputs(&mut s);
    assert_eq!(out, vec![ServerOutput::Close { conn: ConnId(2) }]);
    assert_eq!(s.stats().waiting, 2);
    // A partner for a waiting room still pairs, whatever its IP holds.
    s.handle_connection_opened(t0, ConnId(3), squatter(6000));
    s.handle_stream_data(
        t0,
        ConnId(3),
        &Message::Hello(Ident::new("room1").unwrap()).to_bytes(),
    );
    let out = server_outputs(&mut s);
    assert_eq!(out.len(), 2, "READY to both: {out:?}");
    // The last squatter is let go when the wait ends.
    s.handle_timeout(t0 + wait);
    assert!(server_outputs(&mut s).contains(&ServerOutput::Close { conn: ConnId(1) }));
    assert_eq!(s.stats().waiting, 0);
}

/// Finding 8: the probe port answered 1:1 without a per-IP limit (a reflector for anyone
/// who spoofs a source).
#[test]
fn probe_answers_to_one_ip_are_rate_limited() {
    let mut s = Server::new(ServerConfig::default());
    let limit = ServerConfig::default().probes_per_ip;
    let t0 = Instant::now();
    let victim = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 7), 4000));
    for _ in 0..5040 {
        s.handle_datagram(t0, Local::Probe, victim, &Message::Probe.to_bytes());
    }
    assert_eq!(server_outputs(&mut s).len(), limit as usize);
    // Another IP is served meanwhile; the first again a second later.
    let other = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 8), 4000));
    s.handle_datagram(t0, Local::Probe, other, &Message::Probe.to_bytes());
    assert_eq!(server_outputs(&mut s).len(), 1);
    s.handle_datagram(
        t0 + Duration::from_secs(1),
        Local::Probe,
        victim,
        &Message::Probe.to_bytes(),
    );
    assert_eq!(server_outputs(&mut s).len(), 1);
    assert_eq!(s.stats().probes_limited, 5040 - u64::from(limit));
}
