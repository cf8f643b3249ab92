//! # vajra-core
//!
//! The code both halves of Vajra share: the simulator and the real engine drive the very same
//! scheduler and paged KV-cache block manager defined here.
//!
//! What this crate owns:
//! - [`ids`] and [`time`]: typed identifiers and integer-nanosecond time.
//! - [`request`] and [`sampling`]: what a user asks for, validated.
//! - [`config`]: model, cache and parallel configuration (serde, validated once).
//! - [`kv`]: the block pool (reference counts, intrusive LRU free list), chained block hashes
//!   and prefix caching, host blocks for swap.
//! - [`sched`]: the scheduler state machine (`add_request` → `schedule` →
//!   `update_from_output`) and its policies (`vllm_v1`, `sarathi`, `vllm_v0`, `orca`,
//!   `faster_transformer`, `lightllm`), waiting-queue orders and preemption modes.
//! - [`driver`]: one replica's loop (schedule → execute → update, steps in flight, a record
//!   per step), driven by the simulator's event loop and by the engine loop alike.
//! - [`router`]: global routing policies across replicas.
//!
//! Invariants: this crate never reads a clock, never does I/O and never owns a random number
//! generator. `now` and randomness come in as arguments, which is what lets a simulated run and
//! a real run execute the same decisions.

pub mod config;
pub mod driver;
pub mod error;
pub mod ids;
pub mod kv;
pub mod request;
pub mod router;
pub mod sampling;
pub mod sched;
pub mod time;

pub use error::{CoreError, Result};
