//! Rate limit for log lines a peer (or a storm of peers) can trigger in a loop.
//!
//! A log line per bad request or per failed accept lets one misbehaving client fill a disk.
//! A [`Throttle`] lets a few lines per window through and counts the rest. The next line that
//! gets through says how many were dropped; if none comes, the loop asks
//! [`Throttle::take_overdue`] when the window is over and logs the count on its own, so a
//! burst followed by silence is never under-reported.

use std::time::{Duration, Instant};

/// Lines allowed per window.
pub const DEFAULT_BURST: u32 = 10;
/// Window length.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// A fixed-window counter: at most `burst` lines per `window`.
#[derive(Debug)]
pub struct Throttle {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
    reported: u64,
    /// When the dropped lines not yet reported are due to be reported (kept, not computed,
    /// because the loop asks every turn).
    report_at: Option<Instant>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl Throttle {
    /// At most `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Throttle {
        Throttle {
            burst,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
            reported: 0,
            report_at: None,
        }
    }

    /// Whether a line may be logged now.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`Throttle::allow`] with an explicit clock, for tests.
    pub fn allow_at(&mut self, now: Instant) -> bool {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.window)
        {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            self.report_at = self.window_start.map(|start| start + self.window);
            false
        }
    }

    /// When the count of dropped lines not yet reported should be logged: the end of the
    /// current window, if any line was dropped in it. The loop wakes up for it.
    #[inline]
    pub fn report_due(&self) -> Option<Instant> {
        self.report_at
    }

    /// Lines dropped and not yet reported, with the window length, once the window they were
    /// dropped in is over (then they count as reported).
    pub fn take_overdue(&mut self, now: Instant) -> Option<(u64, Duration)> {
        match self.report_at {
            Some(due) if due <= now => {
                let new = self.suppressed - self.reported;
                self.reported = self.suppressed;
                self.report_at = None;
                Some((new, self.window))
            }
            _ => None,
        }
    }

    /// Text to append to an allowed line: how many lines were dropped since the last note.
    pub fn suppressed_note(&mut self) -> String {
        let new = self.suppressed - self.reported;
        self.reported = self.suppressed;
        self.report_at = None;
        if new == 0 {
            String::new()
        } else {
            format!(" ({new} similar lines suppressed)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window_then_reports_what_it_dropped() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(2, Duration::from_secs(1));
        assert!(throttle.allow_at(t0));
        assert!(throttle.allow_at(t0));
        assert!(!throttle.allow_at(t0 + Duration::from_millis(500)));
        assert!(!throttle.allow_at(t0 + Duration::from_millis(999)));
        assert!(throttle.allow_at(t0 + Duration::from_secs(1)));
        assert_eq!(throttle.suppressed_note(), " (2 similar lines suppressed)");
        assert_eq!(throttle.suppressed_note(), "");
    }

    #[test]
    fn drops_are_reported_when_the_window_ends_even_if_no_line_follows() {
        let t0 = Instant::now();
        let window = Duration::from_secs(1);
        let mut throttle = Throttle::new(2, window);
        assert_eq!(throttle.report_due(), None);
        for _ in 0..5 {
            throttle.allow_at(t0);
        }
        assert_eq!(throttle.report_due(), Some(t0 + window));
        assert_eq!(throttle.take_overdue(t0 + window / 2), None);
        assert_eq!(throttle.take_overdue(t0 + window), Some((3, window)));
        assert_eq!(throttle.take_overdue(t0 + 2 * window), None);
        assert_eq!(throttle.report_due(), None);
        // Reported once: the next allowed line does not count them again.
        assert!(throttle.allow_at(t0 + 2 * window));
        assert_eq!(throttle.suppressed_note(), "");
    }
}
