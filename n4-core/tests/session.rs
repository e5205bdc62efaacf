//! Whole sessions in memory: a server and clients, virtual time, no sockets, no NAT.

mod util;

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::*;
use util::World;

fn client(start: u16) -> ClientConfig {
    ClientConfig {
        port_start: start,
        ..ClientConfig::default()
    }
}

fn v1_client(start: u16) -> ClientConfig {
    ClientConfig {
        strategy: Strategy::V1,
        ..client(start)
    }
}

fn both_won(w: &World, a: usize, b: usize) -> bool {
    w.won(a).is_some() && w.won(b).is_some()
}

#[test]
fn two_clients_win_and_each_learns_the_others_address() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));

    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
    // No NAT: b aims at a's EXCHANGE port 30000 plus a's hint, i.e. at a's slot `hint`;
    // the first punch there comes from b's slot 0.
    let hint_of_a = w.hosts[a]
        .events
        .iter()
        .find_map(|e| match e {
            Event::Planned { hint, .. } => Some(hint.0),
            _ => None,
        })
        .expect("a planned its round");
    assert!(w.hosts[b]
        .events
        .contains(&Event::PeerHint(Hint(hint_of_a))));
    // No NAT here: window slot 0's probe comes back with its own port, so each side says
    // "aim at my EXCHANGE's port exactly" and the other does.
    assert_eq!(Hint(hint_of_a), Hint::INDEPENDENT);
    // Both settle on one pair of addresses (a confirmed WIN): each one's local port and peer
    // are the other's peer and local port: b's EXCHANGE slot 0, which a aimed at.
    let (_, slot_b) = w.assert_one_pair(a, b);
    assert_eq!(slot_b, 0);
    // Ours talk to ours: the extension was used and the server told each its own mapping.
    assert!(w.hosts[a].events.contains(&Event::Ready { extended: true }));
    assert!(w.hosts[a].events.contains(&Event::Seen(w.exchange_addr(a))));
    // WIN is reported at once; the acknowledgement burst then ends the client.
    assert!(
        w.elapsed() < Duration::from_millis(500),
        "{:?}",
        w.elapsed()
    );
    assert!(w.run_until(Duration::from_secs(5), |w| w
        .hosts
        .iter()
        .all(|h| h.client.is_finished())));
    assert_eq!(w.hosts[a].events.last(), Some(&Event::Finished));
}

#[test]
fn plain_v1_clients_pair_on_our_server_and_ours_on_a_v1_style_server() {
    // v1 clients ignore the token in READY and send v1 EXCHANGEs.
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], v1_client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert!(w.hosts[a]
        .events
        .contains(&Event::Ready { extended: false }));
    assert!(!w.hosts[a]
        .events
        .iter()
        .any(|e| matches!(e, Event::Seen(_))));

    // A server without extensions sends all-zero READY: our clients then behave as v1.
    let mut w = World::new(ServerConfig {
        extensions: false,
        ..ServerConfig::default()
    });
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert!(w.hosts[b]
        .events
        .contains(&Event::Ready { extended: false }));
}

#[test]
fn many_rooms_pair_at_once() {
    let mut w = World::new(ServerConfig::default());
    let idents = ["r0", "r1", "r2", "r3", "r4"];
    for (i, id) in idents.iter().enumerate() {
        for side in 0..2u8 {
            let mut c = client(30000 + 100 * side as u16);
            c.ident = Ident::new(id).unwrap();
            w.add_client([10, side, 0, i as u8 + 1], c);
        }
    }
    assert!(w.run_until(Duration::from_secs(5), |w| (0..w.hosts.len())
        .all(|h| w.won(h).is_some())));
    for i in 0..idents.len() {
        let (a, b) = (2 * i, 2 * i + 1);
        assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
        assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
    }
}

#[test]
fn silent_connection_is_released_after_the_hello_deadline_while_another_pair_completes() {
    let mut w = World::new(ServerConfig::default());
    let silent = w.raw_connect(SocketAddr::from(([192, 0, 2, 99], 5555)));
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert!(!w.raw[&silent].closed, "not yet: the deadline is 10 s");
    assert!(
        w.run_until(Duration::from_secs(5), |w| w.server.stats().connections
            == 1)
    );

    assert!(w.run_until(Duration::from_secs(11), |w| w.raw[&silent].closed));
    assert!(w.server_events.contains(&ServerEvent::Rejected {
        remote: SocketAddr::from(([192, 0, 2, 99], 5555)),
        reason: RejectReason::HelloTimeout,
    }));
    assert_eq!(w.server.stats().connections, 0);
}

#[test]
fn garbage_datagrams_during_pairing_do_not_abort_it() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], v1_client(30000));
    let b = w.add_client([203, 0, 113, 12], v1_client(31000));
    // Run until both are seated, then spray garbage and near-miss messages at the UDP port.
    assert!(w.run_until(Duration::from_secs(5), |w| w.server.stats().pairing == 1));
    let attacker = SocketAddr::from(([192, 0, 2, 66], 4444));
    w.datagram_to_server(attacker, b"garbage!");
    w.datagram_to_server(attacker, &[0x03]);
    w.datagram_to_server(attacker, &Message::Exchange(Ident::default()).to_bytes());
    let forged = Message::ExchangeToken {
        token: Token(7),
        round: 1,
        hint: Hint(5),
    };
    w.datagram_to_server(attacker, &forged.to_bytes());
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
    assert!(w.server.stats().ignored_datagrams >= 4);
}

#[test]
fn garbage_connection_is_closed_alone() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let junk = w.raw_connect(SocketAddr::from(([192, 0, 2, 66], 80)));
    w.raw_send(junk, b"GET / HTTP/1.1\r\n\r\n");
    w.run_for(Duration::from_millis(200));
    assert!(w.raw[&junk].closed);
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
}

#[test]
fn a_third_client_with_the_same_ident_waits_for_a_fourth_instead_of_breaking_the_pair() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([10, 0, 0, 1], client(30000));
    let b = w.add_client([10, 0, 0, 2], client(30000));
    w.run_for(Duration::from_millis(60)); // a and b are paired first
    let c = w.add_client([10, 0, 0, 3], client(30000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert!(w.peer_info(c).is_empty(), "c waits alone");
    assert_eq!(w.server.stats().waiting, 1);

    let d = w.add_client([10, 0, 0, 4], client(30000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, c, d)));
    assert_eq!(w.peer_info(c), vec![w.exchange_addr(d)]);
    assert_eq!(w.peer_info(d), vec![w.exchange_addr(c)]);
}

#[test]
fn wrong_identifier_is_refused_in_single_identifier_mode() {
    let mut w = World::new(ServerConfig {
        only_ident: Some(Ident::new("room").unwrap()),
        ..ServerConfig::default()
    });
    let stranger = w.raw_connect(SocketAddr::from(([192, 0, 2, 50], 999)));
    w.raw_send(stranger, &Message::Hello(Ident::default()).to_bytes());
    let allowed = w.raw_connect(SocketAddr::from(([192, 0, 2, 51], 999)));
    w.raw_send(
        allowed,
        &Message::Hello(Ident::new("room").unwrap()).to_bytes(),
    );
    w.run_for(Duration::from_millis(200));
    assert!(w.raw[&stranger].closed);
    assert!(!w.raw[&allowed].closed);
    assert!(w.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Rejected {
            reason: RejectReason::WrongIdent,
            ..
        }
    )));
}

#[test]
fn clients_behind_one_public_ip_get_each_others_address() {
    // Ours use the token, so attribution is exact whatever order the EXCHANGEs arrive in.
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([198, 51, 100, 3], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
}

#[test]
fn two_v1_clients_behind_one_ip_are_told_apart_by_distinct_source_addresses() {
    // v1 clients send three EXCHANGEs each; repeats from an attributed address are ignored, so
    // the second client's EXCHANGE is not swallowed by the first's repeats.
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], v1_client(30000));
    let b = w.add_client([198, 51, 100, 3], v1_client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
}

#[test]
fn a_partner_leaving_before_peerinfo_closes_the_other_instead_of_hanging_it() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let hello = Message::Hello(Ident::default()).to_bytes();
    let quitter = w.raw_connect(SocketAddr::from(([203, 0, 113, 12], 40000)));
    w.raw_send(quitter, &hello);
    assert!(w.run_until(Duration::from_secs(1), |w| w.server.stats().pairing == 1));
    w.raw_close(quitter);
    assert!(
        w.run_until(Duration::from_secs(1), |w| w.hosts[a].events.iter().any(
            |e| matches!(
                e,
                Event::Lose {
                    reason: LoseReason::ServerClosed,
                    ..
                }
            )
        ))
    );
    // The pair is gone; at most `a`'s retry connection is open.
    assert!(w.server.stats().connections <= 1);
    assert_eq!(w.server.stats().pairing, 0);
}

#[test]
fn per_ip_and_total_connection_limits_refuse_the_excess() {
    let mut w = World::new(ServerConfig {
        max_per_ip: 2,
        max_connections: 3,
        ..ServerConfig::default()
    });
    let same_ip: Vec<_> = (0..3)
        .map(|p| w.raw_connect(SocketAddr::from(([192, 0, 2, 7], 1000 + p))))
        .collect();
    let other = w.raw_connect(SocketAddr::from(([192, 0, 2, 8], 1000)));
    let over = w.raw_connect(SocketAddr::from(([192, 0, 2, 9], 1000)));
    w.run_for(Duration::from_millis(100));
    let closed: Vec<bool> = same_ip.iter().map(|c| w.raw[c].closed).collect();
    assert_eq!(closed, vec![false, false, true]);
    assert!(!w.raw[&other].closed);
    assert!(w.raw[&over].closed);
    assert_eq!(w.server.stats().connections, 3);
}

#[test]
fn an_unreachable_target_port_is_reported_not_sent() {
    // The peer's observed port is 65530: 65530 + 20 is not a port.
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let mut high = v1_client(65530);
    high.port_count = 6;
    let _b = w.add_client([203, 0, 113, 12], high);
    assert!(
        w.run_until(Duration::from_secs(2), |w| w.hosts[a].events.iter().any(
            |e| matches!(
                e,
                Event::Lose {
                    reason: LoseReason::TargetOutOfRange,
                    ..
                }
            )
        ))
    );
    let peer = SocketAddrV4::new([203, 0, 113, 12].into(), 65530);
    assert!(w.hosts[a]
        .events
        .contains(&Event::PeerInfo { peer, target: None }));
}

#[test]
fn lost_rounds_shift_the_window_and_max_rounds_gives_up() {
    // A partner that never punches: a raw v1 client that says HELLO and EXCHANGE only.
    let mut w = World::new(ServerConfig::default());
    let mut cfg = client(30000);
    cfg.max_rounds = Some(2);
    cfg.round_timeout = Duration::from_secs(1);
    let a = w.add_client([198, 51, 100, 3], cfg);
    let hello = Message::Hello(Ident::default()).to_bytes();
    let mute_partner = |w: &mut World, port: u16| {
        let conn = w.raw_connect(SocketAddr::from(([203, 0, 113, 12], port)));
        w.raw_send(conn, &hello);
        assert!(w.run_until(Duration::from_secs(2), |w| w.raw[&conn].received.len() >= 8));
        let from = SocketAddr::from(([203, 0, 113, 12], port));
        w.datagram_to_server(from, &Message::Exchange(Ident::default()).to_bytes());
    };
    mute_partner(&mut w, 5000);
    assert!(w.run_until(Duration::from_secs(3), |w| w.hosts[a].client.round() == 2));
    // The predicting client opens 64 window slots; the next window follows them.
    assert_eq!(w.hosts[a].window[0], 30064);
    mute_partner(&mut w, 5001);
    assert!(w.run_until(Duration::from_secs(3), |w| w.hosts[a].client.is_finished()));
    assert_eq!(w.hosts[a].events.last(), Some(&Event::GaveUp { rounds: 2 }));
}

#[test]
fn server_deadlines_and_polls_never_go_backwards() {
    // poll_timeout must be the earliest pending deadline and handle_timeout must clear it.
    let t0 = Instant::now();
    let mut s = Server::new(ServerConfig::default());
    s.handle_connection_opened(t0, ConnId(1), SocketAddr::from(([1, 2, 3, 4], 5)));
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    s.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(
        s.poll_output(),
        Some(ServerOutput::Close { conn: ConnId(1) })
    );
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn invalid_client_configs_are_refused() {
    let now = Instant::now();
    let cfg = |f: fn(&mut ClientConfig)| {
        let mut c = ClientConfig::default();
        f(&mut c);
        Client::new(c, now).err()
    };
    assert_eq!(cfg(|c| c.port_count = 0), Some(ConfigError::ZeroCount));
    assert!(matches!(
        cfg(|c| c.port_start = 65530),
        Some(ConfigError::WindowTooHigh { .. })
    ));
    assert_eq!(
        cfg(|c| c.peer_port_offset = 70000),
        Some(ConfigError::Offset(70000))
    );
    assert_eq!(cfg(|_| {}), None);
}

#[test]
fn ours_re_aim_inside_the_round_and_session_when_an_attempt_is_lost() {
    let mut w = World::new(ServerConfig::default());
    // Every punch of the first attempt is lost.
    w.drop_peer_traffic_until = Some(w.now + Duration::from_millis(400));
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    for h in [a, b] {
        let events = &w.hosts[h].events;
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::ReAimed {
                    round: 1,
                    attempt: 2
                }
            )),
            "{events:?}"
        );
        // Still round 1: no LOSE, no second round, the WIN names round 1.
        assert!(!events.iter().any(|e| matches!(
            e,
            Event::Lose { .. } | Event::RoundStarted { round: 2.., .. }
        )));
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Win { round: 1, .. })));
    }
    // One TCP session: one pairing, several completed rounds, and well under v1's 10 s.
    let paired = w
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::Paired { .. }))
        .count();
    assert_eq!(paired, 1);
    assert!(w
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::Completed { round: 2.., .. })));
    assert!(w.elapsed() < Duration::from_secs(2), "{:?}", w.elapsed());
    assert!(matches!(
        w.hosts[a]
            .events
            .iter()
            .find(|e| matches!(e, Event::Win { .. })),
        Some(Event::Win {
            strategy: Strategy::Predict,
            ..
        })
    ));
}

#[test]
fn a_v1_client_never_receives_extension_messages() {
    // A hand-made v1 client next to one of ours that gives a hint.
    let mut w = World::new(ServerConfig::default());
    let ours = w.add_client([198, 51, 100, 3], client(30000));
    let v1_tcp = SocketAddr::from(([203, 0, 113, 12], 40000));
    let v1 = w.raw_connect(v1_tcp);
    w.raw_send(v1, &Message::Hello(Ident::default()).to_bytes());
    assert!(w.run_until(Duration::from_secs(1), |w| w.raw[&v1].received.len() >= 8));
    let v1_udp = SocketAddr::from(([203, 0, 113, 12], 5000));
    for _ in 0..3 {
        w.datagram_to_server(v1_udp, &Message::Exchange(Ident::default()).to_bytes());
    }
    assert!(w.run_until(Duration::from_secs(2), |w| w.raw[&v1].closed));
    let got: Vec<Message> = w.raw[&v1]
        .received
        .chunks(8)
        .map(|c| Message::decode(c).unwrap())
        .collect();
    assert!(matches!(got[0], Message::Ready(Some(_))), "{got:?}");
    assert_eq!(got.len(), 2, "only READY and PEERINFO: {got:?}");
    assert_eq!(got[1], Message::PeerInfo(w.exchange_addr(ours)));
    // Ours learns the v1 peer's address and gets no hint from it.
    assert_eq!(
        w.peer_info(ours),
        vec!["203.0.113.12:5000".parse::<SocketAddrV4>().unwrap()]
    );
    assert!(!w.hosts[ours]
        .events
        .iter()
        .any(|e| matches!(e, Event::PeerHint(_))));
}

#[test]
fn probes_are_answered_with_the_address_they_came_from() {
    let t0 = Instant::now();
    let mut s = Server::new(ServerConfig::default());
    let from = SocketAddr::from(([198, 51, 100, 3], 1801));
    let seen = Message::Seen("198.51.100.3:1801".parse().unwrap());
    s.handle_datagram(t0, Local::Probe, from, &Message::Probe.to_bytes());
    assert_eq!(
        s.poll_output(),
        Some(ServerOutput::Datagram {
            from: Local::Probe,
            to: from,
            message: seen,
        })
    );
    // A PROBE-OTHER is answered from the other socket, whichever it came in on.
    for local in [Local::Main, Local::Probe] {
        s.handle_datagram(t0, local, from, &Message::ProbeOther.to_bytes());
        assert_eq!(
            s.poll_output(),
            Some(ServerOutput::Datagram {
                from: local.other(),
                to: from,
                message: seen,
            })
        );
    }
    // The probe socket takes nothing but probes.
    let exchange = Message::Exchange("n4n4n4".parse().unwrap()).to_bytes();
    s.handle_datagram(t0, Local::Probe, from, &exchange);
    assert_eq!(s.poll_output(), None);
    assert_eq!(s.stats().ignored_datagrams, 1);
    s.handle_datagram(t0, Local::Main, from, &Message::Probe.to_bytes());
    assert!(matches!(
        s.poll_output(),
        Some(ServerOutput::Datagram {
            from: Local::Main,
            ..
        })
    ));
    assert_eq!(s.stats().probes, 4);
    assert_eq!(s.stats().connections, 0, "probes leave no state");
}

#[test]
fn predicting_clients_learn_their_nat_from_probes_before_exchange() {
    let mut w = World::new(ServerConfig::default());
    let a = w.add_client([198, 51, 100, 3], client(30000));
    let b = w.add_client([203, 0, 113, 12], client(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    // The harness hands out ephemeral ports one by one: a quiet sequential NAT, step 1.
    let planned = w.hosts[a].events.iter().find_map(|e| match e {
        Event::Planned {
            step, rate, rtt, ..
        } => Some((*step, *rate, *rtt)),
        _ => None,
    });
    // Probe replies take one RTT: 2 × 25 ms.
    assert_eq!(planned, Some((1, 0, Some(Duration::from_millis(50)))));
}

#[test]
fn while_its_partner_is_late_ours_refreshes_its_exchange_so_the_partner_aims_at_a_fresh_port() {
    let mut w = World::new(ServerConfig::default());
    let ours = w.add_client([198, 51, 100, 3], client(30000));
    // A v1 partner that says HELLO at once but sends its EXCHANGE only 300 ms after READY.
    let late = w.raw_connect(SocketAddr::from(([203, 0, 113, 12], 40000)));
    w.raw_send(late, &Message::Hello(Ident::default()).to_bytes());
    assert!(w.run_until(Duration::from_secs(1), |w| w.raw[&late].received.len() >= 8));
    w.run_for(Duration::from_millis(300));
    let from = SocketAddr::from(([203, 0, 113, 12], 5000));
    w.datagram_to_server(from, &Message::Exchange(Ident::default()).to_bytes());
    assert!(
        w.run_until(Duration::from_secs(1), |w| w.raw[&late].received.len()
            >= 16)
    );
    let told = Message::decode(&w.raw[&late].received[8..16]).unwrap();
    // Slot 0 sent the first EXCHANGE; the partner was told about a later, fresher socket.
    let Message::PeerInfo(addr) = told else {
        panic!("{told:?}");
    };
    assert!(addr.port() > 30000 && addr.port() <= 30003, "{addr}");
    let plans = w.hosts[ours]
        .events
        .iter()
        .filter(|e| matches!(e, Event::Planned { .. }))
        .count();
    assert!(
        (2..=4).contains(&plans),
        "first EXCHANGE and up to 3 refreshes: {plans}"
    );
}

#[test]
fn ready_before_the_probe_answers_waits_for_them_to_give_a_hint() {
    // A partner already waiting and a short RTT: READY arrives before our probes come back.
    let t0 = Instant::now();
    let mut c = Client::new(client(30000), t0).unwrap();
    let probe_server = SocketAddr::from(c.config().probe_server());
    while c.poll_command().is_some() {}
    assert_eq!(c.poll_timeout(), Some(t0), "probing starts at once");
    c.handle_timeout(t0);
    let mut probes = Vec::new();
    while let Some(t) = c.poll_transmit() {
        probes.push(t.slot);
    }
    // Window slot 0 asks too (does the NAT keep ports?); the probe slots' first two go back
    // to back.
    assert_eq!(probes.first(), Some(&0));
    let probes: Vec<usize> = probes.into_iter().filter(|&s| s != 0).collect();
    assert_eq!(probes.len(), 2, "the first two probes go back to back");
    let t1 = t0 + Duration::from_millis(2);
    c.handle_connection_opened(t1);
    c.handle_stream_data(t1, &Message::Ready(Some(Token(9))).to_bytes());
    while c.poll_command().is_some() {}
    assert_eq!(c.poll_transmit(), None, "no EXCHANGE without a plan yet");
    // The answers arrive: sequential ports, so the EXCHANGE leaves at once, with a hint.
    let t2 = t0 + Duration::from_millis(3);
    for (slot, port) in probes.iter().zip([20000u16, 20001]) {
        let seen = Message::Seen(SocketAddrV4::new([198, 51, 100, 3].into(), port));
        c.handle_datagram(t2, *slot, probe_server, &seen.to_bytes());
    }
    let exchange = c.poll_transmit().expect("the EXCHANGE");
    let Ok(Message::ExchangeToken { hint, .. }) = Message::decode(&exchange.payload) else {
        panic!("{exchange:?}");
    };
    assert!(hint.0 > 0, "{hint:?}");
}

#[test]
fn a_retry_round_without_a_partner_is_lost_instead_of_waiting_forever() {
    let mut w = World::new(ServerConfig::default());
    let mut cfg = client(30000);
    cfg.max_rounds = Some(2);
    cfg.round_timeout = Duration::from_secs(1);
    let a = w.add_client([198, 51, 100, 3], cfg);
    // A partner that plays one round (HELLO, EXCHANGE) and never comes back.
    let partner = w.raw_connect(SocketAddr::from(([203, 0, 113, 12], 40000)));
    w.raw_send(partner, &Message::Hello(Ident::default()).to_bytes());
    assert!(
        w.run_until(Duration::from_secs(1), |w| w.raw[&partner].received.len()
            >= 8)
    );
    let from = SocketAddr::from(([203, 0, 113, 12], 5000));
    w.datagram_to_server(from, &Message::Exchange(Ident::default()).to_bytes());
    assert!(w.run_until(Duration::from_secs(10), |w| w.hosts[a].client.is_finished()));
    assert!(w.hosts[a].events.iter().any(|e| matches!(
        e,
        Event::Lose {
            round: 2,
            reason: LoseReason::NoPartner
        }
    )));
    assert_eq!(w.hosts[a].events.last(), Some(&Event::GaveUp { rounds: 2 }));
}

#[test]
fn durations_too_long_for_the_clock_mean_practically_forever_not_a_panic() {
    let mut w = World::new(ServerConfig {
        hello_timeout: Duration::MAX,
        wait_timeout: Some(Duration::MAX),
        exchange_timeout: Duration::MAX,
        session_timeout: Duration::MAX,
        ..ServerConfig::default()
    });
    let mut cfg = client(30000);
    cfg.round_timeout = Duration::MAX;
    cfg.ack_interval = Duration::MAX;
    let a = w.add_client([198, 51, 100, 3], cfg.clone());
    cfg.port_start = 31000;
    let b = w.add_client([203, 0, 113, 12], cfg);
    let silent = w.raw_connect(SocketAddr::from(([192, 0, 2, 99], 5555)));
    assert!(w.run_until(Duration::from_secs(5), |w| both_won(w, a, b)));
    w.run_for(Duration::from_secs(60));
    assert!(
        !w.raw[&silent].closed,
        "a silent connection waits 'forever'"
    );
}

#[test]
fn against_a_v1_server_ours_sweep_the_offset_round_by_round_while_v1_keeps_it() {
    // A v1 server and a partner that never punches: every round is lost; watch the aim.
    let mut w = World::new(ServerConfig {
        extensions: false,
        ..ServerConfig::default()
    });
    let targets = |w: &mut World, cfg: ClientConfig| {
        let mut cfg = cfg;
        cfg.max_rounds = Some(5);
        cfg.round_timeout = Duration::from_millis(300);
        let a = w.add_client([198, 51, 100, 3], cfg);
        for round in 0..5u16 {
            let conn = w.raw_connect(SocketAddr::from(([203, 0, 113, 12], 40000 + round)));
            w.raw_send(conn, &Message::Hello(Ident::default()).to_bytes());
            assert!(w.run_until(Duration::from_secs(3), |w| w.raw[&conn].received.len() >= 8));
            let from = SocketAddr::from(([203, 0, 113, 12], 5000));
            w.datagram_to_server(from, &Message::Exchange(Ident::default()).to_bytes());
            let lost = |w: &World| {
                w.hosts[a]
                    .events
                    .iter()
                    .filter(|e| matches!(e, Event::Lose { .. }))
                    .count()
            };
            let before = lost(w);
            assert!(w.run_until(Duration::from_secs(3), |w| lost(w) > before));
        }
        w.hosts[a]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::PeerInfo {
                    target: Some(t), ..
                } => Some(t.port() - 5000),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(targets(&mut w, client(30000)), vec![20, 45, 70, 95, 20]);
    assert_eq!(targets(&mut w, v1_client(40000)), vec![20, 20, 20, 20, 20]);
}

/// Behind one hairpinning NAT both clients share its public IP, and one's PUNCH can come back
/// to itself through its own mapping. A keyless client must not take its own datagrams for the
/// peer's: its reflected ACK carries its own side and proves nothing.
#[test]
fn a_keyless_client_never_wins_on_its_own_reflected_datagrams() {
    let now = Instant::now();
    let config = ClientConfig {
        server: util::SERVER,
        probes: 0,
        ..ClientConfig::default()
    };
    let mut c = Client::new(config, now).unwrap();
    while c.poll_command().is_some() {}
    c.handle_connection_opened(now);
    // We are 198.51.100.3:20014, the peer behind the same NAT 198.51.100.3:20015: we lead.
    let me: SocketAddrV4 = "198.51.100.3:20014".parse().unwrap();
    let peer: SocketAddrV4 = "198.51.100.3:20015".parse().unwrap();
    let mut said = Vec::new();
    for m in [
        Message::Ready(Some(Token(7))),
        Message::Seen(me),
        Message::Hint(Hint(5)),
        Message::PeerInfo(peer),
    ] {
        said.extend_from_slice(&m.to_bytes());
    }
    c.handle_stream_data(now, &said);
    while c.poll_command().is_some() {}
    let punch = std::iter::from_fn(|| c.poll_transmit())
        .find(|t| t.destination.ip() == *peer.ip())
        .expect("punches");
    // Our own PUNCH comes back on slot 3 from one of our own mappings: we ACK it (a PUNCH
    // says no side) …
    let reflected_from = SocketAddr::from(([198, 51, 100, 3], 20030));
    c.handle_datagram(now, 3, reflected_from, &punch.payload);
    let ack = std::iter::from_fn(|| c.poll_transmit())
        .find(|t| t.payload[0] == 0x0a)
        .expect("an ACK for the PUNCH");
    assert_eq!(
        Message::decode(&ack.payload),
        Ok(Message::Ack(Ident::default(), Side::Leader))
    );
    // … and the ACK comes back too: ours, so no proof, no WIN.
    c.handle_datagram(now, 3, reflected_from, &ack.payload);
    let later = now + Duration::from_secs(1);
    c.handle_timeout(later);
    assert!(
        !std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::Win { .. })),
        "won on its own reflection"
    );
    // The peer's ACK (the other side) on that pair is the proof.
    let theirs = Message::Ack(Ident::default(), Side::Other).to_bytes();
    c.handle_datagram(later, 3, reflected_from, &theirs);
    assert!(std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::Win { .. })));
}

/// Two clients behind one IP with one identifier: ours seated first, a v1 client second. The
/// v1 client's EXCHANGE arrives first and goes by arrival order to our seat; our token
/// EXCHANGE then shows whose it was, and each is told the other's address. (Before, our seat
/// kept both and the v1 client was closed without a PEERINFO.)
#[test]
fn a_v1_exchange_given_to_our_seat_moves_to_the_v1_seat_when_our_token_exchange_comes() {
    let t0 = Instant::now();
    let mut s = Server::new(ServerConfig::default());
    let ip = [127, 0, 0, 1];
    let (ours, v1) = (ConnId(1), ConnId(2));
    s.handle_connection_opened(t0, ours, SocketAddr::from((ip, 40001)));
    s.handle_connection_opened(t0, v1, SocketAddr::from((ip, 40002)));
    let hello = Message::Hello(Ident::default()).to_bytes();
    s.handle_stream_data(t0, ours, &hello);
    s.handle_stream_data(t0, v1, &hello);
    let mut token = None;
    while let Some(out) = s.poll_output() {
        if let ServerOutput::Send {
            conn,
            message: Frame::Short(Message::Ready(Some(t))),
        } = out
        {
            if conn == ours {
                token = Some(t);
            }
        }
    }
    let token = token.expect("READY with a token");
    let v1_udp = SocketAddrV4::new(ip.into(), 5000);
    let ours_udp = SocketAddrV4::new(ip.into(), 6000);
    let plain = Message::Exchange(Ident::default()).to_bytes();
    s.handle_datagram(t0, Local::Main, v1_udp.into(), &plain);
    let ext = Message::ExchangeToken {
        token,
        round: 1,
        hint: Hint(20),
    };
    s.handle_datagram(t0, Local::Main, ours_udp.into(), &ext.to_bytes());
    let mut told = Vec::new();
    while let Some(out) = s.poll_output() {
        if let ServerOutput::Send {
            conn,
            message: Frame::Short(Message::PeerInfo(p)),
        } = out
        {
            told.push((conn, p));
        }
    }
    told.sort_by_key(|(c, _)| c.0);
    assert_eq!(told, vec![(ours, v1_udp), (v1, ours_udp)]);
}
