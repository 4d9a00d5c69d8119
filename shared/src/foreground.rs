//! Whether this process's API is busy: the signal the embedded mode's pipeline yields to
//! (`waveline_pipeline::budget`, `pipeline_share_under_load`). The API marks every request as
//! it arrives, counted per [`WINDOW`]; the pipeline asks, once per block of work, whether the
//! current or the previous window has seen [`BUSY_REQUESTS`] requests. A rate, not a single
//! request: a page polling a track's status ten times a second is no load worth slowing a
//! transcode for, and a listener's player fetching ranges or segments by the dozen is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The span the requests are counted over.
pub const WINDOW: Duration = Duration::from_millis(100);
/// The requests in one window that make the API busy (100 a second).
pub const BUSY_REQUESTS: u64 = 10;

/// Bits of the packed word that hold the count; the window's number is above them.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The API's requests in the latest window that had any.
#[derive(Debug)]
pub struct Foreground {
    anchor: Instant,
    /// The window's number (from `anchor`, plus one: 0 is none yet) above `COUNT_BITS` bits
    /// of its count, so both change together.
    latest: AtomicU64,
}

impl Default for Foreground {
    fn default() -> Foreground {
        Foreground { anchor: Instant::now(), latest: AtomicU64::new(0) }
    }
}

impl Foreground {
    fn window_now(&self) -> u64 {
        let number = self.anchor.elapsed().as_nanos() / WINDOW.as_nanos();
        u64::try_from(number).unwrap_or(u64::MAX >> COUNT_BITS).min(u64::MAX >> COUNT_BITS) + 1
    }

    /// A request arrived.
    pub fn mark(&self) {
        let window = self.window_now();
        let _ = self.latest.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |latest| {
            Some(if latest >> COUNT_BITS == window {
                // Saturates: the count only has to reach BUSY_REQUESTS.
                latest + u64::from(latest & COUNT_MASK < COUNT_MASK)
            } else {
                (window << COUNT_BITS) | 1
            })
        });
    }

    /// Whether the current window, or the one before it, has seen [`BUSY_REQUESTS`] requests.
    /// (A window that has just begun has counted little yet: the previous one speaks for it.)
    pub fn busy(&self) -> bool {
        let latest = self.latest.load(Ordering::Relaxed);
        let (window, count) = (latest >> COUNT_BITS, latest & COUNT_MASK);
        window != 0 && self.window_now() - window <= 1 && count >= BUSY_REQUESTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_at_a_rate_of_requests_and_idle_once_it_stops() {
        let foreground = Foreground::default();
        assert!(!foreground.busy(), "busy before any request");
        foreground.mark();
        assert!(!foreground.busy(), "one request made the API busy");
        for _ in 1..BUSY_REQUESTS {
            foreground.mark();
        }
        // The ten marks may straddle two windows; ten more within the next window settle it.
        if !foreground.busy() {
            for _ in 0..BUSY_REQUESTS {
                foreground.mark();
            }
        }
        assert!(foreground.busy(), "idle after {BUSY_REQUESTS} requests at once");
        let marked = Instant::now();
        while foreground.busy() {
            assert!(marked.elapsed() < WINDOW * 5, "still busy {:?} after the requests", marked.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Busy until the window after the requests' window has passed.
        assert!(marked.elapsed() >= WINDOW / 2, "idle again after only {:?}", marked.elapsed());
    }

    #[test]
    fn a_slow_poller_is_no_load() {
        let foreground = Foreground::default();
        let started = Instant::now();
        while started.elapsed() < WINDOW * 4 {
            foreground.mark();
            assert!(!foreground.busy(), "a request every 30 ms made the API busy");
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}
