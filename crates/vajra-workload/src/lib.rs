//! # vajra-workload
//!
//! What arrives at a simulated (or benchmarked) cluster, and when:
//!
//! - [`config`]: the `[workload]` table of an experiment file (serde, validated).
//! - [`arrival`]: arrival processes — Poisson, gamma (CV form), constant rate, all at once.
//! - [`length`]: length distributions — fixed, uniform, Zipf, lognormal, trace-sampled — and
//!   max-token clipping that keeps the prefill:decode ratio.
//! - [`trace`]: readers for Vidur's processed CSV, the Azure LLM inference traces 2023/2024 and
//!   Mooncake-style JSONL with prefix-group ids.
//! - [`source`]: the [`source::RequestSource`] the simulator pulls requests from, in arrival
//!   order; open loop (pre-timed) or closed loop (N clients with think time, fed back on
//!   completion).
//! - [`session`]: multi-turn sessions (open-loop sessions, closed-loop turns, each turn's
//!   prompt the conversation so far).
//!
//! Every random draw comes from a stream derived from the run's root seed and a fixed stream
//! name ([`derive_seed`]), so the same seed gives the same requests byte for byte.

pub mod arrival;
pub mod config;
pub mod error;
pub mod length;
pub mod session;
pub mod source;
pub mod trace;

pub use config::WorkloadConfig;
pub use error::{Result, WorkloadError};
pub use source::RequestSource;

/// A seed for the named stream of a run with root seed `root` (SplitMix64 finaliser over the
/// root and an FNV-1a hash of the name): streams are independent of each other and of the order
/// in which components are built.
pub fn derive_seed(root: u64, stream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = root ^ h.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::derive_seed;

    #[test]
    fn derived_seeds_differ_by_stream_and_root_and_are_stable() {
        assert_ne!(derive_seed(1, "arrival"), derive_seed(1, "lengths"));
        assert_ne!(derive_seed(1, "arrival"), derive_seed(2, "arrival"));
        assert_eq!(derive_seed(7, "x"), derive_seed(7, "x"));
    }
}
