//! Time, read one way: [`Clock`], injectable so expiry, cool-downs and staleness are tested
//! without sleeping; [`Clock::now_ms`] is the unit of every stored time. The one `Clock` lives in
//! `AppState`, and everything that reads time is handed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic and wall time. [`Clock::system`] in production; [`Clock::manual`] in tests.
#[derive(Clone, Debug)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
enum Inner {
    System,
    Manual {
        base: Instant,
        base_wall: SystemTime,
        offset_ms: AtomicU64,
        /// How far the wall clock was stepped (`Clock::step_wall`), monotonic time unmoved.
        wall_step_ms: AtomicI64,
        /// How far each [`Clock::now_ms`] read moves the clock on (`Clock::manual_ticking`).
        tick_ms: u64,
    },
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The real clocks.
    pub fn system() -> Self {
        Self(Arc::new(Inner::System))
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual() -> Self {
        Self::manual_ticking(Duration::ZERO)
    }

    /// A manual clock that also moves on by `step` after each [`Clock::now_ms`] read, so two
    /// reads in one request see different times (an hour's turn between them, for a `step` of
    /// an hour): a test of what must be read once.
    pub fn manual_ticking(step: Duration) -> Self {
        Self(Arc::new(Inner::Manual {
            base: Instant::now(),
            base_wall: SystemTime::now(),
            offset_ms: AtomicU64::new(0),
            wall_step_ms: AtomicI64::new(0),
            tick_ms: u64::try_from(step.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Inner::Manual { offset_ms, .. } = &*self.0 {
            let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            offset_ms.fetch_add(ms, Ordering::SeqCst);
        }
    }

    /// Steps a manual clock's wall time by `by_ms` (back when negative) and leaves its monotonic
    /// time where it is, as an NTP step of a wrong clock does (after a VM restore, on a host whose
    /// clock was wrong at boot); does nothing to the system clock.
    pub fn step_wall(&self, by_ms: i64) {
        if let Inner::Manual { wall_step_ms, .. } = &*self.0 {
            wall_step_ms.fetch_add(by_ms, Ordering::SeqCst);
        }
    }

    fn offset(&self) -> Duration {
        match &*self.0 {
            Inner::System => Duration::ZERO,
            Inner::Manual { offset_ms, .. } => {
                Duration::from_millis(offset_ms.load(Ordering::SeqCst))
            }
        }
    }

    /// Monotonic now.
    pub fn now(&self) -> Instant {
        match &*self.0 {
            Inner::System => Instant::now(),
            Inner::Manual { base, .. } => *base + self.offset(),
        }
    }

    /// Wall-clock now.
    pub fn wall(&self) -> SystemTime {
        match &*self.0 {
            Inner::System => SystemTime::now(),
            Inner::Manual {
                base_wall,
                wall_step_ms,
                ..
            } => {
                let advanced = *base_wall + self.offset();
                let step = wall_step_ms.load(Ordering::SeqCst);
                let by = Duration::from_millis(step.unsigned_abs());
                if step < 0 {
                    advanced - by
                } else {
                    advanced + by
                }
            }
        }
    }

    /// Wall-clock now in whole seconds since the Unix epoch (JWT NumericDate).
    pub fn unix_now(&self) -> i64 {
        unix_seconds(self.wall())
    }

    /// Wall-clock now in milliseconds since the Unix epoch, the unit of every time column.
    pub fn now_ms(&self) -> i64 {
        match &*self.0 {
            Inner::System => epoch_ms(SystemTime::now()),
            Inner::Manual {
                offset_ms, tick_ms, ..
            } => {
                let now = epoch_ms(self.wall());
                if *tick_ms > 0 {
                    offset_ms.fetch_add(*tick_ms, Ordering::SeqCst);
                }
                now
            }
        }
    }
}

/// Milliseconds since the Unix epoch; 0 before it.
fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Refuses a wall clock before the Unix epoch, which a host whose clock was never set can read:
/// nothing stored or sent (`Date`, tokens' times, Stripe's) has a meaning before it.
pub fn after_epoch(t: SystemTime) -> anyhow::Result<()> {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => Ok(()),
        Err(before) => anyhow::bail!(
            "the system clock reads {} s before 1970-01-01: set the host's clock (NTP) and \
             start again",
            before.duration().as_secs()
        ),
    }
}

/// Seconds since the Unix epoch; negative before it.
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock before 1970 is refused with a line saying so and what to do; the epoch itself
    /// is a time like any other.
    #[test]
    fn a_wall_clock_before_the_epoch_is_refused_saying_so() {
        let before = UNIX_EPOCH - Duration::from_secs(3_600);
        let err = after_epoch(before).expect_err("before 1970").to_string();
        assert!(
            err.contains("3600 s before 1970-01-01") && err.contains("NTP"),
            "{err}"
        );
        assert!(after_epoch(UNIX_EPOCH).is_ok());
        assert!(after_epoch(SystemTime::now()).is_ok());
    }
}
