//! The tracker's error type: what can stop [`crate::run`] (per-connection problems never do).

use thiserror::Error;

/// Why the tracker could not start or keep running.
#[derive(Debug, Error)]
pub enum TrackerError {
    /// A command-line value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The open-file limit could not be raised to what the configuration needs.
    #[error("{0}")]
    Files(String),
    /// The state database could not be opened, read or written.
    #[error("state database {path}: {message}")]
    Store {
        /// The database file.
        path: String,
        /// What went wrong, and what to do about it.
        message: String,
    },
    /// The identity key could not be loaded, created or is unsafe to use.
    #[error("identity key: {0}")]
    Key(#[from] anomos_proto::ProtoError),
}

impl TrackerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TrackerError::Io { context: context.into(), source }
    }
}
