//! The `JobQueue` contract: every case runs against `MemoryQueue` and against `AmqpQueue` on
//! the real RabbitMQ, each on a topology of its own. Nothing here assumes delivery order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use secrecy::SecretString;
use waveline_shared::domain::TrackId;
use waveline_shared::job::{Job, JobMessage};
use waveline_shared::queue::{
    AmqpQueue, Delivery, JobConsumer, JobQueue, MemoryQueue, QueueError, RetryOutcome, RetryPolicy, RetryRequest,
    Topology,
};
use waveline_tests::{TcpProxy, amqp_url, init_logging, test_topology};

/// Short delays so the suite stays fast; the shapes are the production ones.
const POLICY: RetryPolicy =
    RetryPolicy { max_attempts: 3, base_delay: Duration::from_millis(200), max_delay: Duration::from_secs(2) };

struct Backend {
    queue: Arc<dyn JobQueue>,
    amqp: Option<AmqpQueue>,
}

impl Backend {
    async fn memory() -> Result<Backend> {
        Ok(Backend { queue: Arc::new(MemoryQueue::new(POLICY)), amqp: None })
    }

    async fn amqp() -> Result<Backend> {
        let queue = connect_amqp(&amqp_url(), test_topology()).await?;
        Ok(Backend { queue: Arc::new(queue.clone()), amqp: Some(queue) })
    }

    async fn cleanup(self) -> Result<()> {
        if let Some(amqp) = self.amqp {
            amqp.delete_topology().await?;
        }
        Ok(())
    }
}

async fn connect_amqp(url: &str, topology: Topology) -> Result<AmqpQueue> {
    AmqpQueue::connect(SecretString::from(url.to_owned()), topology, POLICY)
        .await
        .with_context(|| format!("RabbitMQ is not reachable at {url}; run scripts/setup.sh"))
}

fn job() -> JobMessage {
    JobMessage::new(Job::ProcessTrack { track_id: TrackId::new() })
}

async fn next(consumer: &mut Box<dyn JobConsumer>) -> Result<Delivery> {
    match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
        Ok(delivery) => Ok(delivery?),
        Err(_) => bail!("no delivery within 10 s"),
    }
}

/// That nothing settled comes back, shown by an event rather than by a quiet spell: a marker
/// published now is the next delivery (the queue is first in, first out, and a message put
/// back goes before anything published after it), and then nothing waits in the queue.
async fn only_the_marker_follows(queue: &dyn JobQueue, consumer: &mut Box<dyn JobConsumer>) -> Result<()> {
    let marker = job();
    queue.publish(&marker).await?;
    let delivery = next(consumer).await?;
    ensure!(delivery.message.id == marker.id, "expected the marker, got {delivery:?}");
    delivery.ack().await?;
    wait_for_stats(queue, |ready, _| ready == 0).await
}

async fn wait_for_stats(queue: &dyn JobQueue, check: impl Fn(u64, u64) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = queue.stats().await?;
        if check(stats.ready, stats.dead) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "stats never matched: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn published_jobs_arrive_once_and_ack_removes_them(b: &Backend) -> Result<()> {
    // Every kind travels alike: four track jobs and an image job.
    let mut sent: Vec<JobMessage> = (0..4).map(|_| job()).collect();
    sent.push(JobMessage::new(Job::ProcessImage {
        subject: waveline_shared::images::ImageSubject::Track,
        subject_id: uuid::Uuid::now_v7(),
        version: waveline_shared::images::new_version(),
    }));
    for message in &sent {
        b.queue.publish(message).await?;
    }
    wait_for_stats(&*b.queue, |ready, _| ready == 5).await?;
    let mut consumer = b.queue.consume(10).await?;
    let mut got = Vec::new();
    for _ in 0..5 {
        let delivery = next(&mut consumer).await?;
        ensure!(!delivery.redelivered && delivery.message.attempt == 1, "{delivery:?}");
        got.push(delivery.message.clone());
        delivery.ack().await?;
    }
    let mut want = sent.clone();
    want.sort_by_key(|m| m.id);
    got.sort_by_key(|m| m.id);
    ensure!(got == want, "received jobs differ from the published ones");
    only_the_marker_follows(&*b.queue, &mut consumer).await?;
    let stats = b.queue.stats().await?;
    ensure!(stats.ready == 0 && stats.dead == 0 && stats.consumers == 1, "{stats:?}");
    Ok(())
}

async fn requeue_hands_the_job_back_at_once(b: &Backend) -> Result<()> {
    let sent = job();
    b.queue.publish(&sent).await?;
    let mut consumer = b.queue.consume(1).await?;
    let first = next(&mut consumer).await?;
    ensure!(first.message == sent);
    first.requeue().await?;
    let again = next(&mut consumer).await?;
    ensure!(again.message == sent && again.redelivered, "{again:?}");
    again.ack().await?;
    only_the_marker_follows(&*b.queue, &mut consumer).await
}

async fn a_consumer_that_dies_without_acking_loses_nothing(b: &Backend) -> Result<()> {
    let sent = job();
    b.queue.publish(&sent).await?;
    let mut doomed = b.queue.consume(1).await?;
    let held = next(&mut doomed).await?;
    ensure!(held.message == sent);
    // The consumer goes away while its delivery is still unsettled, as a crashed worker's would.
    drop(doomed);
    let mut survivor = b.queue.consume(1).await?;
    let redelivered = next(&mut survivor).await?;
    ensure!(redelivered.message == sent && redelivered.redelivered, "{redelivered:?}");
    // The dead consumer's handle can no longer settle anything.
    ensure!(matches!(held.ack().await, Err(QueueError::DeliveryLost)), "a stale ack succeeded");
    redelivered.ack().await?;
    only_the_marker_follows(&*b.queue, &mut survivor).await
}

async fn a_dropped_delivery_comes_back(b: &Backend) -> Result<()> {
    let sent = job();
    b.queue.publish(&sent).await?;
    let mut consumer = b.queue.consume(1).await?;
    drop(next(&mut consumer).await?);
    let again = next(&mut consumer).await?;
    ensure!(again.message == sent && again.redelivered);
    again.ack().await?;
    Ok(())
}

async fn prefetch_bounds_unsettled_deliveries(b: &Backend) -> Result<()> {
    for _ in 0..3 {
        b.queue.publish(&job()).await?;
    }
    let mut consumer = b.queue.consume(2).await?;
    let first = next(&mut consumer).await?;
    let second = next(&mut consumer).await?;
    // The third waits in the queue while two are unsettled.
    wait_for_stats(&*b.queue, |ready, _| ready == 1).await?;
    first.ack().await?;
    let third = next(&mut consumer).await?;
    second.ack().await?;
    third.ack().await?;
    Ok(())
}

async fn retries_back_off_then_dead_letter(b: &Backend) -> Result<()> {
    let sent = job();
    b.queue.publish(&sent).await?;
    let mut consumer = b.queue.consume(1).await?;
    for attempt in 1..=2 {
        let delivery = next(&mut consumer).await?;
        ensure!(delivery.message.id == sent.id && delivery.message.attempt == attempt, "{delivery:?}");
        let retried_at = Instant::now();
        let outcome = delivery.retry("storage timed out").await?;
        let delay = POLICY.delay_after(attempt);
        ensure!(outcome == RetryOutcome::Scheduled { attempt: attempt + 1, delay }, "{outcome:?}");
        let back = next(&mut consumer).await?;
        let waited = retried_at.elapsed();
        ensure!(waited >= delay, "attempt {attempt}: came back after {waited:?}, before the {delay:?} backoff");
        ensure!(back.message.attempt == attempt + 1 && back.message.enqueued_at == sent.enqueued_at);
        back.requeue().await?;
    }
    let last = next(&mut consumer).await?;
    ensure!(last.message.attempt == 3);
    ensure!(last.retry("storage timed out").await? == RetryOutcome::DeadLettered);
    only_the_marker_follows(&*b.queue, &mut consumer).await?;
    wait_for_stats(&*b.queue, |ready, dead| ready == 0 && dead == 1).await?;
    let dead = b.queue.dead_letters(10).await?;
    ensure!(dead.len() == 1, "{dead:?}");
    ensure!(dead[0].code == "retries_exhausted", "{:?}", dead[0]);
    ensure!(
        dead[0].reason.contains("after 3 attempts") && dead[0].reason.contains("storage timed out"),
        "{:?}",
        dead[0]
    );
    ensure!(dead[0].job.as_ref().map(|j| j.id) == Some(sent.id));
    // Listing does not consume.
    ensure!(b.queue.dead_letters(10).await?.len() == 1);
    Ok(())
}

/// A retry may carry on with a narrower job, and wait at least as long as a failing service
/// asked (past `max_delay`); the dead letter of the last attempt keeps the narrower job.
async fn retries_may_narrow_the_job_and_wait_as_asked(b: &Backend) -> Result<()> {
    let sent = job();
    b.queue.publish(&sent).await?;
    let mut consumer = b.queue.consume(1).await?;
    let first = next(&mut consumer).await?;
    let narrower = Job::ProcessTrack { track_id: TrackId::new() };
    let asked = Duration::from_millis(2500);
    let retried_at = Instant::now();
    let request = RetryRequest { job: Some(narrower.clone()), at_least: Some(asked) };
    let outcome = first.retry_with("FCM said 503", request).await?;
    let delay = POLICY.delay_at_least(1, asked);
    ensure!(delay >= asked && delay > POLICY.max_delay, "{delay:?}");
    ensure!(outcome == RetryOutcome::Scheduled { attempt: 2, delay }, "{outcome:?}");
    let back = next(&mut consumer).await?;
    let waited = retried_at.elapsed();
    ensure!(waited >= asked, "came back after {waited:?}, before the {asked:?} asked for");
    ensure!(back.message.job == narrower && back.message.id == sent.id && back.message.attempt == 2, "{back:?}");
    ensure!(back.message.enqueued_at == sent.enqueued_at);
    let last = back.retry("storage timed out").await?;
    ensure!(matches!(last, RetryOutcome::Scheduled { attempt: 3, .. }), "{last:?}");
    let third = next(&mut consumer).await?;
    let narrowest = Job::ProcessTrack { track_id: TrackId::new() };
    let request = RetryRequest { job: Some(narrowest.clone()), at_least: None };
    ensure!(third.retry_with("still 503", request).await? == RetryOutcome::DeadLettered);
    wait_for_stats(&*b.queue, |ready, dead| ready == 0 && dead == 1).await?;
    let dead = b.queue.dead_letters(10).await?;
    ensure!(dead.len() == 1 && dead[0].job.as_ref().map(|m| &m.job) == Some(&narrowest), "{dead:?}");
    Ok(())
}

async fn poison_messages_are_dead_lettered_and_the_consumer_goes_on(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let id = uuid::Uuid::now_v7();
    let poisons: [(Vec<u8>, &str); 4] = [
        (b"\x00\x01 not json".to_vec(), "not_json"),
        // An image job whose version would walk out of its storage prefix.
        (format!(r#"{{"v":1,"kind":"process_image","id":"{id}","subject":"track","subject_id":"{track}","version":"../../originals","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).into_bytes(), "malformed"),
        (format!(r#"{{"v":99,"kind":"process_track","id":"{id}","track_id":"{track}","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).into_bytes(), "unsupported_version"),
        (format!(r#"{{"v":1,"kind":"mine_bitcoin","id":"{id}","track_id":"{track}","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).into_bytes(), "unknown_kind"),
    ];
    for (payload, _) in &poisons {
        b.queue.publish_payload(payload.clone()).await?;
    }
    let good = job();
    b.queue.publish(&good).await?;
    let mut consumer = b.queue.consume(1).await?;
    let delivery = next(&mut consumer).await?;
    ensure!(delivery.message == good, "{delivery:?}");
    delivery.ack().await?;
    wait_for_stats(&*b.queue, |ready, dead| ready == 0 && dead == 4).await?;
    let codes: BTreeSet<String> = b.queue.dead_letters(10).await?.into_iter().map(|d| d.code).collect();
    let want: BTreeSet<String> = poisons.iter().map(|(_, code)| (*code).to_owned()).collect();
    ensure!(codes == want, "{codes:?}");
    // Unreadable dead letters cannot be replayed and stay put.
    let report = b.queue.replay_dead(None).await?;
    ensure!(report.replayed == 0 && report.unreadable == 4, "{report:?}");
    ensure!(b.queue.dead_letters(10).await?.len() == 4);
    Ok(())
}

async fn dead_letters_replay_as_first_attempts(b: &Backend) -> Result<()> {
    let (keep, replay) = (job(), job());
    let mut consumer = b.queue.consume(2).await?;
    for message in [&keep, &replay] {
        b.queue.publish(message).await?;
    }
    for _ in 0..2 {
        next(&mut consumer).await?.dead_letter("unsupported_format", "not audio").await?;
    }
    wait_for_stats(&*b.queue, |_, dead| dead == 2).await?;
    let dead = b.queue.dead_letters(10).await?;
    let target =
        dead.iter().find(|d| d.job.as_ref().map(|j| j.id) == Some(replay.id)).context("the dead letter is listed")?;
    ensure!(target.code == "unsupported_format" && target.reason == "not audio", "{target:?}");
    let report = b.queue.replay_dead(Some(&[target.id])).await?;
    ensure!(report.replayed == 1 && report.unreadable == 0, "{report:?}");
    let again = next(&mut consumer).await?;
    ensure!(again.message.id == replay.id && again.message.attempt == 1, "{again:?}");
    again.ack().await?;
    let left = b.queue.dead_letters(10).await?;
    ensure!(left.len() == 1 && left[0].job.as_ref().map(|j| j.id) == Some(keep.id), "{left:?}");
    ensure!(b.queue.replay_dead(None).await?.replayed == 1);
    ensure!(next(&mut consumer).await?.message.id == keep.id);
    Ok(())
}

async fn competing_consumers_share_the_work_without_order(b: &Backend) -> Result<()> {
    let messages: Vec<JobMessage> = (0..30).map(|_| job()).collect();
    for message in &messages {
        b.queue.publish(message).await?;
    }
    // One marker per consumer, behind the work: a consumer stops at the first it gets (one it
    // had prefetched goes back to the queue when it stops), so both end once all the work was
    // handed out, and a duplicate would have to come before a marker to be missed.
    let markers: Vec<JobMessage> = (0..2).map(|_| job()).collect();
    for marker in &markers {
        b.queue.publish(marker).await?;
    }
    let marker_ids: BTreeSet<_> = markers.iter().map(|m| m.id).collect();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let queue = b.queue.clone();
            let marker_ids = marker_ids.clone();
            tokio::spawn(async move {
                let mut consumer = queue.consume(3).await?;
                let mut seen = Vec::new();
                loop {
                    let delivery = next(&mut consumer).await?;
                    let id = delivery.message.id;
                    delivery.ack().await?;
                    if marker_ids.contains(&id) {
                        break;
                    }
                    seen.push(id);
                }
                anyhow::Ok(seen)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    let unique: BTreeSet<_> = all.iter().copied().collect();
    ensure!(all.len() == 30 && unique.len() == 30, "{} deliveries, {} distinct", all.len(), unique.len());
    ensure!(unique == messages.iter().map(|m| m.id).collect::<BTreeSet<_>>());
    Ok(())
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::init_logging();
                    let backend = super::Backend::memory().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::init_logging();
                    let backend = super::Backend::amqp().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
    };
}

contract!(
    published_jobs_arrive_once_and_ack_removes_them,
    requeue_hands_the_job_back_at_once,
    a_consumer_that_dies_without_acking_loses_nothing,
    a_dropped_delivery_comes_back,
    prefetch_bounds_unsettled_deliveries,
    retries_back_off_then_dead_letter,
    retries_may_narrow_the_job_and_wait_as_asked,
    poison_messages_are_dead_lettered_and_the_consumer_goes_on,
    dead_letters_replay_as_first_attempts,
    competing_consumers_share_the_work_without_order,
);

/// AMQP only: the connection to the broker drops (here: cut by a relay, so other tests
/// sharing the broker are untouched) and comes back; publishing and consuming carry on, and
/// the job that was in hand when the link died is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_reconnects_after_the_broker_connection_drops() -> Result<()> {
    init_logging();
    // The broker of WAVELINE_TEST_AMQP_URL, reached through the relay with the same
    // credentials and virtual host.
    let mut url = url::Url::parse(&amqp_url())?;
    let host = url.host_str().context("the AMQP URL has no host")?.to_owned();
    let upstream = tokio::net::lookup_host((host.as_str(), url.port().unwrap_or(5672)))
        .await?
        .next()
        .context("the AMQP host resolves to nothing")?;
    let proxy = TcpProxy::start(upstream).await?;
    url.set_host(Some(&proxy.addr.ip().to_string()))?;
    url.set_port(Some(proxy.addr.port())).map_err(|()| anyhow::anyhow!("cannot set the relay's port"))?;
    let url = url.to_string();
    let topology = test_topology();
    let queue = connect_amqp(&url, topology.clone()).await?;
    let mut consumer = queue.consume(1).await?;
    let first = job();
    queue.publish(&first).await?;
    let held = next(&mut consumer).await?;
    ensure!(held.message == first);

    proxy.outage(Duration::from_secs(2));
    // Publishing during the outage waits for the broker to come back instead of failing.
    let second = job();
    let started = Instant::now();
    queue.publish(&second).await?;
    ensure!(started.elapsed() >= Duration::from_secs(1), "published through a dead link?");
    ensure!(held.ack().await.is_err(), "an ack on the dead channel reported success");

    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let delivery = next(&mut consumer).await?;
        seen.insert(delivery.message.id);
        delivery.ack().await?;
    }
    ensure!(seen == BTreeSet::from([first.id, second.id]), "{seen:?}");
    only_the_marker_follows(&queue, &mut consumer).await?;
    drop(consumer);
    let direct = connect_amqp(&amqp_url(), topology).await?;
    direct.delete_topology().await?;
    Ok(())
}
