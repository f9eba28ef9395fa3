//! Errors of process checkpointing.

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong checkpointing or restoring a process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process cannot be checkpointed by forking it (and why).
    #[error("process {pid} cannot be checkpointed: {reason}")]
    Unsupported { pid: i32, reason: String },
    /// Injecting into the process (or its template) failed.
    #[error(transparent)]
    Inject(#[from] deltabox_sys::inject::InjectError),
    /// The template is gone (killed from inside the sandbox, or evicted).
    #[error("template {0} is gone")]
    TemplateGone(i32),
    /// Writing, reading or restoring a process image failed.
    #[error("{0}")]
    Image(String),
    /// The branch sandbox to fork into cannot be reached.
    #[error("{0}")]
    Branch(String),
}
