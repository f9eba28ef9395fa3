//! Errors of the sandbox runtime.

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong running sandboxes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the sandbox failed (namespaces, rootfs, hardening); the message comes from inside the child.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The sandbox's init is gone (killed, crashed, or the sandbox was removed).
    #[error("sandbox is not running")]
    SandboxDead,
    /// The command could not be started (no such program, bad working directory …).
    #[error("{0}")]
    Spawn(String),
    /// The request is invalid (empty argv, bad limit …).
    #[error("{0}")]
    Invalid(String),
    /// A filesystem generation switch (checkpoint) was refused or failed; the message says which process,
    /// descriptor or path was the reason.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// A session's process has exited.
    #[error("session has ended")]
    SessionDead,
    /// A cgroup operation failed.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The helper process that creates sandboxes failed.
    #[error("zygote: {0}")]
    Zygote(String),
    /// Filesystem layer error.
    #[error(transparent)]
    Fs(#[from] deltabox_fs::Error),
    /// Other I/O.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::Io(what, e)
    }
}
