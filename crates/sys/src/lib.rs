//! Raw Linux system calls and ioctls that the safe crates (`rustix`, `nix`) do not cover.
//!
//! This is the only DeltaBox crate with non-trivial `unsafe`: everything here is a small, safe wrapper whose
//! soundness argument sits next to the call. Higher crates build policy on top and never call `libc` for these.

pub mod btrfs;
pub mod caps;
pub mod clone;
pub mod dirty;
pub mod fdpass;
pub mod hugepage;
pub mod inject;
pub mod netdev;
pub mod pidfd;
pub mod procfs;
pub mod reflink;
pub mod seccomp;
pub mod uffd;

pub use clone::{clone_process, CloneResult};
