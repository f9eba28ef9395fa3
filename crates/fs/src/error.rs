//! Errors of the filesystem layer.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong building base images and mounting layer stacks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference names nothing usable.
    #[error("image {path}: {reason}")]
    BadImage { path: PathBuf, reason: String },
    /// An OCI archive or layout is malformed, truncated or unsafe (e.g. a path escaping the root).
    #[error("corrupt image {path}: {reason}")]
    CorruptImage { path: PathBuf, reason: String },
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Mounting an overlay failed; `detail` carries the kernel's fs_context log when there is one.
    #[error("mount overlay on {target}: {source}{detail}")]
    Mount {
        target: PathBuf,
        source: std::io::Error,
        detail: String,
    },
}

impl Error {
    /// Wraps an I/O error with the operation and path it concerns.
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
