//! # vajra-experiment
//!
//! The experiment schema, below both binaries: `vajra-sim` reads whole experiment files and
//! sweeps through it, and `vajra-engine` (`serve --experiment`, `bench`) reads the sections it
//! uses through the same types, so a file means one thing to every command.
//!
//! - [`experiment`]: the experiment file, its `[sweep]` expansion and its validation.
//! - [`sections`]: the same file with every section optional (the engine's commands).
//! - [`catalog`]: built-in devices and model shapes (one `config.json` text per model).
//! - [`predictor`]: the `[predictor]` table (the predictor itself is vajra-sim's).

pub mod catalog;
pub mod error;
pub mod experiment;
pub mod predictor;
pub mod sections;

pub use error::{ExperimentError, Result};
pub use experiment::{Experiment, ExperimentFile, Point};
pub use sections::Sections;
