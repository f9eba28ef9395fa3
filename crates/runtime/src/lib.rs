//! The sandbox runtime: isolated sandboxes, commands and persistent sessions.
//!
//! Process layout (never fork from the multi-threaded daemon):
//! ```text
//! daemon (tokio, many threads)
//!   └─ zygote (single-threaded helper, own mount namespace holding the host-root bind)
//!        └─ sandbox init = pid 1 of a new user/mount/pid/uts/ipc/net/cgroup namespace set,
//!           root = overlayfs(base layers + writable layer), hardened (no_new_privs, caps, seccomp)
//!             └─ commands and sessions, each forked by init on the daemon's request
//! ```
//! The daemon talks to each init over its own unix socket ([`handle::SandboxHandle`]): it sends pipe ends with
//! `SCM_RIGHTS` and init forks, execs and reports exits. Because init is already inside every namespace and
//! hardened, everything it starts inherits the isolation.

pub mod cgroup;
pub mod collapser;
pub mod diff;
pub mod durable;
pub mod error;
pub mod exec;
pub mod fd_fixup;
pub mod files;
pub mod generation;
pub mod handle;
pub mod hardening;
pub mod init;
pub mod keeper;
pub mod limits;
mod pagers;
pub mod protocol;
pub mod rootfs;
pub mod session;
pub mod teardown;
pub mod zygote;

pub use cgroup::{Cgroup, CgroupManager, CgroupVersion};
pub use error::{Error, Result};
pub use exec::{ExecOutput, ExecRequest, OutputEvent};
pub use handle::SandboxHandle;
pub use limits::Limits;
pub use protocol::{NetworkMode, SandboxSpec};
pub use session::{Session, SessionKind, SessionOutput, Suspended};
pub use zygote::{Keeper, Zygote};
