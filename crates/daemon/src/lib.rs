//! The DeltaBox daemon: owns every sandbox (later also template processes and layer mounts, which is why a CLI
//! process cannot), serves HTTP/JSON on a unix socket (TCP with a bearer token only when asked), and keeps
//! metadata in SQLite under its state directory.

pub mod api;
pub mod client;
pub mod compaction;
pub mod config;
pub mod daemon;
pub mod error;
pub mod export;
pub mod files;
pub mod metrics;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod storefs;

pub use client::Client;
pub use config::Config;
pub use daemon::Daemon;
pub use error::ApiError;
