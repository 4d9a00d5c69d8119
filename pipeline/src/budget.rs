//! The thread budget: how many of the pipeline's threads may compute at once.
//!
//! A pass runs one thread per stage (decode, loudness, one feeder per encoder rate, one per
//! encoder: ten with the default ladder), so on a small machine it would take every core
//! whenever it can. A [`ThreadBudget`] of N permits caps that: a stage holds a permit while
//! it works on a block and gives it back before it waits on a channel, so at most N of the
//! pass's threads are ever on a CPU together, and a thread waiting for a permit sleeps.
//!
//! Never holding a permit across a channel operation is what keeps this free of deadlock: a
//! thread blocked on a full or empty channel holds nothing another thread needs, so whichever
//! thread can make progress can always get a permit.
//!
//! One budget is shared by every pass of a process (a worker's jobs at any concurrency), so
//! `pipeline_threads = 1` in the embedded mode leaves the other cores to the API however many
//! jobs run. FFmpeg's codecs are opened with one thread each ([`codec_threads`]): they
//! compute on the stage thread that calls them, inside its permit, and never behind the
//! budget's back.
//!
//! **Yielding to the foreground** ([`ThreadBudget::yielding`]). A lower scheduling priority
//! decides who gets a core when both want it, but a pipeline thread that fills the cores'
//! idle moments still costs the process's other threads their wake-ups and caches: measured
//! on 2 cores, a `SCHED_IDLE` spinner alone raised a range server's p99 by 10–50 %, and a
//! nice-10 one by 40 %, while the same nice-10 spinner computing 5 ms in every 20 cost 12 %.
//! So while the foreground (the API's requests, in the embedded mode) is busy, a yielding
//! budget also rations time: its permits together may be held for at most `share` of the
//! wall time of each of its `limit` threads, in bursts of at most [`BURST`]. The credit is a
//! token bucket, refilled at `share × limit` seconds per second and spent by the time each
//! permit is held; a thread that asks for a permit in debt sleeps until the debt is paid. An
//! idle foreground fills the bucket at once, so the pipeline runs at full speed whenever
//! nobody is listening, and a busy one never stops the pipeline (it keeps `share`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The longest a yielding budget's threads compute at a stretch (per permit slot) while the
/// foreground is busy.
pub const BURST: Duration = Duration::from_millis(5);
/// The fewest a yielding budget keeps of its threads' time while the foreground is busy.
pub const MIN_SHARE: f64 = 0.05;

/// Whether the foreground is busy now (see [`ThreadBudget::yielding`]); called once per
/// permit, so it must be cheap (an atomic load).
pub type ForegroundBusy = Arc<dyn Fn() -> bool + Send + Sync>;

/// Threads FFmpeg may give one codec: none beyond the caller's own.
pub(crate) fn codec_threads() -> ffmpeg_next::codec::threading::Config {
    ffmpeg_next::codec::threading::Config::count(1)
}

/// At most `limit` pipeline threads computing at once, across every pass that shares it.
#[derive(Clone)]
pub struct ThreadBudget {
    shared: Arc<Shared>,
}

struct Shared {
    limit: usize,
    state: Mutex<State>,
    freed: Condvar,
    yielding: Option<Yielding>,
}

/// What a yielding budget yields to, and how much it keeps.
struct Yielding {
    busy: ForegroundBusy,
    /// Seconds of permit time per second of wall time, for all the slots together.
    rate: f64,
    /// The most credit that can build up (a burst for every slot).
    cap: Duration,
}

struct State {
    busy: usize,
    /// The most permits ever held at once, for tests and the bench.
    peak: usize,
    /// Permit time the pipeline may still spend while the foreground is busy (negative: a
    /// debt the next permits wait off).
    credit: f64,
    /// When the credit was last brought up to date.
    refilled: Instant,
    /// How long the budget's threads have waited for the foreground, in all.
    yielded: Duration,
}

impl std::fmt::Debug for ThreadBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadBudget").field("limit", &self.shared.limit).finish_non_exhaustive()
    }
}

impl ThreadBudget {
    /// A budget of `limit` threads (at least one).
    pub fn new(limit: usize) -> ThreadBudget {
        ThreadBudget::build(limit, None)
    }

    /// A budget of `limit` threads that yields to a foreground: while `busy` answers true,
    /// its threads compute at most `share` (from [`MIN_SHARE`] to 1) of the time each, in
    /// bursts of at most [`BURST`] (see the module docs). A share of 1 yields nothing.
    pub fn yielding(limit: usize, share: f64, busy: ForegroundBusy) -> ThreadBudget {
        let limit = limit.max(1);
        let share = if share.is_finite() { share.clamp(MIN_SHARE, 1.0) } else { 1.0 };
        let yielding = (share < 1.0).then(|| Yielding { busy, rate: share * limit as f64, cap: BURST * limit as u32 });
        ThreadBudget::build(limit, yielding)
    }

    fn build(limit: usize, yielding: Option<Yielding>) -> ThreadBudget {
        let credit = yielding.as_ref().map_or(0.0, |yielding| yielding.cap.as_secs_f64());
        let state = State { busy: 0, peak: 0, credit, refilled: Instant::now(), yielded: Duration::ZERO };
        ThreadBudget {
            shared: Arc::new(Shared { limit: limit.max(1), state: Mutex::new(state), freed: Condvar::new(), yielding }),
        }
    }

    /// As many threads as this process may run on at once (its CPU affinity and cgroup
    /// quota, as [`std::thread::available_parallelism`] sees them).
    pub fn all_cores() -> ThreadBudget {
        ThreadBudget::new(cores())
    }

    /// The number of threads that may compute at once.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// The most threads that have computed at once since this budget was made.
    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    /// The share of its threads' time the budget keeps while the foreground is busy (1 for
    /// a budget that does not yield).
    pub fn share(&self) -> f64 {
        self.shared.yielding.as_ref().map_or(1.0, |yielding| yielding.rate / self.shared.limit as f64)
    }

    /// How long the budget's threads have waited for a busy foreground, in all.
    pub fn yielded(&self) -> Duration {
        self.lock().yielded
    }

    /// Waits for a permit; the work it covers ends when the permit is dropped. Never hold
    /// one across a channel operation (see the module docs).
    pub fn permit(&self) -> Permit<'_> {
        let mut state = self.lock();
        loop {
            if state.busy >= self.shared.limit {
                state = self.shared.freed.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let Some(debt) = self.debt(&mut state) else { break };
            // Slept off outside the lock and away from the condition variable, whose
            // notifications are for the threads waiting on a free slot.
            drop(state);
            let started = Instant::now();
            std::thread::sleep(debt);
            state = self.lock();
            state.yielded += started.elapsed();
        }
        state.busy += 1;
        state.peak = state.peak.max(state.busy);
        Permit { budget: self, since: self.shared.yielding.as_ref().map(|_| Instant::now()) }
    }

    /// Brings the credit up to date; answers how long to wait before computing, when the
    /// foreground is busy and the credit spent.
    fn debt(&self, state: &mut State) -> Option<Duration> {
        let yielding = self.shared.yielding.as_ref()?;
        let now = Instant::now();
        let cap = yielding.cap.as_secs_f64();
        if !(yielding.busy)() {
            state.credit = cap;
            state.refilled = now;
            return None;
        }
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.credit = (state.credit + elapsed * yielding.rate).min(cap);
        state.refilled = now;
        if state.credit > 0.0 {
            return None;
        }
        // Waiting for the debt alone would wake into a credit of zero: wait for a little
        // credit too (a tenth of a burst), so the permit after the wait can be granted.
        let owed = -state.credit + cap / (10.0 * self.shared.limit as f64);
        Some(Duration::from_secs_f64(owed / yielding.rate).max(Duration::from_micros(100)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The counters stay consistent whatever panicked while holding the lock.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The number of cores this process may use (1 where it cannot be told).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The right to compute on one block; returned when dropped.
#[derive(Debug)]
#[must_use = "the permit covers the work done while it is held"]
pub struct Permit<'a> {
    budget: &'a ThreadBudget,
    /// When it was granted, for a yielding budget's credit.
    since: Option<Instant>,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.busy -= 1;
        if let Some(since) = self.since {
            state.credit -= since.elapsed().as_secs_f64();
        }
        drop(state);
        self.budget.shared.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn at_most_the_limit_hold_a_permit_at_once() {
        let budget = ThreadBudget::new(2);
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        let _permit = budget.permit();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 2, "{} held permits at once", most.load(Ordering::SeqCst));
        // Eight threads yielding while they hold a permit: both permits were in use at once.
        assert_eq!(budget.peak(), 2);
    }

    #[test]
    fn a_waiting_thread_goes_on_when_a_permit_is_returned() {
        let budget = ThreadBudget::new(1);
        let held = budget.permit();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _permit = budget.permit();
                tx.send(()).expect("the test waits");
            });
            drop(held);
            rx.recv().expect("the waiting thread got the permit");
        });
        // Never two at once: the second thread had its permit only after the first was returned.
        assert_eq!(budget.peak(), 1);
    }

    /// One thread taking permits and computing `each` inside every one, for `wall`; answers
    /// the time it computed and the wall time it took.
    fn compute_for(budget: &ThreadBudget, each: Duration, wall: Duration) -> (Duration, Duration) {
        let started = Instant::now();
        let mut computed = Duration::ZERO;
        while started.elapsed() < wall {
            let _permit = budget.permit();
            let block = Instant::now();
            while block.elapsed() < each {
                std::hint::spin_loop();
            }
            computed += block.elapsed();
        }
        (computed, started.elapsed())
    }

    #[test]
    fn a_busy_foreground_leaves_the_pipeline_its_share_and_no_more() {
        let budget = ThreadBudget::yielding(1, 0.25, Arc::new(|| true));
        assert!((budget.share() - 0.25).abs() < 1e-9);
        let each = Duration::from_millis(1);
        let (computed, wall) = compute_for(&budget, each, Duration::from_millis(600));
        // The credit: one burst to start with, a quarter of the time since, and at most one
        // block past it (a permit is granted on any credit left). Measured inside the
        // permits, so it cannot exceed what the budget counted.
        let most = BURST + wall.mul_f64(0.25) + each + Duration::from_millis(1);
        assert!(computed <= most, "computed {computed:?} of {wall:?}, more than {most:?}");
        // Never stopped: the waits pay the debt and little more (a loaded machine oversleeps,
        // hence the wide margin below the quarter).
        assert!(computed >= wall.mul_f64(0.05), "computed only {computed:?} of {wall:?}");
        assert!(budget.yielded() >= wall.mul_f64(0.4), "waited {:?} of {wall:?}", budget.yielded());
    }

    #[test]
    fn an_idle_foreground_costs_the_pipeline_nothing() {
        let budget = ThreadBudget::yielding(1, 0.25, Arc::new(|| false));
        let (computed, wall) = compute_for(&budget, Duration::from_millis(1), Duration::from_millis(100));
        assert_eq!(budget.yielded(), Duration::ZERO);
        assert!(computed >= wall.mul_f64(0.5), "computed {computed:?} of {wall:?}");
    }

    #[test]
    fn the_foreground_turning_busy_starts_the_rationing() {
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = busy.clone();
        let budget = ThreadBudget::yielding(1, 0.2, Arc::new(move || flag.load(Ordering::Relaxed)));
        compute_for(&budget, Duration::from_millis(1), Duration::from_millis(50));
        assert_eq!(budget.yielded(), Duration::ZERO, "yielded to an idle foreground");
        busy.store(true, Ordering::Relaxed);
        let (computed, wall) = compute_for(&budget, Duration::from_millis(1), Duration::from_millis(300));
        assert!(budget.yielded() > Duration::ZERO, "never yielded to a busy foreground");
        assert!(computed <= BURST + wall.mul_f64(0.2) + Duration::from_millis(2), "computed {computed:?} of {wall:?}");
    }

    #[test]
    fn shares_are_bounded_and_a_whole_one_does_not_yield() {
        let always_busy = || -> ForegroundBusy { Arc::new(|| true) };
        assert_eq!(ThreadBudget::yielding(2, 1.0, always_busy()).share(), 1.0);
        assert_eq!(ThreadBudget::yielding(2, 7.0, always_busy()).share(), 1.0);
        assert_eq!(ThreadBudget::yielding(2, f64::NAN, always_busy()).share(), 1.0);
        assert!((ThreadBudget::yielding(2, 0.0, always_busy()).share() - MIN_SHARE).abs() < 1e-9);
        assert_eq!(ThreadBudget::new(2).share(), 1.0);
        // A whole share never waits, however busy the foreground.
        let whole = ThreadBudget::yielding(1, 1.0, always_busy());
        compute_for(&whole, Duration::from_millis(1), Duration::from_millis(30));
        assert_eq!(whole.yielded(), Duration::ZERO);
    }

    #[test]
    fn a_zero_limit_means_one() {
        assert_eq!(ThreadBudget::new(0).limit(), 1);
        assert!(ThreadBudget::all_cores().limit() >= 1);
    }
}
