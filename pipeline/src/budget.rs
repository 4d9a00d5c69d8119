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

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

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
}

#[derive(Default)]
struct State {
    busy: usize,
    /// The most permits ever held at once, for tests and the bench.
    peak: usize,
}

impl std::fmt::Debug for ThreadBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadBudget").field("limit", &self.shared.limit).finish_non_exhaustive()
    }
}

impl ThreadBudget {
    /// A budget of `limit` threads (at least one).
    pub fn new(limit: usize) -> ThreadBudget {
        ThreadBudget {
            shared: Arc::new(Shared {
                limit: limit.max(1),
                state: Mutex::new(State::default()),
                freed: Condvar::new(),
            }),
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

    /// Waits for a permit; the work it covers ends when the permit is dropped. Never hold
    /// one across a channel operation (see the module docs).
    pub fn permit(&self) -> Permit<'_> {
        let mut state = self.lock();
        while state.busy >= self.shared.limit {
            state = self.shared.freed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.busy += 1;
        state.peak = state.peak.max(state.busy);
        Permit { budget: self }
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
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.busy -= 1;
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

    #[test]
    fn a_zero_limit_means_one() {
        assert_eq!(ThreadBudget::new(0).limit(), 1);
        assert!(ThreadBudget::all_cores().limit() >= 1);
    }
}
