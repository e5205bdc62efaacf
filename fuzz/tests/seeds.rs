//! The committed seed corpora: each seed is a story written here as a typed input, encoded in
//! `arbitrary`'s format, decoded back, and run through its harness to check it reaches what it
//! is meant to reach (a pairing, a WIN…).
//!
//! `cargo test` (in `fuzz/`) checks that the files in `corpus/<target>/seed-*` match;
//! `N4_WRITE_SEEDS=1 cargo test` rewrites them.

use std::fs;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use n4_core::{Hint, Ident, Key, LongMessage, Message, RefuseReason, Token};
use n4_fuzz::seed::Encode;
use n4_fuzz::{client, codec, server};

fn seed_file(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let path = dir.join(format!("seed-{name}"));
    if std::env::var_os("N4_WRITE_SEEDS").is_some() {
        fs::create_dir_all(&dir).unwrap();
        fs::write(&path, bytes).unwrap();
    } else {
        let on_disk = fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (N4_WRITE_SEEDS=1 writes it)", path.display()));
        assert_eq!(on_disk, bytes, "{} is stale", path.display());
    }
}

/// Encodes `input`, checks `arbitrary` reads it back unchanged, and returns the bytes.
fn encode<T>(input: &T) -> Vec<u8>
where
    T: Encode + for<'a> Arbitrary<'a> + PartialEq + std::fmt::Debug,
{
    let bytes = input.to_seed();
    let decoded = T::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
    assert_eq!(&decoded, input, "the seed does not decode to its story");
    bytes
}

#[test]
fn codec_seeds() {
    let id = Ident::default();
    let addr = "203.0.113.12:5793".parse().unwrap();
    let messages = [
        ("hello", Message::Hello(id)),
        ("ready-v1", Message::Ready(None)),
        ("ready-token", Message::Ready(Some(Token(0x0102_0304)))),
        ("exchange", Message::Exchange(id)),
        (
            "exchange-token",
            Message::ExchangeToken {
                token: Token(0xdead_beef),
                round: 2,
                hint: Hint(-300),
            },
        ),
        ("probe", Message::Probe),
        ("probe-other", Message::ProbeOther),
        ("hint", Message::Hint(Hint(45))),
        ("peerinfo", Message::PeerInfo(addr)),
        ("punch", Message::Punch(Ident::new("ab").unwrap())),
        ("seen", Message::Seen(addr)),
    ];
    let mut stream = vec![3u8]; // chunk pattern byte, then the stream
    for (name, m) in messages {
        let bytes = m.to_bytes();
        codec::run(&bytes);
        seed_file("codec", name, &bytes);
        stream.extend(bytes);
    }
    stream.extend(&[0x01, 0x00, b'n']); // a partial message at the end
    codec::run(&stream);
    seed_file("codec", "stream-all", &stream);
    let mut garbage = vec![11u8];
    garbage.extend(Message::Hello(id).to_bytes());
    garbage.extend(b"\x01\x07n4n4n4"); // bad reserved byte: the stream stops here
    garbage.extend(Message::Ready(None).to_bytes());
    codec::run(&garbage);
    seed_file("codec", "stream-garbage", &garbage);

    // Long frames (keyed sessions), alone and in a stream mixed with 8-byte messages.
    let key = Key::new(b"seed").unwrap();
    let room = key.room(id);
    let nonce = [7u8; 16];
    let longs = [
        (
            "keyed-hello",
            LongMessage::KeyedHello {
                room,
                nonce,
                proof: key.hello_proof(room, &nonce),
            },
        ),
        ("refused", LongMessage::Refused(RefuseReason::WrongKey)),
        ("peer-nonce", LongMessage::PeerNonce(nonce)),
        ("auth", LongMessage::Auth(key.auth(room, &nonce, &[8; 16]))),
        ("verified", LongMessage::Verified),
        ("auth-failed", LongMessage::AuthFailed),
        ("keyed-punch", LongMessage::Punch([9; 16])),
        ("keyed-ack", LongMessage::Ack([10; 16])),
        ("keyed-confirm", LongMessage::Confirm([11; 16])),
    ];
    let mut frames = vec![5u8];
    for (i, (name, m)) in longs.into_iter().enumerate() {
        let bytes = m.to_bytes();
        codec::run(&bytes);
        seed_file("codec", name, &bytes);
        frames.extend(&bytes[..]);
        frames.extend(messages[i].1.to_bytes());
    }
    frames.extend(&[0x13, 16, 1, 2]); // a partial AUTH at the end
    codec::run(&frames);
    seed_file("codec", "frames-mixed", &frames);
    let mut bad = vec![2u8];
    bad.extend(&LongMessage::Verified.to_bytes()[..]);
    bad.extend(&[0x13, 15]); // AUTH's header with another length: an error at once
    bad.extend(&LongMessage::AuthFailed.to_bytes()[..]);
    codec::run(&bad);
    seed_file("codec", "frames-garbage", &bad);
}

mod server_seeds {
    use super::*;
    use server::{
        Config, DatagramData, FrameChoice, IdentChoice, Input, Operation, StreamData, TokenChoice,
    };
    use Operation::*;

    const N4: IdentChoice = IdentChoice::Known(0);

    fn open(conn: u8, host: u8) -> Operation {
        Open {
            conn,
            host,
            port: 50000 + u16::from(conn),
        }
    }

    fn hello(conn: u8) -> Operation {
        Stream {
            conn,
            data: StreamData::Hello(N4),
        }
    }

    fn datagram(host: u8, port: u8, data: DatagramData) -> Operation {
        Datagram { host, port, data }
    }

    fn token(host: u8, port: u8, issued: u8, round: u8, hint: i16) -> Operation {
        let token = TokenChoice::Issued(issued);
        datagram(host, port, DatagramData::Token { token, round, hint })
    }

    fn write(name: &str, input: Input, check: impl FnOnce(&server::Outcome)) {
        let bytes = encode(&input);
        let outcome = server::run(&input);
        check(&outcome);
        seed_file("server", name, &bytes);
    }

    #[test]
    fn v1_pair() {
        let config = Config {
            only_ident: true,
            wait_timeout: false,
            extensions: false,
            rng_seed: 0,
            private: false,
        };
        let ops = vec![
            open(0, 0),
            open(1, 1),
            hello(0),
            hello(1),
            datagram(0, 0, DatagramData::Exchange(N4)),
            datagram(0, 0, DatagramData::Exchange(N4)), // v1 sends three; repeats are ignored
            datagram(1, 1, DatagramData::Exchange(N4)),
        ];
        write("v1-pair", Input { config, ops }, |o| {
            assert_eq!(
                (o.readies, o.peer_infos, o.seens, o.completed),
                (2, 2, 0, 1)
            );
        });
    }

    #[test]
    fn extended_pair_behind_one_ip() {
        let config = Config {
            only_ident: false,
            wait_timeout: true,
            extensions: true,
            rng_seed: 7,
            private: false,
        };
        // Host 3 is host 0 as a v4-mapped IPv6 address: one public IP, told apart by tokens.
        let ops = vec![
            open(0, 0),
            open(1, 3),
            hello(1),
            Stream {
                conn: 0,
                data: StreamData::SplitHello { ident: N4, at: 3 },
            },
            datagram(0, 0, DatagramData::Probe),
            datagram(1, 1, DatagramData::ProbeOther),
            // Tokens are handed out first-seated first: conn 1's, then conn 0's.
            token(3, 1, 0, 1, 7),
            token(0, 0, 1, 1, -3),
            datagram(0, 0, DatagramData::Exchange(N4)), // a v1 EXCHANGE: nobody's now
            // Both are ours: the pair stays open for a second round, then times out.
            token(0, 2, 1, 2, 0),
            token(3, 3, 0, 2, 5),
            token(3, 3, 0, 2, 5), // a repeat of round 2
            AdvanceToTimeout,
        ];
        write("ext-session-one-ip", Input { config, ops }, |o| {
            assert_eq!(
                (o.readies, o.peer_infos, o.seens, o.completed),
                (2, 4, 4, 1)
            );
            assert_eq!(o.server_closes, 2);
        });
    }

    #[test]
    fn deadlines() {
        let config = Config {
            only_ident: false,
            wait_timeout: true,
            extensions: true,
            rng_seed: 1,
            private: false,
        };
        let ops = vec![
            open(0, 0), // silent: hello timeout
            open(1, 1),
            hello(1), // alone: wait timeout
            open(2, 2),
            open(3, 2),
            Stream {
                conn: 2,
                data: StreamData::Hello(IdentChoice::Known(1)),
            },
            Stream {
                conn: 3,
                data: StreamData::Hello(IdentChoice::Known(1)),
            }, // a pair that never exchanges: exchange timeout
            AdvanceToTimeout,
            AdvanceToTimeout,
            AdvanceToTimeout,
            Advance { millis: 5000 },
        ];
        write("deadlines", Input { config, ops }, |o| {
            assert_eq!((o.readies, o.peer_infos, o.server_closes), (2, 0, 4));
        });
    }

    #[test]
    fn limits_and_garbage() {
        let config = Config {
            only_ident: true,
            wait_timeout: false,
            extensions: true,
            rng_seed: 2,
            private: false,
        };
        let ops = vec![
            open(0, 0),
            open(1, 3), // the same IP as host 0
            open(2, 0),
            open(3, 0), // refused: max_per_ip
            Stream {
                conn: 0,
                data: StreamData::Bytes8(*b"GET / HT"),
            },
            Stream {
                conn: 1,
                data: StreamData::Hello(IdentChoice::Known(1)), // not the allowed ident
            },
            hello(2),
            Stream {
                conn: 2,
                data: StreamData::Bytes8([1, 0, b'x', b'x', b'x', b'x', b'x', b'x']),
            },
            datagram(4, 0, DatagramData::Bytes8(*b"\x03\x01garbag")),
            Close { conn: 5 },
        ];
        write("limits-garbage", Input { config, ops }, |o| {
            assert_eq!((o.refused, o.readies, o.server_closes), (1, 0, 4));
        });
    }

    fn frame(conn: u8, f: FrameChoice) -> Operation {
        Stream {
            conn,
            data: StreamData::Frame(f),
        }
    }

    fn keyed_hello(conn: u8, nonce: u8, proof: bool) -> Operation {
        frame(
            conn,
            FrameChoice::KeyedHello {
                room: N4,
                nonce,
                proof,
            },
        )
    }

    #[test]
    fn keyed_pair_verifies_then_learns_addresses() {
        let config = Config {
            only_ident: false,
            wait_timeout: true,
            extensions: true,
            rng_seed: 3,
            private: false,
        };
        let ops = vec![
            open(0, 0),
            open(1, 1),
            open(2, 2),
            hello(2), // a plain HELLO with the room's 6 bytes: another room
            keyed_hello(0, 1, false),
            keyed_hello(1, 2, false), // the keyed pair: READY and PEER-NONCE each
            token(0, 0, 0, 1, 5),
            token(1, 1, 1, 1, 0), // both EXCHANGEs in: no PEERINFO before VERIFIED
            Stream {
                conn: 0,
                data: StreamData::Frames(FrameChoice::Auth(7), FrameChoice::Verified),
            },
            frame(1, FrameChoice::Auth(9)),
            Stream {
                conn: 1,
                data: StreamData::SplitFrame {
                    frame: FrameChoice::Verified,
                    at: 1,
                },
            }, // the last VERIFIED: HINT and PEERINFO to both
            AdvanceToTimeout,
        ];
        write("keyed-pair", Input { config, ops }, |o| {
            assert_eq!((o.readies, o.peer_nonces, o.auths_relayed), (2, 2, 2));
            assert_eq!((o.peer_infos, o.keyed_peer_infos, o.hints), (2, 2, 2));
            assert_eq!(o.completed, 1);
        });
    }

    #[test]
    fn keyed_auth_failed_and_greeting_garbage() {
        let config = Config {
            only_ident: false,
            wait_timeout: false,
            extensions: true,
            rng_seed: 4,
            private: false,
        };
        let ops = vec![
            open(0, 0),
            open(1, 1),
            open(2, 2),
            keyed_hello(0, 1, true),
            keyed_hello(1, 2, true),
            frame(0, FrameChoice::Auth(3)),
            frame(1, FrameChoice::AuthFailed), // ends the pair: both closed
            Stream {
                conn: 2,
                data: StreamData::Frames(
                    FrameChoice::KeyedHello {
                        room: N4,
                        nonce: 3,
                        proof: true,
                    },
                    FrameChoice::Verified,
                ), // more than a HELLO in the first read: garbage
            },
        ];
        write("keyed-auth-failed", Input { config, ops }, |o| {
            assert_eq!((o.readies, o.auths_relayed, o.auth_failures), (2, 1, 1));
            assert_eq!((o.peer_infos, o.server_closes), (0, 3));
        });
    }

    #[test]
    fn private_server_refuses_plain_and_wrong_keys() {
        let config = Config {
            only_ident: true,
            wait_timeout: false,
            extensions: false, // a private server speaks the extension anyway
            rng_seed: 5,
            private: true,
        };
        let ops = vec![
            open(0, 0),
            open(1, 1),
            open(2, 2),
            open(3, 1),
            hello(0),                 // REFUSED: key required
            keyed_hello(1, 1, false), // REFUSED: wrong key
            keyed_hello(2, 2, true),
            keyed_hello(3, 3, true),
        ];
        write("private", Input { config, ops }, |o| {
            assert_eq!((o.refusals, o.readies, o.peer_nonces), (2, 2, 2));
            assert_eq!(o.server_closes, 2);
        });
    }
}

mod client_seeds {
    use super::*;
    use client::{Config, DatagramData, Input, Operation, StreamData};
    use Operation::*;

    /// A v1 client with small numbers: 5 slots, 2 passes, 500 ms rounds, 3 acks.
    const BASE: Config = Config {
        port_start: 0, // 30000
        port_count: 5,
        offset: 0, // 20
        accept_any_ip: false,
        predict: false,
        max_rounds: 0,     // forever
        round_timeout: 50, // 500 ms
        punch_passes: 2,
        exchange_count: 3,
        ack_count: 3,
        ack_interval: 200,
        retry_delay: 10,
        probes: 3,
        probe_interval: 20,
        max_window: 8,
        rng_seed: 0,
    };

    /// The predicting client: 8 window slots and 3 probe slots.
    const PREDICT: Config = Config {
        predict: true,
        ..BASE
    };

    fn peer_info(port: u16) -> Operation {
        Stream(StreamData::PeerInfo { ip: 0, port })
    }

    fn punch(slot: u16, port: u16) -> Operation {
        Datagram {
            slot,
            host: 0,
            port,
            data: DatagramData::Punch,
        }
    }

    fn from_peer(slot: u16, port: u16, data: DatagramData) -> Operation {
        Datagram {
            slot,
            host: 0,
            port,
            data,
        }
    }

    fn write(name: &str, input: Input, check: impl FnOnce(&client::Outcome)) {
        let bytes = encode(&input);
        let outcome = client::run(&input);
        check(&outcome);
        seed_file("client", name, &bytes);
    }

    fn probe_reply(slot: u16, port: u16) -> Operation {
        Datagram {
            slot,
            host: 0,
            port: 0,
            data: DatagramData::ProbeReply { port },
        }
    }

    /// The predicting client's start: probes, their answers, TCP up, an extended READY, and
    /// SEEN naming our public address 198.51.100.3:40004, lower than the peer's (203.0.113.12):
    /// we lead the confirmation.
    fn predict_start() -> Vec<Operation> {
        predict_start_seen(1)
    }

    /// The same with SEEN naming `PEER_IPS[ip]`.
    fn predict_start_seen(ip: u8) -> Vec<Operation> {
        vec![
            AdvanceToTimeout, // the first two probes, back to back, from slots 8 and 9
            probe_reply(8, 40000),
            probe_reply(9, 40001),
            Connected,
            Advance { millis: 30 }, // the third probe
            probe_reply(10, 40003),
            Stream(StreamData::Ready(Some(0xdead_beef))),
            Stream(StreamData::Seen { ip, port: 40004 }),
        ]
    }

    #[test]
    fn predicted_win() {
        let mut ops = predict_start();
        ops.extend([
            Stream(StreamData::Hint(20)),
            peer_info(40000),
            punch(2, 40020), // the peer's PUNCH: we ACK it on that pair
            from_peer(2, 40020, DatagramData::Ack), // its ACK of ours: WIN, 3 CONFIRMs
            Advance { millis: 1000 },
        ]);
        write(
            "predict-win",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!(
                    (o.rounds, o.wins, o.predicted_wins, o.finished),
                    (1, 1, 1, true)
                );
                assert_eq!((o.confirmed_wins, o.led_wins, o.acks), (1, 1, 1));
                // Window slot 0 asked too; nobody answered it, so the plan is the predictor's.
                assert_eq!((o.slot0_probes, o.independent_plans), (1, 0));
            },
        );
    }

    /// Probe answers whose ports jump about: a random-port NAT. Window slot 0's answer names
    /// another port than its own (30000): the NAT does not keep ports either. SEEN names our
    /// public address 198.51.100.3:40004 (we lead against 203.0.113.12).
    fn random_nat_start() -> Vec<Operation> {
        vec![
            AdvanceToTimeout, // window slot 0's PROBE, then slots 8 and 9
            probe_reply(8, 40000),
            probe_reply(9, 12345),
            probe_reply(0, 51000), // slot 0's answer: not its port
            Connected,
            Advance { millis: 30 },
            probe_reply(10, 61000),
            Stream(StreamData::Ready(Some(0xdead_beef))), // planned: hint RANDOM
            Stream(StreamData::Seen { ip: 1, port: 40004 }),
        ]
    }

    #[test]
    fn birthday_hard_side_opens_256_mappings_and_wins_on_one() {
        let mut ops = random_nat_start();
        ops.extend([
            // The peer's NAT keeps ports: aim at its port exactly, and from 256 more slots.
            Stream(StreamData::HintSentinel(2)),
            peer_info(40000),
            // Its spray hits the mapping of extra slot 100 (slot 11 + 100): we ACK it there,
            // its ACK makes the WIN (we lead: 3 CONFIRMs on that pair).
            punch(111, 40000),
            from_peer(111, 40000, DatagramData::Ack),
            Advance { millis: 1000 },
        ]);
        write(
            "birthday-hard",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.birthday_hard, o.extra_slots_opened), (1, 256));
                assert_eq!((o.extra_slot_punches, o.extra_slot_wins), (256, 1));
                assert_eq!((o.wins, o.led_wins, o.acks, o.finished), (1, 1, 1, true));
            },
        );
    }

    #[test]
    fn birthday_easy_side_sprays_and_follows() {
        let ops = vec![
            AdvanceToTimeout,
            probe_reply(8, 40000),
            probe_reply(9, 40001),
            Datagram {
                slot: 0,
                host: 0,
                port: 0,
                data: DatagramData::PortKept, // slot 0 kept its port: hint INDEPENDENT
            },
            Connected,
            Advance { millis: 30 },
            probe_reply(10, 40003),
            Stream(StreamData::Ready(Some(0xdead_beef))),
            // Our EXCHANGE kept its port 30000; the peer's 203.0.113.12:20000 is lower: we
            // follow.
            Stream(StreamData::Seen { ip: 0, port: 30000 }),
            Stream(StreamData::HintSentinel(1)), // the peer's NAT gives random ports
            peer_info(20000),                    // the v1 aim at 20020, then the spray: 5 now
            AdvanceToTimeout,                    // the second pass
            AdvanceToTimeout,                    // 5 more
            AdvanceToTimeout,                    // 5 more
            // One of ours hit a mapping the peer opened towards us: its ACK comes from there
            // (we never got its PUNCH). We ACK back; the leader's CONFIRM makes the WIN.
            from_peer(0, 51234, DatagramData::Ack),
            from_peer(0, 51234, DatagramData::Confirm),
            Advance { millis: 1000 }, // the spray stopped at the WIN
        ];
        write(
            "birthday-easy",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.slot0_probes, o.independent_plans), (1, 1));
                assert_eq!((o.birthday_easy, o.sprayed), (1, 15));
                assert_eq!((o.follower_acks, o.acks), (1, 1));
                assert_eq!((o.wins, o.confirmed_wins, o.led_wins), (1, 1, 0));
                assert!(o.finished);
            },
        );
    }

    #[test]
    fn unlikely_pair_given_up_after_three_rounds() {
        let mut ops = random_nat_start();
        for port in 40000..40004 {
            // Both NATs give random ports: said once, tried 3 rounds, given up at the 4th.
            ops.extend([Stream(StreamData::HintSentinel(1)), peer_info(port)]);
            if port < 40003 {
                ops.extend([AdvanceToTimeout, AdvanceToTimeout]); // the second pass, LOSE
            }
        }
        write(
            "unlikely-give-up",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.rounds, o.in_session_rounds, o.losses), (4, 3, 3));
                assert_eq!((o.unlikely, o.wins), (1, 0));
                assert!(o.unlikely_gave_up && o.finished);
            },
        );
    }

    #[test]
    fn predicted_win_as_the_other_side() {
        // Our public address 203.0.113.12:40004 is above the peer's 203.0.113.12:40000.
        let mut ops = predict_start_seen(0);
        ops.extend([
            Stream(StreamData::Hint(20)),
            peer_info(40000),
            from_peer(3, 40021, DatagramData::AckWith(1)), // another identifier: nothing
            punch(3, 40021),
            from_peer(3, 40021, DatagramData::Ack), // an ACK to the non-leader: nothing
            from_peer(3, 40021, DatagramData::Confirm), // the leader's choice: WIN
            Advance { millis: 1000 },
        ]);
        write(
            "predict-follow",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.wins, o.confirmed_wins, o.led_wins), (1, 1, 0));
                assert_eq!((o.acks, o.finished), (1, true));
            },
        );
    }

    #[test]
    fn no_ack_from_the_peer_wins_the_v1_way() {
        // An extended READY and SEEN, but no HINT: the peer may be v1.
        let mut ops = predict_start();
        ops.extend([
            peer_info(40000),
            punch(0, 40020),          // ACKed; the fallback is armed
            Advance { millis: 1000 }, // no ACK: WIN the v1 way, then 3 PUNCHes back
        ]);
        write(
            "v1-fallback",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.wins, o.fallback_wins, o.confirmed_wins), (1, 1, 0));
                assert_eq!((o.acks, o.predicted_wins, o.finished), (1, 0, true));
            },
        );
    }

    #[test]
    fn predicted_attempts_re_aimed_then_won_in_the_round() {
        let mut ops = predict_start();
        ops.extend([
            // 40000 + 30000 is past 65535: no target, aim again from a fresh EXCHANGE.
            Stream(StreamData::Hint(30000)),
            peer_info(40000),
            Advance { millis: 50 }, // the pause (≤ 2·RTT, here 0), then EXCHANGE, round 2
            Stream(StreamData::Hint(20)),
            peer_info(40010),
            Advance { millis: 300 }, // no PUNCH by the deadline: attempt 3, EXCHANGE round 3
            Stream(StreamData::Hint(21)),
            peer_info(40020),
            punch(1, 40041),
            from_peer(1, 40041, DatagramData::Ack), // WIN, still round 1
            Advance { millis: 1000 },
        ]);
        write(
            "predict-reaim",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.rounds, o.in_session_rounds, o.losses), (1, 0, 0));
                assert_eq!((o.reaims, o.reaims_out_of_range, o.max_attempt), (2, 1, 3));
                assert_eq!(o.reaim_exchanges, 2);
                assert_eq!((o.wins, o.predicted_wins, o.reaimed_wins), (1, 1, 1));
                assert!(o.finished);
            },
        );
    }

    #[test]
    fn predicted_round_lost_when_its_window_has_no_fresh_socket_then_won_in_a_fresh_round() {
        // 8 window slots: 8 attempts use them all; the round is lost and the next one opens a
        // new window on a new connection instead of reusing a socket the server has seen.
        let mut ops = predict_start();
        for i in 0..8u16 {
            ops.extend([
                Stream(StreamData::Hint(20)),
                peer_info(40000 + 10 * i),
                Advance { millis: 300 },
            ]);
        }
        write(
            "predict-window-spent",
            Input {
                config: PREDICT,
                ops,
            },
            |o| {
                assert_eq!((o.rounds, o.in_session_rounds, o.losses), (2, 0, 1));
                assert_eq!((o.reaims, o.max_attempt), (7, 8));
            },
        );
    }

    #[test]
    fn predicted_round_lost_after_its_re_aims_then_won_in_session() {
        // A window of 14 slots outlasts the round's 12 attempts.
        const WIDE: Config = Config {
            max_window: 14,
            ..PREDICT
        };
        let mut ops = predict_start();
        // 1 + MAX_REAIMS attempts, none punched: then LOSE, and round 2 in the same session.
        for i in 0..=n4_core::MAX_REAIMS as u16 {
            ops.extend([
                Stream(StreamData::Hint(20)),
                peer_info(40000 + 10 * i),
                Advance { millis: 300 },
            ]);
        }
        ops.extend([
            Stream(StreamData::Hint(21)),
            peer_info(41000),
            punch(1, 41022),
            from_peer(1, 41022, DatagramData::Ack),
            Advance { millis: 1000 },
        ]);
        write("predict-session", Input { config: WIDE, ops }, |o| {
            assert_eq!((o.rounds, o.in_session_rounds, o.losses), (2, 1, 1));
            assert_eq!((o.reaims, o.max_attempt), (n4_core::MAX_REAIMS, 12));
            assert_eq!((o.wins, o.predicted_wins, o.reaimed_wins), (1, 1, 0));
            assert!(o.finished);
        });
    }

    #[test]
    fn v1_early_punch_wins_at_peer_info() {
        let config = BASE;
        let ops = vec![
            Connected,
            Stream(StreamData::Ready(None)),
            punch(4, 40020),
            peer_info(40000),
            AdvanceLate { millis: 700 },
            Advance { millis: 5000 },
        ];
        write("v1-early-punch", Input { config, ops }, |o| {
            assert_eq!(
                (o.rounds, o.wins, o.extended_rounds, o.finished),
                (1, 1, 0, true)
            );
        });
    }

    #[test]
    fn lose_then_win() {
        let ops = vec![
            Connected,
            Stream(StreamData::Ready(Some(1))),
            peer_info(40000),
            Datagram {
                slot: 1,
                host: 1, // not the peer's IP
                port: 40020,
                data: DatagramData::Punch,
            },
            Advance { millis: 600 }, // round timeout: LOSE, round 2
            Connected,
            Stream(StreamData::Ready(Some(2))),
            peer_info(40100),
            punch(0, 40120),
            Advance { millis: 1000 },
        ];
        write("lose-then-win", Input { config: BASE, ops }, |o| {
            assert_eq!((o.rounds, o.losses, o.wins, o.finished), (2, 1, 1, true));
        });
    }

    #[test]
    fn server_trouble_until_giving_up() {
        let config = Config {
            max_rounds: 3,
            ..BASE
        };
        let ops = vec![
            Connected,
            StreamClosed, // round 1: closed before READY
            Advance { millis: 200 },
            Connected,
            Stream(StreamData::Bytes8(*b"\x09garbage")), // round 2: garbage
            Advance { millis: 200 },
            Connected,
            Stream(StreamData::Ready(None)),
            Stream(StreamData::PeerInfo {
                ip: 0,
                port: 65530, // + 20 passes 65535
            }),
        ];
        write("server-trouble", Input { config, ops }, |o| {
            assert_eq!((o.rounds, o.losses, o.wins, o.finished), (3, 3, 0, true));
        });
    }

    #[test]
    fn rehello_after_the_servers_wait_timeout_then_refused() {
        let ops = vec![
            Connected,
            Advance { millis: 1500 },
            StreamClosed, // 1.5 s after HELLO: the server's wait timeout, HELLO again
            Advance { millis: 200 },
            Connected,
            Advance { millis: 400 },
            StreamClosed, // 0.4 s after HELLO: a lost round
            Advance { millis: 200 },
            Connected,
            Stream(StreamData::Refused(2)), // a private server: key required
        ];
        write("rehello-refused", Input { config: BASE, ops }, |o| {
            assert_eq!((o.rounds, o.losses, o.rehellos), (2, 1, 1));
            assert!(o.refused && o.finished);
        });
    }

    #[test]
    fn unreachable_server() {
        write(
            "unreachable",
            Input {
                config: BASE,
                ops: vec![ConnectFailed],
            },
            |o| assert!(o.finished && o.rounds == 1),
        );
    }
}
