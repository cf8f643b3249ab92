//! # vajra-metrics
//!
//! One metrics code path for simulated and real runs: lifecycle events in, metrics out.
//!
//! - [`collector::Collector`] takes arrivals, per-token times and finished records (from the
//!   scheduler's [`vajra_core::sched::output::FinishedRecord`]) and keeps per-request records,
//!   pooled inter-token gaps (exact) and Etalon deadline counts, online.
//! - [`summary::Summary`] computes TTFT, TBT, TPOT, E2E, normalized E2E, scheduling delay,
//!   preemptions, prefix-cache hit rate, throughput, goodput, SLO attainment, deadline miss
//!   rate and fluidity index, batch distributions and per-replica utilisation (KV usage, busy
//!   time, MFU, MBU with tera = 10¹²).
//! - [`output`] writes a run folder: `requests.csv`, `requests.parquet`, `batches.parquet`,
//!   `summary.json`, `cdf/<metric>.csv`.
//!
//! Definitions (`docs/metrics.md`): TTFT = first token − arrival; TBT = every gap
//! between consecutive output tokens, pooled over requests; TPOT = (E2E − TTFT)/(n − 1) per
//! request with n ≥ 2 output tokens; normalized E2E = E2E / n; scheduling delay = first
//! scheduled − arrival. Percentiles interpolate linearly and are exact.

pub mod collector;
pub mod error;
pub mod outcomes;
pub mod output;
pub mod slo;
pub mod stats;
pub mod steplog;
pub mod summary;

pub use collector::{BatchRecord, Collector, RequestRecord};
pub use error::{MetricsError, Result};
pub use slo::SloConfig;
pub use summary::Summary;
