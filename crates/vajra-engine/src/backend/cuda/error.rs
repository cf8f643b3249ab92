//! The backend's errors.

use super::*;

pub(super) fn err(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend {
        backend: "cuda".into(),
        message: message.to_string(),
    }
}
