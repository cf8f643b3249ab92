//! Integer-nanosecond time. Inside the core and the simulator, time is a [`Timestamp`] (a
//! point, nanoseconds since the start of the run) or a [`Duration`] (a span). Floating-point
//! seconds appear only at the edges (reports, JSON), through the explicit conversions here.
//! Arithmetic saturates rather than wraps: a subtraction that would go negative is zero.

use serde::{Deserialize, Serialize};
use std::ops::{Add, AddAssign, Sub};

/// Nanoseconds in one second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The latest time a run may reach, in seconds (about 317 years): far below where integer
/// nanoseconds run out (about 584 years), so that adding a request's latency to an arrival never
/// saturates. Arrivals, windows and simulated clocks past it are errors, not silently clamped
/// times.
pub const MAX_SECS: f64 = 1.0e10;

/// A point in time: nanoseconds since the run started.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

/// A span of time in nanoseconds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Duration(pub u64);

impl Timestamp {
    /// The start of the run.
    pub const ZERO: Timestamp = Timestamp(0);
    /// A time later than any real event (used as "never").
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// From seconds (rounded to the nearest nanosecond; negative and NaN become 0).
    pub fn from_secs_f64(secs: f64) -> Self {
        Timestamp(secs_to_nanos(secs))
    }
    /// As seconds.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }
    /// The span from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }
}

impl Duration {
    /// No time.
    pub const ZERO: Duration = Duration(0);

    /// From seconds (rounded to the nearest nanosecond; negative and NaN become 0).
    pub fn from_secs_f64(secs: f64) -> Self {
        Duration(secs_to_nanos(secs))
    }
    /// From whole milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(ms * 1_000_000)
    }
    /// From whole microseconds.
    pub const fn from_micros(us: u64) -> Self {
        Duration(us * 1_000)
    }
    /// As seconds.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }
}

fn secs_to_nanos(secs: f64) -> u64 {
    if secs.is_nan() || secs <= 0.0 {
        0
    } else {
        (secs * NANOS_PER_SEC as f64).round() as u64
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.0))
    }
}

impl AddAssign<Duration> for Timestamp {
    fn add_assign(&mut self, d: Duration) {
        self.0 = self.0.saturating_add(d.0);
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = Duration;
    fn sub(self, earlier: Timestamp) -> Duration {
        self.since(earlier)
    }
}

impl Add for Duration {
    type Output = Duration;
    fn add(self, o: Duration) -> Duration {
        Duration(self.0.saturating_add(o.0))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.9}s", self.as_secs_f64())
    }
}

impl std::fmt::Display for Duration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.9}s", self.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_trip_through_nanoseconds() {
        let t = Timestamp::from_secs_f64(1.5);
        assert_eq!(t, Timestamp(1_500_000_000));
        assert_eq!(t.as_secs_f64(), 1.5);
    }

    #[test]
    fn subtraction_saturates_at_zero() {
        assert_eq!(Timestamp(5) - Timestamp(9), Duration::ZERO);
        assert_eq!(Timestamp(9) - Timestamp(5), Duration(4));
    }

    #[test]
    fn negative_and_nan_seconds_become_zero() {
        assert_eq!(Duration::from_secs_f64(-1.0), Duration::ZERO);
        assert_eq!(Duration::from_secs_f64(f64::NAN), Duration::ZERO);
    }
}
