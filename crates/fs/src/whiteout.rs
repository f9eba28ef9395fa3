//! overlayfs whiteouts and opaque directories, as overlays mounted by host root read them (`trusted.*`).

use std::path::Path;

use rustix::fs::{FileType, Mode};

use crate::{Error, Result};

/// Opaque marker xattr (the overlay is mounted by host root, without `userxattr`).
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Creates a whiteout at `path`: a 0/0 character device, which hides the same name in lower layers.
pub fn make_whiteout(path: &Path) -> Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    )
    .map_err(|e| Error::io("create whiteout", path)(e.into()))
}

/// Marks directory `path` opaque: lower layers' entries under it are hidden.
pub fn make_opaque(path: &Path) -> Result<()> {
    rustix::fs::setxattr(path, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())
        .map_err(|e| Error::io("mark opaque", path)(e.into()))
}

/// Whether `path` is a whiteout.
pub fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}
