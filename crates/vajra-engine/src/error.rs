//! Errors of the engine: each names the file, tensor or field at fault and what is allowed.

use std::path::PathBuf;

/// What can go wrong loading a model or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model folder must contain is absent.
    #[error("{path}: missing ({what})")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What it is needed for.
        what: String,
    },
    /// A model file exists but cannot be read or does not describe a supported model.
    #[error("{path}: {message}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor is missing or has the wrong shape or type.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name in the checkpoint.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A backend failed or is unavailable.
    #[error("backend {backend}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What failed.
        message: String,
    },
    /// The CUDA backend failed (a missing library or device, the driver, cuBLAS, NVRTC).
    #[cfg(feature = "cuda")]
    #[error("backend cuda: {0}")]
    Cuda(#[from] crate::backend::cuda::CudaError),
    /// An experiment file is unreadable or invalid (names the file, key and what is allowed).
    #[error(transparent)]
    Experiment(#[from] vajra_experiment::ExperimentError),
    /// The shared core rejected a config or request (names the field and what is allowed).
    #[error(transparent)]
    Core(#[from] vajra_core::CoreError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// An invalid-field error (a [`vajra_core::CoreError::InvalidField`]) from displayable
    /// parts.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        EngineError::Core(vajra_core::CoreError::invalid(field, value, allowed))
    }

    /// A [`EngineError::ModelFile`] error.
    pub fn model_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        EngineError::ModelFile {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
