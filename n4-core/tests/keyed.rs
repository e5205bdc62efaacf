//! Keyed sessions, attacked: the squatter, the on-path squatter that knows the room, injected
//! punches, a replayed handshake — and the confirmed WIN both sides agree on.

mod util;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use n4_core::*;
use util::{World, SERVER};

fn key() -> Key {
    Key::new(b"correct horse battery staple").unwrap()
}

fn keyed(start: u16) -> ClientConfig {
    ClientConfig {
        port_start: start,
        key: Some(key()),
        rng_seed: [start as u8; 32],
        ..ClientConfig::default()
    }
}

/// The frames a raw connection received.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut d = FrameDecoder::default();
    let mut input = bytes;
    let mut out = Vec::new();
    while let Some(f) = d.next(&mut input) {
        out.push(f.expect("the server sends well-formed frames"));
    }
    out
}

fn saw(w: &World, host: usize, what: &Event) -> bool {
    w.hosts[host].events.contains(what)
}

#[test]
fn keyed_clients_pair_while_squatters_with_the_identifier_are_never_seated_with_them() {
    let mut w = World::new(ServerConfig::default());
    // First in the room, as the attack review did: a v1 HELLO with the identifier, and a
    // keyed HELLO guessing a room.
    let plain = w.raw_connect(SocketAddr::from(([192, 0, 2, 66], 5000)));
    w.raw_send(plain, &Message::Hello(Ident::default()).to_bytes());
    let guess = w.raw_connect(SocketAddr::from(([192, 0, 2, 67], 5000)));
    let hello = LongMessage::KeyedHello {
        room: Ident::default(),
        nonce: [1; 16],
        proof: [2; 16],
    };
    w.raw_send(guess, &hello.to_bytes());
    w.run_for(Duration::from_millis(100));

    let a = w.add_client([198, 51, 100, 3], keyed(30000));
    let b = w.add_client([203, 0, 113, 12], keyed(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| w.won(a).is_some()
        && w.won(b).is_some()));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
    assert_eq!(w.peer_info(b), vec![w.exchange_addr(a)]);
    for h in [a, b] {
        assert!(saw(&w, h, &Event::PeerAuthenticated));
    }
    // One pair of addresses, agreed: each side's local port and peer are the other's.
    w.assert_one_pair(a, b);
    // The squatters heard nothing: not seated with them, no address.
    for conn in [plain, guess] {
        assert_eq!(w.raw[&conn].received, Vec::<u8>::new());
    }
}

#[test]
fn a_squatter_that_knows_the_room_never_learns_the_address_nor_blocks_the_room() {
    let mut w = World::new(ServerConfig::default());
    // An on-path attacker saw the room tag go by; it waits there first.
    let room = key().room(Ident::default());
    let squatter = w.raw_connect(SocketAddr::from(([192, 0, 2, 66], 5000)));
    let hello = LongMessage::KeyedHello {
        room,
        nonce: [9; 16],
        proof: [0; 16],
    };
    w.raw_send(squatter, &hello.to_bytes());
    w.run_for(Duration::from_millis(100));

    let a = w.add_client([198, 51, 100, 3], keyed(30000));
    assert!(w.run_until(Duration::from_secs(2), |w| {
        frames(&w.raw[&squatter].received)
            .iter()
            .any(|f| matches!(f, Frame::Long(LongMessage::PeerNonce(_))))
    }));
    // It cannot make the MAC over both nonces; it claims success all the same.
    w.raw_send(squatter, &LongMessage::Auth([1; 16]).to_bytes());
    w.raw_send(squatter, &LongMessage::Verified.to_bytes());
    // Its EXCHANGE would complete the round were the server to trust it.
    let token = frames(&w.raw[&squatter].received)
        .iter()
        .find_map(|f| match f {
            Frame::Short(Message::Ready(Some(t))) => Some(*t),
            _ => None,
        })
        .expect("READY with a token");
    let exchange = Message::ExchangeToken {
        token,
        round: 1,
        hint: Hint::NONE,
    };
    w.datagram_to_server(
        SocketAddr::from(([192, 0, 2, 66], 5001)),
        &exchange.to_bytes(),
    );
    assert!(w.run_until(Duration::from_secs(2), |w| saw(
        w,
        a,
        &Event::PeerAuthFailed
    )));
    w.run_for(Duration::from_millis(200));
    let heard = frames(&w.raw[&squatter].received);
    assert!(
        !heard
            .iter()
            .any(|f| matches!(f, Frame::Short(Message::PeerInfo(_)))),
        "the squatter learned an address: {heard:?}"
    );
    assert!(
        w.peer_info(a).is_empty(),
        "a was told the squatter's address"
    );

    // The real partner comes: they pair at once.
    let b = w.add_client([203, 0, 113, 12], keyed(31000));
    assert!(w.run_until(Duration::from_secs(5), |w| w.won(a).is_some()
        && w.won(b).is_some()));
    assert_eq!(w.peer_info(a), vec![w.exchange_addr(b)]);
}

/// A keyed client driven by hand up to its punches, with the server's part played here.
struct Punching {
    client: Client,
    session: SessionKey,
    /// Our side's nonce is the lower one.
    low: bool,
    peer: SocketAddrV4,
    now: Instant,
}

fn keyed_client_punching(peer_nonce: Nonce, accept_any_ip: bool) -> Punching {
    let now = Instant::now();
    let config = ClientConfig {
        server: SERVER,
        accept_any_ip,
        ..keyed(30000)
    };
    let mut c = Client::new(config, now).unwrap();
    while c.poll_command().is_some() {}
    c.handle_connection_opened(now);
    let Some(Command::Send(Frame::Long(LongMessage::KeyedHello { room, nonce, .. }))) =
        c.poll_command()
    else {
        panic!("no keyed HELLO")
    };
    let k = key();
    assert_eq!(
        room,
        k.room(Ident::default()),
        "the server sees only the room"
    );
    let peer = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), 40000);
    let mut server_says = Vec::new();
    for m in [
        Frame::Short(Message::Ready(Some(Token(7)))),
        Frame::Long(LongMessage::PeerNonce(peer_nonce)),
        Frame::Long(LongMessage::Auth(k.auth(room, &peer_nonce, &nonce))),
        Frame::Short(Message::Seen("198.51.100.3:30000".parse().unwrap())),
        Frame::Short(Message::Hint(Hint::NONE)),
        Frame::Short(Message::PeerInfo(peer)),
    ] {
        server_says.extend_from_slice(&m.to_bytes());
    }
    c.handle_stream_data(now, &server_says);
    let mut sent = Vec::new();
    while let Some(cmd) = c.poll_command() {
        sent.push(cmd);
    }
    assert!(
        sent.contains(&Command::Send(LongMessage::Verified.into())),
        "{sent:?}"
    );
    let punches = std::iter::from_fn(|| c.poll_transmit())
        .filter(|t| t.destination.ip() == *peer.ip())
        .count();
    assert!(punches > 0, "no punches");
    while c.poll_event().is_some() {}
    Punching {
        client: c,
        session: k.session(room, &nonce, &peer_nonce),
        low: nonce < peer_nonce,
        peer,
        now,
    }
}

fn won(c: &mut Client) -> Option<(usize, SocketAddr)> {
    std::iter::from_fn(|| c.poll_event()).find_map(|e| match e {
        Event::Win { slot, peer, .. } => Some((slot, peer)),
        _ => None,
    })
}

#[test]
fn injected_punches_never_win_a_keyed_session_even_with_any_ip() {
    let mut p = keyed_client_punching([0xff; 16], true);
    let now = p.now;
    let peer = SocketAddr::from(p.peer);
    let other_port = SocketAddr::from((*p.peer.ip(), 40001));
    let elsewhere = SocketAddr::from(([192, 0, 2, 66], 40000));
    // What an injector can send: v1's PUNCH and our plain ACK/CONFIRM (the identifier is no
    // secret), keyed frames with made-up MACs, and the peer's genuine MACs of another session.
    let stale = key().session(Ident::default(), &[1; 16], &[2; 16]);
    let fakes: Vec<Payload> = vec![
        Message::Punch(Ident::default()).to_bytes().into(),
        Message::Ack(Ident::default(), Side::Leader)
            .to_bytes()
            .into(),
        Message::Ack(Ident::default(), Side::Other)
            .to_bytes()
            .into(),
        Message::Confirm(Ident::default(), Side::Leader)
            .to_bytes()
            .into(),
        Message::Confirm(Ident::default(), Side::Other)
            .to_bytes()
            .into(),
        LongMessage::Punch([0; 16]).to_bytes(),
        LongMessage::Ack([0; 16]).to_bytes(),
        LongMessage::Confirm([0; 16]).to_bytes(),
        LongMessage::Ack(stale.mac(Datagram::Ack, !p.low)).to_bytes(),
        LongMessage::Confirm(stale.mac(Datagram::Confirm, !p.low)).to_bytes(),
        // Our own datagrams reflected back are no answer either.
        LongMessage::Ack(p.session.mac(Datagram::Ack, p.low)).to_bytes(),
        LongMessage::Confirm(p.session.mac(Datagram::Confirm, p.low)).to_bytes(),
    ];
    for from in [peer, other_port, elsewhere] {
        for fake in &fakes {
            p.client.handle_datagram(now, 3, from, fake);
            assert_eq!(won(&mut p.client), None, "{fake:?} from {from} won");
        }
    }
    // The genuine one wins: an ACK if we lead, the leader's CONFIRM if we do not.
    let genuine = if p.low {
        LongMessage::Ack(p.session.mac(Datagram::Ack, !p.low))
    } else {
        LongMessage::Confirm(p.session.mac(Datagram::Confirm, !p.low))
    };
    p.client.handle_datagram(now, 3, peer, &genuine.to_bytes());
    assert_eq!(won(&mut p.client), Some((3, peer)));
}

#[test]
fn a_genuine_punch_from_the_peer_is_acknowledged_with_a_mac() {
    let mut p = keyed_client_punching([0x00; 16], false);
    let peer = SocketAddr::from(p.peer);
    let punch = LongMessage::Punch(p.session.mac(Datagram::Punch, !p.low));
    p.client.handle_datagram(p.now, 5, peer, &punch.to_bytes());
    let ack = p.client.poll_transmit().expect("an ACK");
    assert_eq!((ack.slot, ack.destination), (5, peer));
    assert_eq!(
        Frame::decode(&ack.payload),
        Ok(Frame::Long(LongMessage::Ack(
            p.session.mac(Datagram::Ack, p.low)
        )))
    );
}

#[test]
fn a_replayed_handshake_fails() {
    let now = Instant::now();
    let k = key();
    let room = k.room(Ident::default());
    // An Auth MAC recorded from an earlier handshake (other nonces), replayed into this one.
    let recorded = k.auth(room, &[5; 16], &[6; 16]);
    let mut c = Client::new(
        ClientConfig {
            server: SERVER,
            ..keyed(30000)
        },
        now,
    )
    .unwrap();
    while c.poll_command().is_some() {}
    c.handle_connection_opened(now);
    while c.poll_command().is_some() {}
    let mut says = Message::Ready(Some(Token(7))).to_bytes().to_vec();
    says.extend_from_slice(&LongMessage::PeerNonce([5; 16]).to_bytes());
    says.extend_from_slice(&LongMessage::Auth(recorded).to_bytes());
    c.handle_stream_data(now, &says);
    let commands: Vec<Command> = std::iter::from_fn(|| c.poll_command()).collect();
    assert!(commands.contains(&Command::Send(LongMessage::AuthFailed.into())));
    assert!(!commands.contains(&Command::Send(LongMessage::Verified.into())));
    let events: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
    assert!(events.contains(&Event::PeerAuthFailed), "{events:?}");
}

#[test]
fn a_private_server_refuses_a_wrong_key_and_a_missing_one() {
    let mut w = World::new(ServerConfig {
        key: Some(key()),
        ..ServerConfig::default()
    });
    let wrong = w.add_client(
        [198, 51, 100, 3],
        ClientConfig {
            key: Some(Key::new(b"another key").unwrap()),
            ..keyed(30000)
        },
    );
    let none = w.add_client(
        [203, 0, 113, 12],
        ClientConfig {
            key: None,
            ..keyed(31000)
        },
    );
    assert!(w.run_until(Duration::from_secs(2), |w| {
        w.hosts[wrong].client.is_finished() && w.hosts[none].client.is_finished()
    }));
    assert!(saw(&w, wrong, &Event::Refused(RefuseReason::WrongKey)));
    assert!(saw(&w, none, &Event::Refused(RefuseReason::KeyRequired)));
    // Holders of the key are served.
    let a = w.add_client([198, 51, 100, 4], keyed(32000));
    let b = w.add_client([203, 0, 113, 13], keyed(33000));
    assert!(w.run_until(Duration::from_secs(5), |w| w.won(a).is_some()
        && w.won(b).is_some()));
}

#[test]
fn a_plain_exchange_from_a_seats_ip_cannot_claim_a_keyed_seat() {
    // A neighbour behind the same NAT (or a spoofer) knows the room tag and sends a v1
    // EXCHANGE from the victim's public IP before the victim's own token EXCHANGE.
    let now = Instant::now();
    let mut s = Server::new(ServerConfig::default());
    let room = key().room(Ident::default());
    let (a, b) = (ConnId(1), ConnId(2));
    let ip_a = std::net::Ipv4Addr::new(198, 51, 100, 3);
    s.handle_connection_opened(now, a, SocketAddr::from((ip_a, 4000)));
    s.handle_connection_opened(now, b, SocketAddr::from(([203, 0, 113, 12], 4000)));
    for (conn, nonce) in [(a, [1u8; 16]), (b, [2u8; 16])] {
        let hello = LongMessage::KeyedHello {
            room,
            nonce,
            proof: [0; 16],
        };
        s.handle_stream_data(now, conn, &hello.to_bytes());
    }
    while s.poll_output().is_some() {}
    s.handle_datagram(
        now,
        Local::Main,
        SocketAddr::from((ip_a, 6666)),
        &Message::Exchange(room).to_bytes(),
    );
    assert_eq!(
        s.stats().ignored_datagrams,
        1,
        "the plain EXCHANGE was taken"
    );
}

#[test]
fn the_other_side_takes_the_proven_pair_when_the_leaders_confirms_are_lost() {
    // Our nonce is the higher one: the peer leads. Its ACK proves a pair both ways; its three
    // CONFIRMs are lost, and it has left.
    let mut p = keyed_client_punching([0x00; 16], false);
    assert!(!p.low, "the test needs the peer to lead");
    let peer = SocketAddr::from(p.peer);
    let ack = LongMessage::Ack(p.session.mac(Datagram::Ack, !p.low));
    p.client.handle_datagram(p.now, 4, peer, &ack.to_bytes());
    assert_eq!(
        won(&mut p.client),
        None,
        "the follower waits for the CONFIRM first"
    );
    let mut now = p.now;
    let mut win = None;
    while let Some(at) = p
        .client
        .poll_timeout()
        .filter(|&t| t <= p.now + Duration::from_secs(1))
    {
        now = at;
        p.client.handle_timeout(now);
        win = won(&mut p.client);
        if win.is_some() {
            break;
        }
    }
    assert_eq!(win, Some((4, peer)));
    assert!(
        now - p.now >= Duration::from_millis(100),
        "{:?}",
        now - p.now
    );
}
