//! Messages between the daemon, the zygote and each sandbox's init (JSON in length-prefixed frames, see
//! `deltabox_sys::fdpass`).

use std::path::PathBuf;

use deltabox_fs::LayerStack;
use serde::{Deserialize, Serialize};

/// Network of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Own network namespace with only loopback (the default).
    #[default]
    None,
    /// Share the host's network namespace (explicit opt-in: the sandbox can reach the network).
    Host,
}

/// Everything the zygote needs to create one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox id (for messages).
    pub id: String,
    /// Hostname inside.
    pub hostname: String,
    /// Base layers and the writable layer.
    pub layers: LayerStack,
    /// Host directory the overlay is mounted on before `pivot_root`.
    pub rootfs: PathBuf,
    /// `cgroup.procs` files the init must be placed in before it runs.
    pub cgroup_procs: Vec<PathBuf>,
    /// Network mode.
    pub network: NetworkMode,
    /// Create it as a branch of the sandbox whose init has this host pid: inside that sandbox's user namespace,
    /// its pid namespace one level below that sandbox's (where that sandbox's process templates can fork
    /// copies into it), every other namespace its own.
    #[serde(default)]
    pub branch_of: Option<i32>,
}

/// Daemon → zygote.
#[derive(Debug, Serialize, Deserialize)]
pub enum ZygoteRequest {
    /// Create a sandbox; the reply carries the init's control socket.
    Create(SandboxSpec),
    /// Start the keeper of the sandbox whose init has host pid `init_pid`; the reply carries its socket.
    StartKeeper { init_pid: i32 },
    /// Move a running sandbox onto a new filesystem generation.
    Switch(crate::generation::SwitchSpec),
    /// Compare two checkpoints' layers.
    Diff(crate::diff::DiffSpec),
}

/// Zygote → daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum ZygoteReply {
    /// The zygote is up (sent once at start).
    Ready,
    /// Created; init's host pid. One descriptor attached: the control socket.
    Created { pid: i32 },
    /// Keeper started (host pid). One descriptor attached: its socket.
    KeeperStarted { pid: i32 },
    /// Creation failed; nothing was left running.
    Failed { error: String },
    /// The sandbox runs on the new generation.
    Switched(crate::generation::SwitchReport),
    /// The difference between two checkpoints.
    Diffed(crate::diff::DiffResult),
}

/// Daemon → init.
#[derive(Debug, Serialize, Deserialize)]
pub enum InitRequest {
    /// Fork and exec a program. The attached descriptors are installed at `fd_targets` (same order).
    Spawn {
        id: u64,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        fd_targets: Vec<i32>,
    },
    /// Report the exit of `pid` (a process restored from a checkpoint, so not one init spawned) like a spawned
    /// one's; answered with `Spawned { id, pid }`, or `SpawnFailed` if it is already gone.
    Track { id: u64, pid: i32 },
    /// Send `signal` to process `pid` (sandbox pid).
    Signal { pid: i32, signal: i32 },
    /// Send `signal` to every process of group `pgid`, except `except` (a session's shell) when given.
    SignalGroup {
        pgid: i32,
        signal: i32,
        except: Option<i32>,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if it was killed.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Shell convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        self.code.unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

/// Init → daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum InitEvent {
    /// `Spawn { id }` succeeded: the program is running as `pid` (sandbox pid).
    Spawned { id: u64, pid: i32 },
    /// `Spawn { id }` failed before the program ran.
    SpawnFailed { id: u64, error: String },
    /// A process started with `Spawn` ended.
    Exited { pid: i32, status: ExitStatus },
}
