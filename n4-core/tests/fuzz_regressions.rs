//! Bugs the fuzz targets in `fuzz/` found, each pinned by the smallest story that shows it.

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
        c.handle_connected(now);
        c.handle_stream_closed(now); // round 1 lost: the server hung up
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
