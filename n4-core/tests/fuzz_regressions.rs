//! Bugs the fuzz targets in `fuzz/` found, each pinned by the smallest story that shows it.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::*;

fn drain(c: &mut Client) -> (Vec<Command>, Vec<Event>) {
    let mut commands = Vec::new();
    while let Some(cmd) = c.poll_command() {
        commands.push(cmd);
    }
    while c.poll_transmit().is_some() {}
    let mut events = Vec::new();
    while let Some(e) = c.poll_event() {
        events.push(e);
    }
    (commands, events)
}

/// `fuzz/` client target: `RoundStarted` named the previous round's window.
#[test]
fn a_new_round_reports_the_window_it_opens() {
    for strategy in [Strategy::V1, Strategy::Predict] {
        let now = Instant::now();
        let config = ClientConfig {
            strategy,
            retry_delay: Duration::from_millis(100),
            ..ClientConfig::default()
        };
        let mut c = Client::new(config, now).unwrap();
        let _ = drain(&mut c);
        c.handle_connection_opened(now);
        c.handle_connection_closed(now); // round 1 lost: the server hung up
        let _ = drain(&mut c);
        let later = now + Duration::from_millis(100);
        c.handle_timeout(later);
        let (commands, events) = drain(&mut c);
        let Some(Command::OpenWindow { ports }) = commands.first() else {
            panic!("{strategy:?}: no new window: {commands:?}");
        };
        let started = events.iter().find_map(|e| match e {
            Event::RoundStarted {
                round, first_port, ..
            } => Some((*round, *first_port)),
            _ => None,
        });
        assert_eq!(started, Some((2, ports[0])), "{strategy:?}");
        assert_ne!(ports[0], 30000, "{strategy:?}: the window moved on");
    }
}

/// `fuzz/` client target: a predicted round lost in a live session at `max_rounds` gave up
/// without a `Close`, leaving the TCP connection open and the finished client still
/// reporting what the server said on it.
#[test]
fn giving_up_inside_a_session_lets_the_server_connection_go() {
    let now = Instant::now();
    let config = ClientConfig {
        max_rounds: Some(1),
        probes: 0,
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, now).unwrap();
    c.handle_connection_opened(now);
    c.handle_stream_data(now, &Message::Ready(Some(Token(7))).to_bytes());
    c.handle_stream_data(now, &Message::Hint(Hint(20)).to_bytes());
    c.handle_stream_data(
        now,
        &Message::PeerInfo("203.0.113.12:40000".parse().unwrap()).to_bytes(),
    );
    let _ = drain(&mut c);
    // No PUNCH comes (and no PEERINFO for a re-aim): the round is lost, and with it the
    // last round.
    let mut commands = Vec::new();
    let mut events = Vec::new();
    let mut at = now;
    for _ in 0..100 {
        let Some(t) = c.poll_timeout() else { break };
        at = t;
        c.handle_timeout(at);
        let (cmds, evs) = drain(&mut c);
        commands.extend(cmds);
        events.extend(evs);
    }
    assert!(c.is_finished());
    assert_eq!(events.last(), Some(&Event::GaveUp { rounds: 1 }));
    assert_eq!(commands, vec![Command::Close]);
    c.handle_stream_data(at, &Message::Hint(Hint(21)).to_bytes());
    assert_eq!(
        drain(&mut c),
        (vec![], vec![]),
        "a finished client is silent"
    );
}

/// `fuzz/` client target: garbage from the server after WIN lost the won round (LOSE after
/// WIN), cut the acknowledgement burst short and started a new round.
#[test]
fn server_garbage_after_win_only_drops_the_connection() {
    let now = Instant::now();
    let config = ClientConfig {
        strategy: Strategy::V1,
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, now).unwrap();
    c.handle_connection_opened(now);
    c.handle_stream_data(now, &Message::Ready(None).to_bytes());
    let peer = "203.0.113.12:40020".parse().unwrap();
    let punch = Message::Punch(Ident::default()).to_bytes();
    c.handle_datagram(now, 4, peer, &punch); // early: kept until PEERINFO
    c.handle_stream_data(
        now,
        &Message::PeerInfo("203.0.113.12:40000".parse().unwrap()).to_bytes(),
    );
    let (_, events) = drain(&mut c);
    assert!(
        matches!(events.last(), Some(Event::Win { .. })),
        "{events:?}"
    );

    c.handle_stream_data(now, &[0; 8]); // not a message
    let (commands, events) = drain(&mut c);
    assert_eq!(commands, vec![Command::Close]);
    assert_eq!(events, vec![]);
    let mut at = now;
    let mut events = Vec::new();
    while let Some(t) = c.poll_timeout() {
        at = t;
        c.handle_timeout(at);
        events.extend(drain(&mut c).1);
    }
    assert_eq!(events, vec![Event::Finished]);
    assert!(c.is_finished() && at > now);
}

/// `fuzz/` client target: planning for a window of fewer than 4 slots panicked in
/// `f64::clamp(4.0, max_window)`; a predicting client with `port_count` and `max_window`
/// both below 4 hit it as soon as two probes were answered.
#[test]
fn planning_fits_windows_of_fewer_than_four_slots() {
    let t0 = Instant::now();
    let mut p = PortPredictor::default();
    p.observe(0, t0, 40000);
    p.observe(1, t0 + Duration::from_millis(20), 40003);
    for max in 1..=4u16 {
        let plan = p
            .plan(Duration::from_millis(50), max)
            .expect("sequential NAT");
        assert_eq!(plan.window, max);
    }
    assert_eq!(p.plan(Duration::from_millis(50), 0), None);
}

/// `fuzz/` client target: an EXCHANGE deferred for the probes' answers went out when they
/// arrived even if the round had moved on (PEERINFO came first) — or the client had finished.
#[test]
fn a_deferred_exchange_is_dropped_once_the_round_moves_on() {
    let now = Instant::now();
    let config = ClientConfig::default(); // predicting
    let probe_slot = usize::from(config.window_slots());
    let probe_server = SocketAddr::from(config.probe_server());
    let mut c = Client::new(config, now).unwrap();
    c.handle_timeout(now); // the first two probes
    c.handle_connection_opened(now);
    // READY before any probe answer: the EXCHANGE waits for them.
    c.handle_stream_data(now, &Message::Ready(Some(Token(7))).to_bytes());
    c.handle_stream_data(
        now,
        &Message::PeerInfo("203.0.113.12:40000".parse().unwrap()).to_bytes(),
    );
    let _ = drain(&mut c);
    for (i, port) in [(0, 40000), (1, 40001)] {
        let seen = Message::Seen(SocketAddrV4::new([198, 51, 100, 3].into(), port));
        c.handle_datagram(now, probe_slot + i, probe_server, &seen.to_bytes());
    }
    let mut transmits = Vec::new();
    while let Some(t) = c.poll_transmit() {
        transmits.push(t);
    }
    let (_, events) = drain(&mut c);
    assert!(!events.contains(&Event::ExchangeSent), "{events:?}");
    assert!(
        transmits
            .iter()
            .all(|t| t.payload[0] != Message::Exchange(Ident::default()).command()),
        "{transmits:?}"
    );
}
