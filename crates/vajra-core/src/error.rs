//! Errors of `vajra-core`: bad user input (configs, requests, sampling parameters) and
//! misuse of the scheduler API. Running out of KV blocks is never an error (it is an
//! `Option`), and a broken internal invariant is a panic that names the invariant.

use crate::ids::RequestId;

/// Everything that can go wrong in `vajra-core` because of the caller's input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    /// A field of a config, request or sampling parameter holds a value that is not allowed.
    #[error("invalid value for `{field}`: {value} (allowed: {allowed})")]
    InvalidField {
        /// Dotted path of the field, e.g. `cache.block_size`.
        field: String,
        /// The offending value, rendered.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// A request id was added twice.
    #[error("request {0} was already added to this scheduler")]
    DuplicateRequest(RequestId),
    /// A request id is not known to the scheduler.
    #[error("request {0} is not known to this scheduler")]
    UnknownRequest(RequestId),
    /// A Hugging Face `config.json` could not be read into a [`crate::config::ModelConfig`].
    #[error("cannot read model config: {0}")]
    ModelConfig(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    /// Builds an [`CoreError::InvalidField`] from displayable parts.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        CoreError::InvalidField {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// Returns `Err(InvalidField)` unless `ok` holds. Keeps `validate()` bodies one line per rule;
/// the other crates' config checks use it too (their errors wrap [`CoreError`]).
pub fn ensure(ok: bool, field: &str, value: impl std::fmt::Display, allowed: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(field, value, allowed))
    }
}
