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
    /// The identity key could not be loaded, created or is unsafe to use.
    #[error("identity key: {0}")]
    Key(#[from] anomos_proto::ProtoError),
}

impl TrackerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TrackerError::Io { context: context.into(), source }
    }
}
