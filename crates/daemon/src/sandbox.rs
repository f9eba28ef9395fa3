//! A live sandbox as the daemon holds it.

use std::collections::HashMap;
use std::sync::Arc;

use deltabox_fs::ImageConfig;
use deltabox_runtime::{Cgroup, SandboxHandle, Session};
use tokio::sync::Mutex;

/// A running (or paused) sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Id.
    pub id: String,
    /// Connection to its init.
    pub handle: SandboxHandle,
    /// Its cgroup.
    pub cgroup: Cgroup,
    /// Network mode.
    pub network: deltabox_runtime::NetworkMode,
    /// Its layers (the writable one changes at every checkpoint).
    pub fs: std::sync::Mutex<crate::store::FsState>,
    /// Image defaults (environment, working directory).
    pub image_config: ImageConfig,
    /// Hostname.
    pub hostname: String,
    /// Sessions by id.
    pub sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Serialises pause/resume/remove.
    pub lifecycle: Mutex<()>,
    /// The keeper holding this sandbox's process checkpoints (started by the first one).
    pub keeper: Mutex<Option<Arc<deltabox_runtime::Keeper>>>,
    /// Process checkpoints its keeper holds.
    pub kept: std::sync::Mutex<HashMap<String, KeptCheckpoint>>,
    /// Sessions whose interpreter a rollback killed and did not restore, kept with their pipes (suspended) in
    /// case a later rollback restores that interpreter from an older checkpoint.
    pub dormant: Mutex<HashMap<String, (Arc<Session>, deltabox_runtime::Suspended)>>,
    /// For a branch forked with processes: the source sandbox, whose pid namespace holds the branch's.
    pub branch_of: Option<String>,
}

/// A process checkpoint whose templates the sandbox's keeper holds.
#[derive(Debug, Clone)]
pub struct KeptCheckpoint {
    /// The sessions (id, pid, kind) there were when it was taken.
    pub sessions: Vec<(String, i32, deltabox_runtime::SessionKind)>,
    /// Templates (one per process).
    pub processes: usize,
    /// Taken or last rolled back to (the template pool evicts the least recently used).
    pub last_used: std::time::Instant,
}

impl Sandbox {
    /// The environment a command starts with: sane defaults, then the image's, then the request's.
    pub fn base_env(&self, extra: &std::collections::BTreeMap<String, String>) -> Vec<String> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/root".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TERM".into(), "dumb".into()),
            ("HOSTNAME".into(), self.hostname.clone()),
            ("USER".into(), "root".into()),
        ];
        let mut set = |k: &str, v: &str| {
            if let Some(e) = env.iter_mut().find(|(ek, _)| ek == k) {
                e.1 = v.to_string();
            } else {
                env.push((k.to_string(), v.to_string()));
            }
        };
        for kv in &self.image_config.env {
            if let Some((k, v)) = kv.split_once('=') {
                set(k, v);
            }
        }
        for (k, v) in extra {
            set(k, v);
        }
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Default working directory.
    pub fn default_cwd(&self) -> String {
        self.image_config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/root".into())
    }
}
