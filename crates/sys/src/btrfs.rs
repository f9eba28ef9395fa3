//! btrfs subvolume snapshots by ioctl (the benchmark's snapshot baseline; no `btrfs` process per call).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BTRFS_IOC_SNAP_CREATE_V2` = `_IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)` (4096 bytes).
const SNAP_CREATE_V2: libc::c_ulong = 0x5000_9417;
/// `BTRFS_SUBVOL_RDONLY`.
const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args_v2`, with the unions flattened to their largest members.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

/// Snapshots subvolume `src` as `name` inside directory `dst_dir` (read-only if asked). The kernel commits the
/// transaction before returning.
pub fn snapshot(
    src: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    name: &CStr,
    readonly: bool,
) -> std::io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.len() >= 4040 || bytes.contains(&b'/') {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut args = VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `args` is a properly sized and initialized btrfs_ioctl_vol_args_v2 (4096 bytes, NUL-terminated
    // name) that lives across the call; both fds are borrowed, hence open.
    let r = unsafe {
        libc::ioctl(
            dst_dir.as_raw_fd(),
            SNAP_CREATE_V2,
            &mut args as *mut VolArgsV2,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn args_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<super::VolArgsV2>(), 4096);
    }
}
