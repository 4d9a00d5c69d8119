//! `SendPush`: one push to every device of an account, through FCM ([`crate::fcm`]).
//!
//! 1. Load the account's device tokens (at most 20). A retry carries the tokens it still has
//!    to reach, and keeps only those the account still has: a device unregistered since, or
//!    moved to another account, is not sent this account's push.
//! 2. Send to each device at once, and act on each answer:
//!    - sent: done for that device;
//!    - `UNREGISTERED`, or `INVALID_ARGUMENT` about the token: the device is deleted, done;
//!    - 429 and 5xx, the network, or no access token: that device is tried again;
//!    - any other refusal: given up for that device, with a warning.
//! 3. Done when no device is left to try again. Otherwise the job asks for a retry **with only
//!    the devices still to reach** in it (`remaining` in the job), and not before the longest
//!    `Retry-After` FCM gave: a device that got the push never gets it twice from a retry.
//!
//! Per-device progress travels in the message rather than in a table: the job stays
//! self-contained (a dead letter replayed later sends to exactly the devices that missed it),
//! and nothing is left to clean up. A device is sent to again only if the worker died between
//! FCM's answer and the retry being published, which at-least-once delivery allows anyway.
//!
//! Tokens stay in messages and dead letters, never in logs (they log as their first 8
//! characters).

use std::time::Duration;

use waveline_shared::domain::UserId;
use waveline_shared::job::Job;
use waveline_shared::push::{DeviceToken, PushMessage};

use super::Outcome;
use crate::Context;
use crate::fcm::Delivery;

/// One push for one account.
#[derive(Debug)]
pub struct SendPush<'a> {
    pub user_id: UserId,
    pub push: &'a PushMessage,
    /// The devices still to reach, on a retry; `None`: all of the account's.
    pub remaining: Option<&'a [DeviceToken]>,
}

/// Counts one device's result in `waveline_push_sent_total{result}`.
fn count(result: &'static str) {
    ::metrics::counter!("waveline_push_sent_total", "result" => result).increment(1);
}

impl SendPush<'_> {
    pub async fn run(&self, context: &Context) -> Outcome {
        let Some(fcm) = context.push.as_ref() else {
            // Enqueued by a process with pushes on: another worker may have the credentials,
            // and the dead letter keeps it for a replay once this one does.
            return Outcome::retry(
                "this worker has no fcm_credentials_file, so it cannot send pushes",
                "push notifications are not configured on the worker",
            );
        };
        let mut tokens = match context.devices.tokens(self.user_id).await {
            Ok(tokens) => tokens,
            Err(err) => {
                return Outcome::retry(format!("cannot read the devices: {err}"), "the database was unavailable");
            }
        };
        if let Some(remaining) = self.remaining {
            tokens.retain(|token| remaining.contains(token));
        }
        if tokens.is_empty() {
            tracing::debug!("no device to push to");
            return Outcome::Done;
        }
        let answers = futures::future::join_all(tokens.iter().map(|token| fcm.send(token, self.push))).await;
        let mut again = Vec::new();
        let mut wait: Option<Duration> = None;
        let mut last_reason = String::new();
        for (token, answer) in tokens.into_iter().zip(answers) {
            match answer {
                Delivery::Sent => {
                    count("sent");
                    tracing::debug!(device = %token, "pushed");
                }
                Delivery::InvalidToken => {
                    count("token_removed");
                    match context.devices.delete(&token).await {
                        Ok(_) => tracing::info!(device = %token, "FCM no longer knows the device: removed"),
                        // Sending to it again will find it invalid again.
                        Err(err) => tracing::warn!(device = %token, error = %err, "cannot remove an invalid device"),
                    }
                }
                Delivery::Rejected { status, reason } => {
                    count("rejected");
                    tracing::warn!(device = %token, status, %reason, "FCM refused the push for this device; giving up on it");
                }
                Delivery::Unavailable { reason, retry_after } => {
                    count("retried");
                    tracing::info!(device = %token, %reason, ?retry_after, "push not sent; will try again");
                    wait = wait.max(retry_after);
                    last_reason = reason;
                    again.push(token);
                }
            }
        }
        if again.is_empty() {
            return Outcome::Done;
        }
        Outcome::Retry {
            reason: format!("{} device(s) not reached: {last_reason}", again.len()),
            public: "FCM was unavailable".into(),
            after: wait,
            resume: Some(Job::Push { user_id: self.user_id, push: self.push.clone(), remaining: Some(again) }),
        }
    }
}
