//! Errors of the segmented log.

use std::io;
use std::path::PathBuf;

/// Everything a [`crate::log::PartitionLog`] call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An append did not start right after the last entry (or after the purge point).
    #[error("non-contiguous append: expected index {expected}, got {got}")]
    NonContiguous { expected: u64, got: u64 },
    /// An index at the end of the `u64` range (the next index would not exist).
    #[error("index {index} is at the end of the index range")]
    IndexOverflow { index: u64 },
    /// Options the log cannot work with.
    #[error("invalid log options: {0}")]
    InvalidOptions(String),
    /// A data entry's payload is not a well-formed Kafka RecordBatch v2 header.
    #[error("invalid record batch at index {index}: {reason}")]
    InvalidBatch { index: u64, reason: &'static str },
    /// An entry (frame included) is larger than the configured maximum.
    #[error("entry at index {index} is {size} bytes, above the limit of {limit}")]
    EntryTooLarge {
        index: u64,
        size: usize,
        limit: usize,
    },
    /// `reset_after` was asked to reset inside the log (it would drop entries).
    #[error("cannot reset the log to continue after index {index}: it holds entries up to {last}")]
    ResetInsideLog { index: u64, last: u64 },
    /// A requested index lies before the first retained entry.
    #[error("index {index} was purged (log starts at {first})")]
    Purged { index: u64, first: u64 },
    /// A record offset outside `[start, end]` (log-start to log-end offset).
    #[error("offset {offset} is out of range [{start}, {end}]")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    /// A sealed segment failed its checks where recovery cannot repair it.
    #[error("corrupt segment {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The log hit an I/O error earlier and refuses further writes until reopened.
    #[error("log is failed after an earlier I/O error: {0}")]
    Failed(String),
    /// The log was closed.
    #[error("log is closed")]
    Closed,
    /// An I/O error from the file system.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        LogError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of log operations.
pub type Result<T, E = LogError> = std::result::Result<T, E>;
