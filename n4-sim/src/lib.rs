//! A deterministic simulator of port-incrementing NATs that drives n4-core's [`n4_core::Server`]
//! and [`n4_core::Client`] unchanged: virtual time, seeded randomness, modelled NATs and links.
//!
//! ```
//! use n4_sim::{run, Scenario, Strategy};
//! let outcome = run(&Scenario::new(7).with_strategy(Strategy::V1)).unwrap();
//! assert!(outcome.won());
//! ```
//!
//! # Design decisions
//! - One ChaCha RNG, seeded from the scenario, makes every random choice (jitter, loss,
//!   background arrivals, random ports, the server's tokens); containers are ordered or never
//!   iterated; the event queue orders by (time, sequence number). Same scenario → same trace.
//! - The machines never see a real clock: time is `epoch + virtual duration`, and the trace
//!   prints only the virtual duration.
//! - The TCP leg is a reliable, ordered stream per connection with the path's delay, jitter and
//!   loss (a lost segment costs a retransmission timeout). It passes the NAT (the server sees the
//!   NAT's IP) but uses its own port space, so it never moves the UDP port counter.
//! - Background traffic moves a sequential NAT's counter lazily, just before our host's next
//!   allocation, which is exact for what our host can see and free while nobody looks.
//!
//! See `docs/SIM.md` for the model in full.
#![warn(missing_docs, unreachable_pub)]

mod file;
mod link;
mod nat;
mod queue;
mod scenario;
mod sim;

pub use file::{ClientSpec, FileError, LinkSpec, NatSpec, ScenarioFile, SiteSpec};
pub use link::Link;
pub use n4_core::Strategy;
pub use nat::{Allocation, BackgroundKind, Filtering, Mapping, NatConfig};
pub use scenario::{
    parse_strategy, NatKind, NatPair, Scenario, Site, Stop, SERVER_ADDR, STRATEGIES,
};
pub use sim::{
    run, run_traced, ClientOutcome, MappingRecord, Outcome, ScenarioError, Sim, SimOptions,
    TraceLevel, MAX_SITES,
};
