//! Process file descriptors: a handle on one process that a reused pid cannot redirect.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `pidfd_open(pid)`.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Duplicates descriptor `fd` of process `pid` into ours (`pidfd_getfd`, Linux 5.6; needs ptrace access to it).
pub fn getfd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    let pidfd = open(pid)?;
    // SAFETY: pidfd_getfd(2) takes integers (our pidfd, their descriptor number, flags 0).
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel installed for us (with O_CLOEXEC).
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}
