use arbitrary::{Arbitrary, Unstructured};
use n4_fuzz::{client, server};
#[test]
fn reach() {
    let mut c = client::Outcome::default();
    let mut n = 0;
    for e in std::fs::read_dir("corpus/client").unwrap() {
        let b = std::fs::read(e.unwrap().path()).unwrap();
        let Ok(i) = client::Input::arbitrary_take_rest(Unstructured::new(&b)) else { continue };
        let o = client::run(&i);
        n += 1;
        c.wins += o.wins; c.confirmed_wins += o.confirmed_wins; c.led_wins += o.led_wins;
        c.fallback_wins += o.fallback_wins; c.acks += o.acks; c.rehellos += o.rehellos;
        c.predicted_wins += o.predicted_wins; c.refused |= o.refused;
        c.in_session_rounds += o.in_session_rounds;
    }
    println!("client inputs {n}: {c:?}");
    let mut s = server::Outcome::default();
    let mut n = 0;
    for e in std::fs::read_dir("corpus/server").unwrap() {
        let b = std::fs::read(e.unwrap().path()).unwrap();
        let Ok(i) = server::Input::arbitrary_take_rest(Unstructured::new(&b)) else { continue };
        let o = server::run(&i);
        n += 1;
        s.readies += o.readies; s.peer_infos += o.peer_infos; s.keyed_peer_infos += o.keyed_peer_infos;
        s.peer_nonces += o.peer_nonces; s.auths_relayed += o.auths_relayed; s.refusals += o.refusals;
        s.auth_failures += o.auth_failures; s.data_relayed += o.data_relayed; s.hints += o.hints;
    }
    println!("server inputs {n}: {s:?}");
}
