//! Where the pipeline runs: a thread of its own for each call, at the configured priority.
//!
//! Not tokio's blocking pool. Its threads are reused for the process's other blocking work
//! (password hashing, the embedded store's file reads), and a priority lowered on one of them
//! could not be raised again without privilege (raising a nice value or leaving `SCHED_IDLE`
//! for a lower nice needs `CAP_SYS_NICE`): it would outlive the job and slow the API. A fresh
//! thread lowers itself first, runs the work and ends. Every thread the pass spawns from it
//! starts with its policy and nice value, because Linux copies both into a new thread, and
//! the pipeline gives FFmpeg's codecs no threads of their own (see
//! [`waveline_pipeline::budget`]), so the whole pass runs at the lowered priority.
//!
//! `idle` is Linux `SCHED_IDLE`: such a thread runs only when no other thread wants the core,
//! a waking thread of the API preempts it at once, and the kernel counts a core that runs
//! only idle-policy work as free when it places a waking thread. That is the strongest
//! promise that playback wins, and its price: anything else that keeps the cores busy (a
//! build on the same machine, another service) stops the pipeline for as long as it does.
//! `low` is the ordinary policy at nice 10: a waking nice-0 thread still preempts it (its
//! virtual deadline is far later), but against a thread that never sleeps it keeps about a
//! tenth of a core (weights 110 against 1024), so a transcode always progresses. `normal`
//! leaves the thread as the process is.

use waveline_shared::config::PipelinePriority;

/// The priority could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("cannot give the pipeline's threads the {wanted:?} priority: {detail}")]
pub struct PriorityError {
    wanted: PipelinePriority,
    detail: String,
}

/// The pipeline's thread failed before returning its result.
#[derive(Debug, thiserror::Error)]
pub enum ThreadFailed {
    #[error("cannot start a pipeline thread: {0}")]
    Spawn(std::io::Error),
    #[error("the pipeline thread panicked")]
    Panicked,
}

/// Lowers the calling thread to `priority` (and everything it spawns from now on).
#[cfg(target_os = "linux")]
pub fn lower_current_thread(priority: PipelinePriority) -> Result<(), PriorityError> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id, thread_schedule_policy,
    };
    let failed = |detail: String| PriorityError { wanted: priority, detail };
    let (policy, value) = match priority {
        PipelinePriority::Normal => return Ok(()),
        // 0, the only value SCHED_IDLE has.
        PipelinePriority::Idle => (NormalThreadSchedulePolicy::Idle, ThreadPriority::Min),
        // The crate maps 0..=99 onto nice 19..=-20 (nice = 39 × (1 − p/99) − 20, truncated):
        // 22 is nice 10. The test below reads the result back from /proc.
        PipelinePriority::Low => {
            let value = ThreadPriorityValue::try_from(LOW_CROSSPLATFORM).map_err(failed)?;
            (NormalThreadSchedulePolicy::Other, ThreadPriority::Crossplatform(value))
        }
    };
    match set_thread_priority_and_policy(thread_native_id(), value, ThreadSchedulePolicy::Normal(policy)) {
        Ok(()) => Ok(()),
        // The crate sets the policy, then the nice value. A process started at a higher nice
        // may not lower it (no privilege), and need not: SCHED_IDLE ignores nice, and a nice
        // of 10 or more is already as low as `low` asks.
        Err(err) => {
            let policy_set = thread_schedule_policy() == Ok(ThreadSchedulePolicy::Normal(policy));
            let low_enough =
                policy == NormalThreadSchedulePolicy::Idle || current_nice().is_some_and(|nice| nice >= LOW_NICE);
            if policy_set && low_enough { Ok(()) } else { Err(failed(err.to_string())) }
        }
    }
}

/// The nice value of `low`.
#[cfg(target_os = "linux")]
const LOW_NICE: i32 = 10;
/// The thread-priority crate's cross-platform value for nice 10.
#[cfg(target_os = "linux")]
const LOW_CROSSPLATFORM: u8 = 22;

/// The calling thread's nice value (field 19 of `/proc/thread-self/stat`).
#[cfg(target_os = "linux")]
fn current_nice() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The name, in parentheses, may hold spaces: fields are counted after its closing one.
    stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(19 - 3)?.parse().ok()
}

/// Lowers the calling thread to `priority`: only `normal` exists outside Linux.
#[cfg(not(target_os = "linux"))]
pub fn lower_current_thread(priority: PipelinePriority) -> Result<(), PriorityError> {
    match priority {
        PipelinePriority::Normal => Ok(()),
        wanted => Err(PriorityError { wanted, detail: "scheduling policies are Linux's".into() }),
    }
}

/// Applies `priority` on a throwaway thread, so a setting that cannot work stops start-up
/// instead of every job.
pub fn check(priority: PipelinePriority) -> Result<(), PriorityError> {
    std::thread::Builder::new()
        .name("pipe-check".into())
        .spawn(move || lower_current_thread(priority))
        .map_err(|err| PriorityError { wanted: priority, detail: err.to_string() })?
        .join()
        .unwrap_or_else(|_| Err(PriorityError { wanted: priority, detail: "the check panicked".into() }))
}

/// Runs `work` on a new thread named `name`, lowered to `priority` first, and waits for its
/// result without blocking the runtime. Dropping the future leaves the thread to finish on
/// its own (the pass stops early through its cancel flag). The current tracing span follows
/// the work onto the thread.
pub async fn run<T: Send + 'static>(
    name: &str,
    priority: PipelinePriority,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ThreadFailed> {
    let (done, result) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _entered = span.enter();
            if let Err(err) = lower_current_thread(priority) {
                // Checked at start-up, so not expected here; the work is still worth doing.
                tracing::warn!(error = %err, "the pipeline runs at the process's priority");
            }
            let _ = done.send(work());
        })
        .map_err(ThreadFailed::Spawn)?;
    // The sender is dropped without a value only when `work` panicked.
    result.await.map_err(|_| ThreadFailed::Panicked)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy and nice value, from `/proc` (fields 41 and 19 of `stat`).
    fn policy_and_nice() -> (u32, i32) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs");
        // The name, in parentheses, may hold spaces: count fields after its closing one.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..].split(' ').collect();
        (fields[41 - 3].parse().expect("policy"), fields[19 - 3].parse().expect("nice"))
    }

    #[tokio::test]
    async fn each_priority_is_what_proc_shows_and_the_caller_keeps_its_own() {
        const SCHED_OTHER: u32 = 0;
        const SCHED_IDLE: u32 = 5;
        let before = policy_and_nice();
        for (priority, expected) in [
            (PipelinePriority::Idle, (SCHED_IDLE, before.1)),
            (PipelinePriority::Low, (SCHED_OTHER, 10)),
            (PipelinePriority::Normal, before),
        ] {
            check(priority).expect("lowering needs no privilege");
            let (on_thread, spawned) = run("pipe-test", priority, || {
                let spawned = std::thread::spawn(policy_and_nice).join().expect("joined");
                (policy_and_nice(), spawned)
            })
            .await
            .expect("ran");
            // SCHED_IDLE ignores nice: only the policy is promised there.
            let shown = if priority == PipelinePriority::Idle { (on_thread.0, before.1) } else { on_thread };
            assert_eq!(shown, expected, "{priority:?}");
            assert_eq!(spawned, on_thread, "{priority:?}: a thread spawned by the pipeline's inherits it");
        }
        assert_eq!(policy_and_nice(), before, "the caller's own thread is untouched");
        assert_eq!(before.0, SCHED_OTHER);
    }

    #[tokio::test]
    async fn a_panic_is_reported_not_propagated() {
        let result = run("pipe-test", PipelinePriority::Normal, || -> u32 { panic!("boom") }).await;
        assert!(matches!(result, Err(ThreadFailed::Panicked)), "{result:?}");
    }
}
