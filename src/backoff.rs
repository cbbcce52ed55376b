//! Retry delays and refresh schedules, one way for every outbound client (JWKS, Stripe, Twilio):
//! doubling steps from a base, capped, and jittered so instances that failed together (or
//! started together) do not call again in lockstep.

use std::time::Duration;

/// Step `n` (1-based) of a doubling backoff from `base`: `base`, `2 base`, `4 base`…, at most
/// `max`.
pub fn exponential(base: Duration, n: u32, max: Duration) -> Duration {
    base.saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(max)
}

/// "Equal jitter" for a retry: half of `step` plus a random part of the other half.
pub fn equal_jitter(step: Duration) -> Duration {
    let half = step / 2;
    let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(random_u64() % half_ms.saturating_add(1))
}

/// `d` scaled by a random factor in [0.9, 1.1], for a schedule (the JWKS refresh).
pub fn jitter(d: Duration) -> Duration {
    let r = (random_u64() & u64::from(u16::MAX)) as f64 / f64::from(u16::MAX);
    // `try_from` rather than `mul_f64`: an absurdly large configured TTL must not panic.
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.9 + 0.2 * r)).unwrap_or(d)
}

/// A random number for the jitter. A failing system RNG only costs the jitter (zero, so the
/// schedule stays correct), never the retry.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0;
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_from_the_base_up_to_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(500));
        let steps: Vec<_> = (1..=5)
            .map(|n| exponential(base, n, max).as_millis())
            .collect();
        assert_eq!(steps, [100, 200, 400, 500, 500]);
        assert_eq!(exponential(base, u32::MAX, Duration::MAX), base * (1 << 16));
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half_and_spreads() {
        let step = Duration::from_millis(1000);
        let seen: std::collections::HashSet<_> = (0..50)
            .map(|_| {
                let d = equal_jitter(step);
                assert!(d >= step / 2 && d <= step, "{d:?}");
                d
            })
            .collect();
        assert!(seen.len() > 1, "the delay is jittered");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let d = Duration::from_secs(1000);
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..200 {
            let j = jitter(d);
            assert!(
                j >= Duration::from_secs(900) && j <= Duration::from_secs(1100),
                "{j:?}"
            );
            seen_low |= j < d;
            seen_high |= j > d;
        }
        assert!(seen_low && seen_high, "jitter must spread both ways");
    }
}
