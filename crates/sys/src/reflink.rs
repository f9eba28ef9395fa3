//! Sharing file extents between files (`FICLONERANGE`), on filesystems with reflinks (XFS, btrfs).

use std::os::fd::{AsFd, AsRawFd};

/// `struct file_clone_range`.
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// `FICLONERANGE` = `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// Makes `len` bytes of `dest` at `dest_offset` share the extents of `src` at `src_offset`: a copy that costs
/// no space. Offsets and length must be multiples of the filesystem's block size (or end at `src`'s end). Fails
/// with `EOPNOTSUPP`/`EXDEV`/`EINVAL` where that is not possible; callers then copy.
pub fn clone_range(
    dest: impl AsFd,
    dest_offset: u64,
    src: impl AsFd,
    src_offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_fd().as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset,
    };
    // SAFETY: FICLONERANGE reads a file_clone_range from the pointer, which lives across the call.
    let r = unsafe {
        libc::ioctl(
            dest.as_fd().as_raw_fd(),
            FICLONERANGE,
            &arg as *const FileCloneRange,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
