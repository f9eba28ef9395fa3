//! Integration tests: real daemons, real sandboxes, real programs. Each test starts its own daemon with its own
//! state directory; run them with cargo-nextest (one process per test), as root.
#![allow(clippy::unwrap_used)]

mod common;

mod api;
mod bad_input;
mod checkpoints;
mod daemon_lifecycle;
mod deep_chain;
mod durable;
mod files;
mod fork_live;
mod images;
mod isolation;
mod limits;
mod model;
mod processes;
mod real_programs;
mod sessions;
mod shell_model;
