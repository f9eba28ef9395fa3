//! Command-line syntax.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// DeltaBox: sandboxes for AI agents, with millisecond checkpoint, rollback and fork (coming in later steps).
#[derive(Debug, Parser)]
#[command(name = "deltabox", version, about)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "DELTABOX_SOCKET", default_value = deltabox_daemon::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The daemon's state directory (used when this command starts the daemon).
    #[arg(long, global = true, env = "DELTABOX_STATE_DIR", default_value = deltabox_daemon::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox and print its id.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(alias = "list")]
    Ls,
    /// Show one sandbox.
    Info { id: String },
    /// Run a command in a sandbox; its output passes through and its exit code becomes ours.
    Exec(ExecArgs),
    /// Persistent bash / python3 sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Stop and delete sandboxes (processes, cgroup, files).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Checkpoint a sandbox's files (processes keep running); prints only the checkpoint id.
    Checkpoint {
        id: String,
        /// Checkpoint every process too (single-threaded ones), so that rollback restores them with their pids.
        #[arg(long)]
        processes: bool,
        /// With --processes: keep their memory in small pages (no background huge-page collapse; later
        /// checkpoints and rollbacks of large processes stay slower, templates keep sharing pages).
        #[arg(long, requires = "processes")]
        no_huge_pages: bool,
    },
    /// Roll a sandbox back to a checkpoint: files, and processes if it holds them (else they are restarted).
    Rollback {
        id: String,
        checkpoint: String,
        /// Processes rebuilt from durable images (their templates gone) get all their memory before they run,
        /// instead of on demand.
        #[arg(long)]
        eager: bool,
    },
    /// Fork a checkpoint into N new sandboxes (with its live processes, for a process checkpoint); prints their
    /// ids, one a line.
    Fork {
        checkpoint: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        n: usize,
    },
    /// Files added (A), deleted (D) and changed (M) from checkpoint FROM to checkpoint TO.
    Diff { from: String, to: String },
    /// Delete a checkpoint (refused while later checkpoints or forks build on it).
    RmCheckpoint { checkpoint: String },
    /// List a sandbox's checkpoints.
    Checkpoints { id: String },
    /// Write one checkpoint (its files, process images and sandbox settings) to a compressed,
    /// content-addressed archive.
    Export {
        checkpoint: String,
        /// The archive to write.
        #[arg(short, long)]
        output: std::path::PathBuf,
    },
    /// Recreate an exported checkpoint as a new (stopped) sandbox; prints the sandbox and the checkpoint to roll
    /// back to.
    Import { archive: std::path::PathBuf },
    /// Pin a checkpoint: `gc` keeps it and every checkpoint it builds on.
    Pin { checkpoint: String },
    /// Unpin a checkpoint.
    Unpin { checkpoint: String },
    /// Delete every checkpoint that is neither pinned, nor a sandbox's head, nor an ancestor of one of those.
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Freeze every process of a sandbox.
    Pause { id: String },
    /// Thaw a paused sandbox.
    Resume { id: String },
    /// Run the daemon in the foreground.
    Daemon(DaemonArgs),
    /// The main job: an agent-like trajectory in a fresh sandbox, narrated.
    Demo,
    /// Print the API's OpenAPI document (the one the daemon serves at /v1/openapi.json).
    Openapi,
    /// Benchmarks (print numbers; never assert them).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Base image: `host` (default: the host's system directories, read-only), a directory, an OCI layout
    /// directory, or an OCI/docker image archive (`docker save`, `skopeo copy oci-archive:`).
    #[arg(long)]
    pub image: Option<String>,
    /// Memory limit (e.g. 512M, 2G, max).
    #[arg(long)]
    pub memory: Option<String>,
    /// Most processes at once.
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU cores (fractional).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// `none` (loopback only, default) or `host` (share the host's network: explicit opt-in).
    #[arg(long)]
    pub network: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id.
    pub id: String,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w')]
    pub cwd: Option<String>,
    /// Extra environment (KEY=VALUE), repeatable.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Pass our stdin to the command.
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Start a session and print its id.
    Start {
        id: String,
        /// bash or python3.
        kind: String,
        #[arg(long, short = 'w')]
        cwd: Option<String>,
    },
    /// Run a command in a session; prints its output and exits with its status.
    Run {
        id: String,
        session: String,
        command: String,
        /// Interrupt after this many seconds (default 60).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// List a sandbox's sessions.
    Ls { id: String },
    /// End a session.
    Stop { id: String, session: String },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Also listen on TCP (e.g. 127.0.0.1:7070); requests there need the bearer token.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the token for --listen (created with a random token if missing).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// DeltaCR: process checkpoint/rollback against memory size and process count, with CRIU in the same run.
    Cr {
        /// Fewer sizes and repetitions (for CI).
        #[arg(long)]
        quick: bool,
    },
    /// Durable checkpoints: slow-path rollback against memory (beside CRIU), image space over a trajectory,
    /// the cost of background image writing.
    Durable {
        /// Fewer sizes, steps and repetitions (for CI).
        #[arg(long)]
        quick: bool,
    },
    /// DeltaFS checkpoint/rollback against tree size and chain depth, copy baselines, workload slowdown.
    Fs {
        /// Smaller trees, fewer repetitions (for CI).
        #[arg(long)]
        quick: bool,
    },
    /// Sandbox create→ready, exec and session round trips, against bubblewrap in the same run.
    Runtime {
        /// Iterations per measurement.
        #[arg(long, default_value_t = 30)]
        iterations: usize,
    },
}
