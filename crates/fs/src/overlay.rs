//! Mounting a [`LayerStack`] as overlayfs with the new mount API.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, FsMountFlags,
    FsOpenFlags, MountAttrFlags,
};

use crate::{Error, Result};

/// overlayfs refuses more lower layers than this.
pub const MAX_LOWER_LAYERS: usize = 500;

/// An ordered stack of layers: read-only `lowers` (top first) under one writable `upper`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerStack {
    /// Read-only layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// The writable layer.
    pub upper: PathBuf,
    /// overlayfs's scratch directory; same filesystem as `upper`.
    pub work: PathBuf,
}

impl LayerStack {
    /// Creates the overlay superblock and returns a detached mount of it (an `fsmount` fd), to be moved into a
    /// sandbox's mount namespace.
    ///
    /// Mounted by host root (the zygote), never inside the sandbox's user namespace: overlayfs then keeps its
    /// metadata in `trusted.*` xattrs, which sandbox processes can neither read nor forge, and can use
    /// `redirect_dir=on`, without which `rename(2)` of a directory that lives in a lower layer (every directory
    /// after a checkpoint) fails with `EXDEV`. `volatile`: skip syncs of the upper layer (unmounting a
    /// non-volatile ext4 upper costs a 20–40 ms sync); durability of frozen layers is handled separately.
    /// `index` stays off: with it, a layer that is still the upper of a detached generation is refused as a lower.
    pub fn fsmount(&self) -> Result<OwnedFd> {
        if self.lowers.is_empty() || self.lowers.len() > MAX_LOWER_LAYERS {
            return Err(Error::Mount {
                target: self.upper.clone(),
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
                detail: format!(
                    " ({} lower layers; 1..={MAX_LOWER_LAYERS} allowed)",
                    self.lowers.len()
                ),
            });
        }
        let err = |fs: Option<&OwnedFd>, e: rustix::io::Errno| Error::Mount {
            target: self.upper.clone(),
            source: e.into(),
            detail: fs.map(read_fs_log).unwrap_or_default(),
        };
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| err(None, e))?;
        for lower in &self.lowers {
            fsconfig_set_string(fs.as_fd(), "lowerdir+", lower).map_err(|e| err(Some(&fs), e))?;
        }
        fsconfig_set_string(fs.as_fd(), "upperdir", &self.upper).map_err(|e| err(Some(&fs), e))?;
        fsconfig_set_string(fs.as_fd(), "workdir", &self.work).map_err(|e| err(Some(&fs), e))?;
        fsconfig_set_string(fs.as_fd(), "redirect_dir", "on").map_err(|e| err(Some(&fs), e))?;
        fsconfig_set_flag(fs.as_fd(), "volatile").map_err(|e| err(Some(&fs), e))?;
        fsconfig_create(fs.as_fd()).map_err(|e| err(Some(&fs), e))?;
        fsmount(
            fs.as_fd(),
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::empty(),
        )
        .map_err(|e| err(Some(&fs), e))
    }
}

/// A read-only overlay of `lowers` (topmost first; at least two), as a detached mount: the merged view of a
/// checkpoint, for reading (diff) without a writable layer.
pub fn fsmount_readonly(lowers: &[std::path::PathBuf]) -> Result<OwnedFd> {
    let target = lowers.first().cloned().unwrap_or_default();
    let err = |fs: Option<&OwnedFd>, e: rustix::io::Errno| Error::Mount {
        target: target.clone(),
        source: e.into(),
        detail: fs.map(read_fs_log).unwrap_or_default(),
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| err(None, e))?;
    for lower in lowers {
        fsconfig_set_string(fs.as_fd(), "lowerdir+", lower).map_err(|e| err(Some(&fs), e))?;
    }
    fsconfig_set_string(fs.as_fd(), "redirect_dir", "follow").map_err(|e| err(Some(&fs), e))?;
    fsconfig_create(fs.as_fd()).map_err(|e| err(Some(&fs), e))?;
    fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY,
    )
    .map_err(|e| err(Some(&fs), e))
}

/// Reads the kernel's messages for a failed fs_context ("e overlayfs: ..."), which say far more than errno.
fn read_fs_log(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        out.push_str(" [");
        out.push_str(String::from_utf8_lossy(&buf[..n]).trim());
        out.push(']');
    }
    out
}
