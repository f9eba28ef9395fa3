//! Where the daemon keeps its state and how it is reached.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default state directory (inside `/var`, which default sandboxes never see).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/deltabox";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/deltabox/deltabox.sock";

/// Daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory: SQLite database, images, sandboxes' writable layers.
    pub state_dir: PathBuf,
    /// Unix socket the API listens on (mode 0600: root only).
    pub socket: PathBuf,
    /// Optional TCP listener; requests there need `Authorization: Bearer <token>`.
    pub tcp: Option<SocketAddr>,
    /// The bearer token for TCP.
    pub token: Option<String>,
}

impl Config {
    /// Defaults, overridden by `DELTABOX_STATE_DIR` and `DELTABOX_SOCKET`.
    pub fn from_env() -> Config {
        Config {
            state_dir: std::env::var_os("DELTABOX_STATE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            socket: std::env::var_os("DELTABOX_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            tcp: None,
            token: None,
        }
    }

    /// The layer store's mountpoint (see `storefs`).
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    /// The zygote's bind mount of the host root.
    pub fn host_root(&self) -> PathBuf {
        self.state_dir.join("hostroot")
    }

    /// A short, stable tag for this state directory (names this daemon's cgroup subtree).
    pub fn instance_tag(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.state_dir.hash(&mut h);
        format!("{:08x}", h.finish() as u32)
    }
}
