//! Errors of the simulator: each names the field, file or column at fault and what is allowed.

use std::path::PathBuf;

/// What can go wrong setting up or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An input file (a run folder, a step log) could not be read or parsed.
    #[error("{path}: {message}")]
    Experiment {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The experiment file is unreadable or invalid.
    #[error(transparent)]
    Schema(Box<vajra_experiment::ExperimentError>),
    /// A profile file is missing, malformed or for another model.
    #[error("profile {path}: {message}")]
    Profile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model does not fit the device memory.
    #[error("memory: {0}")]
    Memory(String),
    /// The simulation cannot make progress.
    #[error("simulation stalled: {0}")]
    Stalled(String),
    /// Shared core rejected a config or request.
    #[error(transparent)]
    Core(#[from] vajra_core::CoreError),
    /// Workload building failed.
    #[error(transparent)]
    Workload(#[from] vajra_workload::WorkloadError),
    /// Metrics or output writing failed.
    #[error(transparent)]
    Metrics(#[from] vajra_metrics::MetricsError),
    /// A file could not be written.
    #[error("cannot write {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

impl SimError {
    /// An invalid-field error (a [`vajra_core::CoreError::InvalidField`]) from displayable
    /// parts.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        SimError::Core(vajra_core::CoreError::invalid(field, value, allowed))
    }
}

impl From<vajra_experiment::ExperimentError> for SimError {
    fn from(e: vajra_experiment::ExperimentError) -> Self {
        // Boxed: the schema's error holds the core's, the workload's and the metrics' inline.
        SimError::Schema(Box::new(e))
    }
}

/// Maps any displayable error about `path` into [`SimError::Write`].
pub(crate) fn write_err<E: std::fmt::Display>(
    path: &std::path::Path,
) -> impl FnOnce(E) -> SimError + '_ {
    move |e| SimError::Write {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SimError>;
