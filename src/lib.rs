//! turnd: every conversation turn answered exactly once, by one long-lived worker process per
//! conversation across the cluster. See ARCHITECTURE.md for the map.

#![warn(unreachable_pub, missing_debug_implementations)]
#![warn(clippy::await_holding_lock)]

pub mod broker;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deployment;
pub mod event;
pub mod http;
pub mod intake;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod parked;
pub mod relay;
pub mod store;
pub mod supervise;
pub mod sweep;
pub mod systemd;
pub mod turn;
pub mod untrusted;
pub mod worker;
