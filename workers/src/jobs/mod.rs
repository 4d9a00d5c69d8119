//! The jobs a worker runs, one file each, and what a job's end means for its delivery.
//!
//! Every job is idempotent: it may run twice (at-least-once delivery), and it carries on
//! when its rows have vanished. All kinds are dispatched from [`run`].

pub mod process_image;
pub mod process_track;
pub mod push;

use std::time::Duration;

use waveline_shared::job::Job;

use crate::Context;

/// How a job ended, which decides what happens to its message.
#[derive(Debug)]
pub enum Outcome {
    /// Done, or nothing to do (a duplicate, a deleted track): ack.
    Done,
    /// A transient failure (storage, database, broker, an outside service): retry with
    /// backoff. `reason` is for operators (logs, dead letters); `public` is what the track may
    /// store if the attempts run out: no hosts, paths or library text.
    Retry {
        reason: String,
        public: String,
        /// Not before this long: the failing service said when to come back (`Retry-After`).
        after: Option<Duration>,
        /// What the next attempt does in place of this job: the part of it still to do.
        resume: Option<Job>,
    },
    /// A permanent failure already recorded on the track: ack, never retry.
    Abort { code: &'static str, message: String },
}

impl Outcome {
    /// A plain retry: the same job, after the backoff.
    pub fn retry(reason: impl Into<String>, public: impl Into<String>) -> Outcome {
        Outcome::Retry { reason: reason.into(), public: public.into(), after: None, resume: None }
    }
}

/// Runs one job to its [`Outcome`].
pub async fn run(context: &Context, job: &Job, attempt: u32) -> Outcome {
    match job {
        Job::ProcessTrack { track_id } => {
            process_track::ProcessTrack { track_id: *track_id, attempt }.run(context).await
        }
        Job::Push { user_id, push, remaining } => {
            push::SendPush { user_id: *user_id, push, remaining: remaining.as_deref() }.run(context).await
        }
        Job::ProcessImage { subject, subject_id, version } => {
            process_image::ProcessImage { subject: *subject, subject_id: *subject_id, version }.run(context).await
        }
    }
}
