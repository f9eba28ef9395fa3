//! DeltaCR: checkpoints of live processes that never agreed to be checkpointed.
//!
//! A checkpoint of a process is a **template**: a copy forked from outside (a `clone3` injected by ptrace while
//! the process is stopped), kept stopped forever by its tracer. Forking costs page tables, not memory: the
//! template shares every page copy-on-write with the live process. Rolling back kills the live process and forks
//! the template again, with the same pid (`set_tid`); the new process resumes exactly where the original was when
//! checkpointed, including a blocking call it was in (restarted by the kernel as after any ptrace stop).
//!
//! Limits that come from `fork(2)` itself: one thread is copied (multi-threaded processes are refused), timers and
//! pending signals are not inherited, and open file descriptions (offsets, pipes) are shared with the template
//! until re-pointed.

pub mod error;
pub mod image;
pub mod pager;
pub mod restore;
pub mod template;

pub use error::{Error, Result};
pub use template::{BranchNamespaces, PendingCapture, Spawning, Template};
