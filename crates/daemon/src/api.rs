//! Request and response bodies of the HTTP API (`/v1/…`), shared by the daemon and its clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default bound on captured output per stream.
pub const DEFAULT_MAX_OUTPUT: usize = 1 << 20;
/// Largest bound a request may ask for.
pub const MAX_MAX_OUTPUT: usize = 64 << 20;

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// `host` (default), a directory, an OCI layout directory, or an OCI/docker archive.
    #[serde(default)]
    pub image: Option<String>,
    /// Memory limit like `2G`, or `max`. Default 2G.
    #[serde(default)]
    pub memory: Option<String>,
    /// Process limit. Default 512.
    #[serde(default)]
    pub pids: Option<u64>,
    /// CPU cores (fractional). Default unlimited.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// `none` (loopback only, default) or `host`.
    #[serde(default)]
    pub network: Option<String>,
}

/// A sandbox as listed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxInfo {
    /// Id.
    pub id: String,
    /// `running`, `paused`, `exited` (its init died) or `lost` (the daemon restarted).
    pub status: String,
    /// Why it is not running, when it is not.
    pub reason: Option<String>,
    /// Image reference.
    pub image: String,
    /// Image digest.
    pub image_digest: String,
    /// Creation time, seconds since the epoch.
    pub created_at: i64,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Process limit.
    pub pids: Option<u64>,
    /// CPU limit.
    pub cpus: Option<f64>,
    /// Network mode.
    pub network: String,
    /// Host pid of the sandbox's init (while running).
    pub init_pid: Option<i32>,
    /// Running sessions.
    pub sessions: usize,
    /// Host path of the writable layer (for inspection).
    #[serde(default)]
    pub upper: Option<String>,
    /// Checkpoint last taken or rolled back to.
    #[serde(default)]
    pub head: Option<String>,
    /// Frozen layers under the writable one (checkpoints deep).
    #[serde(default)]
    pub depth: usize,
    /// For a fork that got its source's live processes: the source sandbox (the branch's pid namespace lies
    /// inside the source's, so the source cannot be removed while the branch runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_of: Option<String>,
    /// For such a fork: the processes forked into it (sandbox pids, the same as in the source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forked_processes: Vec<i32>,
    /// For a fork of a process checkpoint that got the files only: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointInfo {
    /// Id (`c-…`).
    pub id: String,
    /// Sandbox it was taken of.
    pub sandbox_id: String,
    /// The checkpoint it extends.
    pub parent: Option<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Checkpoints in its lineage (its depth), however compacted.
    pub depth: usize,
    /// Overlay layers its chain has now (compaction merges old ones).
    #[serde(default)]
    pub layers: usize,
    /// Wall time of the checkpoint call in the daemon (0 in listings).
    pub duration_ms: f64,
    /// Phase timings of the generation switch (only when just taken).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub switch: Option<deltabox_runtime::generation::SwitchReport>,
    /// Whether its processes were checkpointed too.
    #[serde(default)]
    pub with_processes: bool,
    /// Processes checkpointed with it (sandbox pids; only when just taken).
    #[serde(default)]
    pub processes: Vec<i32>,
    /// What its templates cost now, while they are held (listings only).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub templates: Option<deltabox_runtime::keeper::TemplateCost>,
    /// Its processes' durable images are written (a process checkpoint is warm-ready when taken, durable-ready
    /// once this is true: rollback then works even after its templates are gone). Listings only.
    #[serde(default)]
    pub durable: bool,
    /// Why its durable images could not be written, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_error: Option<String>,
    /// Kept by `gc`, with everything it builds on.
    #[serde(default)]
    pub pinned: bool,
    /// Memory content its images hold, bytes (listings only, once durable).
    #[serde(default)]
    pub image_bytes: u64,
    /// Of those, the bytes that took new space: the rest equals the previous durable checkpoint's memory at the
    /// same addresses and shares its extents. This is the checkpoint's memory delta.
    #[serde(default)]
    pub image_new_bytes: u64,
    /// Of the shared bytes, those the page tables showed unchanged since the previous durable checkpoint (the
    /// very same physical pages in both checkpoints' templates): written without being read or compared.
    #[serde(default)]
    pub image_unchanged_bytes: u64,
}

/// `POST /v1/sandboxes/{id}/checkpoints` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// Also checkpoint every process (single-threaded ones only, for now), so that rollback restores them.
    #[serde(default)]
    pub processes: bool,
    /// With `processes`: collapse their large anonymous memory into huge pages in the background (default
    /// yes), so later checkpoints and rollbacks fork them in well under a millisecond. It costs a one-time copy
    /// (~2 s of background CPU per GiB) and the templates stop sharing pages with the live processes.
    #[serde(default)]
    pub huge_pages: Option<bool>,
}

/// `POST /v1/sandboxes/{id}/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Checkpoint id.
    pub checkpoint: String,
    /// How processes rebuilt from durable images get their memory (only when the templates are gone).
    #[serde(default)]
    pub memory: MemoryFill,
}

/// How a process rebuilt from its image gets its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryFill {
    /// Large heaps on demand: the rollback returns once the processes can run; a pager copies each page they
    /// touch, and the rest in the background.
    #[default]
    Lazy,
    /// Everything copied before the processes run.
    Eager,
}

/// Result of a rollback.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackInfo {
    /// Sandbox.
    pub sandbox_id: String,
    /// Checkpoint rolled back to.
    pub checkpoint: String,
    /// Whether the processes were restarted fresh (files-only checkpoint, or its process templates are gone).
    pub processes_restarted: bool,
    /// Processes restored from the checkpoint, with their pids (when not restarted).
    #[serde(default)]
    pub restored: Vec<i32>,
    /// Phase timings of a process rollback.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub restore: Option<deltabox_runtime::keeper::RestoreReport>,
    /// What happened, for people.
    pub note: String,
    /// Wall time in the daemon.
    pub duration_ms: f64,
}

/// `POST /v1/sandboxes/{id}/exec` and `/exec/stream`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the image's, else `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text for stdin (default: none, `/dev/null`).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Bound on captured output per stream.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

/// Result of a one-shot command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// stdout (UTF-8, invalid bytes replaced). Empty in the final event of a stream.
    pub stdout: String,
    /// stderr (likewise).
    pub stderr: String,
    /// stdout exceeded the bound.
    pub stdout_truncated: bool,
    /// stderr exceeded the bound.
    pub stderr_truncated: bool,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Killed by the kernel's OOM killer (the sandbox hit its memory limit).
    pub oom_killed: bool,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
}

impl ExecResult {
    /// The exit status a shell would give: code, 124 on timeout, else 128 + signal.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            return 124;
        }
        self.exit_code
            .unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

/// One line of an `/exec/stream` response (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamEvent {
    /// Output bytes, base64.
    Stdout { data: String },
    /// Output bytes, base64.
    Stderr { data: String },
    /// The end; output fields empty (it was streamed).
    Exit(ExecResult),
    /// The command could not run or the sandbox died.
    Error { code: String, message: String },
}

/// `POST /v1/sandboxes/{id}/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    /// `bash` or `python3`.
    pub kind: String,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A session as listed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    /// Id.
    pub id: String,
    /// `bash` or `python3`.
    pub kind: String,
    /// Pid inside the sandbox.
    pub pid: i32,
    /// Still running.
    pub alive: bool,
}

/// `POST /v1/sandboxes/{id}/sessions/{sid}/run`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInSession {
    /// Command text (bash) or code (python3).
    pub command: String,
    /// Interrupt after this many milliseconds (default 60 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Bound on captured output per stream.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

/// Result of a session command.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionResult {
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// stdout exceeded the bound.
    pub stdout_truncated: bool,
    /// stderr exceeded the bound.
    pub stderr_truncated: bool,
    /// Status (see the runtime's `SessionOutput`).
    pub exit_code: Option<i32>,
    /// The timeout fired (the command was interrupted).
    pub timed_out: bool,
    /// Whether the session is still usable.
    pub session_alive: bool,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Daemon version.
    pub version: String,
    /// `v1` or `v2`.
    pub cgroup: String,
    /// Sandboxes known.
    pub sandboxes: usize,
}

/// `POST /v1/checkpoints/{id}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many sandboxes (1..=64).
    pub n: usize,
}

/// `POST /v1/gc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcBody {
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `gc` removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    /// Nothing was removed: this is what would go.
    pub dry_run: bool,
    /// Checkpoints collected, deepest first.
    pub removed: Vec<GcEntry>,
    /// Checkpoints kept (pinned, sandbox heads, and their ancestors).
    pub kept: usize,
    /// Disk their images took of their own (not shared with others), bytes.
    pub image_bytes: u64,
    /// Checkpoints that could not be removed, with why (a concurrent fork or checkpoint built on them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// One collected checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcEntry {
    /// Id.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// It held processes.
    pub with_processes: bool,
}

/// `POST /v1/checkpoints/{id}/export` and `POST /v1/import`: an archive path on the daemon's machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveBody {
    /// Absolute path.
    pub path: String,
}

/// What an import made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportReport {
    /// The new (stopped) sandbox.
    pub sandbox_id: String,
    /// The new checkpoint: roll back to it to start the sandbox.
    pub checkpoint: String,
    /// The archive held process images.
    pub with_processes: bool,
}
