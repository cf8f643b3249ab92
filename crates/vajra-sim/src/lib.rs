//! # vajra-sim
//!
//! The discrete-event simulator: a cluster of replicas, each running the shared vajra-core
//! scheduler and block manager (with real block identities), timed by a profile-driven
//! execution-time predictor.
//!
//! Experiment files, sweeps and the device and model catalog are `vajra-experiment`'s (the
//! engine reads the same schema).
//!
//! - [`memory`]: KV capacity per replica.
//! - [`predictor`]: batch → per-stage duration, from measured profiles or a roofline model.
//! - [`sim`]: the event loop.
//! - [`run`]: one point → a run folder; [`sweep`]: every point, in parallel.
//! - [`profiles`]: generating roofline profiles and measuring the predictor's error.

pub mod capacity;
pub mod cleanup;
pub mod error;
pub mod fidelity;
pub mod memory;
pub mod predictor;
pub mod profiles;
pub mod report;
pub mod run;
pub mod sim;
pub mod sweep;
pub mod twin;
pub mod vllm;

pub use error::{Result, SimError};
