//! Errors of metric configuration and run-folder output.

use std::path::PathBuf;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A config field holds a value that is not allowed.
    #[error(transparent)]
    Invalid(#[from] vajra_core::CoreError),
    /// A file could not be written.
    #[error("cannot write {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, MetricsError>;

/// `Err(invalid field)` unless `ok`.
pub(crate) fn ensure(
    ok: bool,
    field: &str,
    value: impl std::fmt::Display,
    allowed: &str,
) -> Result<()> {
    Ok(vajra_core::error::ensure(ok, field, value, allowed)?)
}

/// Maps any displayable error on `path` into [`MetricsError::Write`].
pub(crate) fn write_err<E: std::fmt::Display>(
    path: &std::path::Path,
) -> impl FnOnce(E) -> MetricsError + '_ {
    move |e| MetricsError::Write {
        path: path.to_owned(),
        message: e.to_string(),
    }
}
