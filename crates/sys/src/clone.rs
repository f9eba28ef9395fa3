//! `clone(2)` with namespace flags and fork semantics (no new stack: the child continues on a copy of ours).

use std::io;

use rustix::process::Pid;

/// What [`clone_process`] returned in the calling process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneResult {
    /// We are the parent; this is the child's pid as seen from our pid namespace.
    Parent(Pid),
    /// We are the new child.
    Child,
}

/// Forks with extra `CLONE_*` flags (e.g. `CLONE_NEWUSER | CLONE_NEWPID`); the child gets `SIGCHLD` as exit signal.
///
/// `fork()` cannot create namespaces atomically with the new process, and `unshare(CLONE_NEWPID)` only affects
/// later children, so a sandbox's pid 1 is made with a raw `clone`.
///
/// # Safety
/// The caller must be single-threaded: like `fork`, only the calling thread is copied, so locks held by other
/// threads (the allocator's, stdio's) would stay locked forever in the child.
pub unsafe fn clone_process(flags: libc::c_int) -> io::Result<CloneResult> {
    // SAFETY: with a null stack pointer the kernel gives the child a copy-on-write copy of our stack, exactly like
    // fork(2); no pointers are passed. The caller guarantees single-threadedness (see above).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::from((flags | libc::SIGCHLD) as u32),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0usize,
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(CloneResult::Child),
        pid => {
            let pid = i32::try_from(pid)
                .map_err(|_| io::Error::other("clone returned an out-of-range pid"))?;
            Pid::from_raw(pid)
                .map(CloneResult::Parent)
                .ok_or_else(|| io::Error::other("clone returned pid 0"))
        }
    }
}
