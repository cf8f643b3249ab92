//! Errors of workload building: each names the field, file, line or column at fault and what is
//! allowed.

use std::path::PathBuf;

/// What can go wrong building a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A config field holds a value that is not allowed.
    #[error(transparent)]
    Invalid(#[from] vajra_core::CoreError),
    /// A trace file could not be opened or read.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A trace lacks a column its format needs.
    #[error(
        "trace {path}: missing column `{column}` (format {format} needs {needed}; found: {found})"
    )]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The format being read.
        format: String,
        /// Every column the format needs.
        needed: String,
        /// The columns present.
        found: String,
    },
    /// A row of a trace could not be parsed.
    #[error("trace {path}, line {line}: {message}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong, naming the column.
        message: String,
    },
    /// A trace has no usable rows.
    #[error("trace {path}: {message}")]
    EmptyTrace {
        /// The file.
        path: PathBuf,
        /// Why (empty file, empty time window).
        message: String,
    },
    /// A trace's arrival times cannot be simulated (past the clock: a unit mistake).
    #[error("trace {path}: {message}")]
    TraceTimes {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, WorkloadError>;

impl WorkloadError {
    /// An invalid-field error from displayable parts.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        WorkloadError::Invalid(vajra_core::CoreError::invalid(field, value, allowed))
    }
}

/// `Err(invalid field)` unless `ok`.
pub(crate) fn ensure(
    ok: bool,
    field: &str,
    value: impl std::fmt::Display,
    allowed: &str,
) -> Result<()> {
    Ok(vajra_core::error::ensure(ok, field, value, allowed)?)
}
