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
    /// Chains with at least this many frozen layers get compacted in the background.
    pub compact_at: usize,
    /// Layers merged into one per compaction level.
    pub compact_fanout: usize,
    /// Memory (PSS, bytes) all process templates together may hold before the least recently used are evicted.
    pub template_budget: u64,
    /// Templates one sandbox may hold (they count against its pids limit).
    pub max_templates: usize,
    /// Write durable images of process checkpoints in the background (`DELTABOX_DURABLE=0` turns it off:
    /// checkpoints are then warm-only, and a rollback whose templates are gone restarts the processes).
    pub durable: bool,
}

/// Default [`Config::compact_at`]: well under overlayfs's 500 lower layers, and short enough that lookups stay
/// native speed.
pub const DEFAULT_COMPACT_AT: usize = 64;
/// Default [`Config::compact_fanout`].
pub const DEFAULT_COMPACT_FANOUT: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Config {
    /// Defaults, overridden by `DELTABOX_STATE_DIR`, `DELTABOX_SOCKET`, `DELTABOX_COMPACT_AT`,
    /// `DELTABOX_COMPACT_FANOUT`, `DELTABOX_TEMPLATE_BUDGET_MB`, `DELTABOX_MAX_TEMPLATES` and `DELTABOX_DURABLE`.
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
            compact_at: env_usize("DELTABOX_COMPACT_AT", DEFAULT_COMPACT_AT).clamp(2, 400),
            compact_fanout: env_usize("DELTABOX_COMPACT_FANOUT", DEFAULT_COMPACT_FANOUT)
                .clamp(2, 64),
            template_budget: env_usize("DELTABOX_TEMPLATE_BUDGET_MB", 4096) as u64 * (1 << 20),
            max_templates: env_usize("DELTABOX_MAX_TEMPLATES", 128).max(1),
            durable: std::env::var("DELTABOX_DURABLE").map_or(true, |v| v != "0"),
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
