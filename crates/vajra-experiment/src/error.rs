//! Errors of reading an experiment file: each names the file, field or key at fault and what is
//! allowed.

use std::path::PathBuf;

/// What can be wrong with an experiment file.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The file (or a file it names) could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A scheduler, router, cache or model field is invalid.
    #[error(transparent)]
    Core(#[from] vajra_core::CoreError),
    /// The workload is invalid.
    #[error(transparent)]
    Workload(#[from] vajra_workload::WorkloadError),
    /// The SLOs are invalid.
    #[error(transparent)]
    Metrics(#[from] vajra_metrics::MetricsError),
}

impl ExperimentError {
    /// An invalid-field error (a [`vajra_core::CoreError::InvalidField`]) from displayable
    /// parts.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        ExperimentError::Core(vajra_core::CoreError::invalid(field, value, allowed))
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ExperimentError>;
