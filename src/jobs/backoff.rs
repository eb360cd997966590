//! Retry delays: exponential with full jitter, so jobs that failed together (a provider outage)
//! do not all come back at the same moment.

use std::time::Duration;

/// The delay after failed attempt `attempt` (from 1): a random point between half and all of
/// `base * 2^(attempt-1)`, capped at `max`.
pub fn exponential(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
    let ceiling = base.saturating_mul(1u32 << exponent).min(max);
    let half = ceiling / 2;
    half + half.mul_f64(unit_random())
}

/// A uniform number in [0, 1).
fn unit_random() -> f64 {
    // Entropy failing is not a reason to fail a retry: fall back to no jitter.
    let bits = getrandom::u64().unwrap_or(0);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_jitter_and_caps() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for attempt in 1..=10 {
            let ceiling = (base * 2u32.pow(u32::try_from(attempt - 1).unwrap())).min(max);
            for _ in 0..50 {
                let d = exponential(attempt, base, max);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
        assert!(exponential(i32::MAX, base, max) <= max);
        assert!(exponential(0, base, max) <= base);
    }
}
