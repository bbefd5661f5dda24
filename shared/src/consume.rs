//! The one consumer driver of the rater and the ledger-writer: poll a batch, run the step,
//! and store the offsets only after the step's effect is durable downstream (guarantee 4), in
//! the manner of arroyo's commit-after-effect strategies and vector's Kafka source.
//!
//! It never ends the process on an error (guarantee 7). Each error of a step is one of:
//!
//! - **transient** (Redis, Kafka or Postgres unreachable, a serialization failure, a deadlock,
//!   a failover): the same units are tried again with exponential backoff and jitter for as
//!   long as it takes. Meanwhile the service reports not-ready and counts every retry.
//! - **permanent** (a unit that decodes but cannot be applied or stored: a Postgres data
//!   exception, a constraint or size violation, an amount out of range): the batch is bisected
//!   and each half tried on its own, in order, down to the single unit that fails. The step
//!   dead-letters that unit, and the rest of the batch settles.
//!
//! A step is therefore idempotent: after a failure some of its units may have taken effect, and
//! they are processed again. A unit that never decodes is dead-lettered without being tried.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::telemetry::Ready;

/// How an error of a step is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Retry the same units, with backoff, for as long as it takes.
    Transient,
    /// Isolate the unit that causes it and dead-letter it.
    Permanent,
}

/// An error of one step, sorted.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    #[error("permanent: {0:#}")]
    Permanent(anyhow::Error),
}

impl StepError {
    /// Sort an error by the first typed cause in its chain ([`classify`]).
    pub fn sorted(e: anyhow::Error) -> Self {
        match classify(&e) {
            Class::Transient => Self::Transient(e),
            Class::Permanent => Self::Permanent(e),
        }
    }
}

/// The class of an error, from the first Postgres, Redis or Kafka error in its chain. Anything
/// else is transient: a bug that fails every batch must stall (and alert), not dead-letter the
/// whole stream.
pub fn classify(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            return classify_sqlx(e);
        }
        if let Some(e) = cause.downcast_ref::<redis::RedisError>() {
            return classify_redis(e);
        }
        if let Some(e) = cause.downcast_ref::<rdkafka::error::KafkaError>() {
            return classify_kafka(e);
        }
    }
    Class::Transient
}

/// Postgres: the data-dependent SQLSTATE classes are permanent (22 data exception, e.g. a NUL
/// in text or jsonb, a numeric overflow, a string too long; 23 integrity constraint; 54 program
/// limit, e.g. an index row too large), as are values the driver cannot encode. Connection
/// loss, pool timeouts, serialization failures (40001), deadlocks (40P01), shutdowns (57P0x),
/// insufficient resources (53) and schema errors (a deploy out of step) are transient.
pub fn classify_sqlx(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref().map(|c| c.get(..2).unwrap_or(c)) {
            Some("22" | "23" | "54") => Class::Permanent,
            _ => Class::Transient,
        },
        sqlx::Error::Encode(_) => Class::Permanent,
        _ => Class::Transient,
    }
}

/// The SQLSTATE of a Postgres error in `e`'s chain, if any.
pub fn sqlstate(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|c| match c.downcast_ref::<sqlx::Error>()? {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    })
}

/// Redis: a script that fails on its input is permanent; everything else (I/O, timeouts,
/// LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY after a failover) is transient.
pub fn classify_redis(e: &redis::RedisError) -> Class {
    let script_failed = matches!(
        e.kind(),
        redis::ErrorKind::ResponseError | redis::ErrorKind::ExtensionError
    ) && e.to_string().contains("script");
    if script_failed && !e.is_io_error() {
        Class::Permanent
    } else {
        Class::Transient
    }
}

/// Kafka: a record the broker will never take (too large, invalid) is permanent; everything
/// else is transient.
pub fn classify_kafka(e: &rdkafka::error::KafkaError) -> Class {
    use rdkafka::error::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessage | C::InvalidMessageSize | C::InvalidRecord) => Class::Permanent,
        _ => Class::Transient,
    }
}

/// A unit of work: one consumed message, or one of the items a message carries.
pub trait Unit {
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
}

/// What a consumer does with its units. Every method is idempotent.
pub trait Step {
    type Unit: Unit + Send + Sync;

    /// The units of one consumed message (a ledger message carries a run of facts).
    fn decode(&self, m: &BorrowedMessage<'_>) -> Vec<Self::Unit>;

    /// Why `unit` is dead-lettered without being tried (it does not decode), if it is.
    fn rejected(&self, unit: &Self::Unit) -> Option<String>;

    /// Apply `units`, in order. `attempt` counts the failed tries of these same units.
    fn process(&mut self, units: &[Self::Unit], attempt: u32) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Produce `unit` to the dead-letter topic with `reason`, record its terminal status, and
    /// give back whatever was already deducted for it.
    fn dead_letter(&mut self, unit: &Self::Unit, reason: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// A batch is about to be processed.
    fn batch_started(&mut self) {}

    /// A batch took effect and its offsets were stored.
    fn batch_done(&mut self, _units: &[Self::Unit], _elapsed: Duration) {}
}

/// The driver's metric names (each service's own catalogue).
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// Counter {stage}: transient failures (each one retried).
    pub errors: &'static str,
    /// Counter: batches split to isolate a permanent error (each isolated unit is then counted
    /// by the step's dead-letter counter).
    pub bisections: &'static str,
    /// The `stage` label of `errors`.
    pub stage: &'static str,
}

/// The loop of one consumer.
pub struct Driver<C: ConsumerContext + 'static> {
    pub consumer: Arc<StreamConsumer<C>>,
    pub topic: String,
    /// Most units in one batch (the batch ends with the message that reaches it).
    pub max_units: usize,
    /// Longest wait to fill a batch.
    pub max_wait: Duration,
    pub runner: Runner,
}

/// Runs a batch through a step: retries, bisection, dead letters.
pub struct Runner {
    pub ready: Ready,
    pub shutdown: CancellationToken,
    pub names: Names,
    /// The longest wait between transient retries ([`MAX_DELAY`]).
    pub max_delay: Duration,
}

/// The longest wait between two transient retries.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The backoff between transient retries: 100 ms (at most `max`) doubling to `max`, with
/// jitter, without end.
pub fn backoff(max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100).min(max))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The driver was asked to stop while a batch was unfinished (its offsets were not stored).
#[derive(Debug)]
pub struct Stopped;

impl<C: ConsumerContext + 'static> Driver<C> {
    /// Consume until shutdown. Returns an error only for what the consumer itself cannot do
    /// (storing offsets on a consumer that lost its group is retried by the next batch).
    pub async fn run<S: Step>(&self, step: &mut S) -> anyhow::Result<()> {
        loop {
            let Some(batch) = crate::kafka::next_batch_weighted(
                &self.consumer,
                self.max_units,
                self.max_wait,
                &self.runner.shutdown,
                |m: &BorrowedMessage<'_>| step.decode(m),
                Vec::len,
            )
            .await
            else {
                return Ok(());
            };
            let units: Vec<S::Unit> = batch.into_iter().flatten().collect();
            let started = Instant::now();
            let span = crate::kafka::batch_span(units.iter().map(|u| (u.partition(), u.offset())));
            step.batch_started();
            if self.runner.batch(step, &units).instrument(span.clone()).await.is_err() {
                return Ok(());
            }
            // The batch's effects are durable: only now may its offsets be committed.
            if let Err(e) = crate::kafka::store_offsets(
                &self.consumer,
                &self.topic,
                units.iter().map(|u| (u.partition(), u.offset())),
            ) {
                // A revoked partition: its next owner redoes the batch (idempotent).
                tracing::warn!(parent: &span, error = %e, "offsets not stored");
            }
            step.batch_done(&units, started.elapsed());
        }
    }
}

impl Runner {
    /// Dead-letter the rejected units, then process the rest, bisecting around permanent errors.
    pub async fn batch<S: Step>(&self, step: &mut S, units: &[S::Unit]) -> Result<(), Stopped> {
        // The units that decode, in order, as runs between the rejected ones.
        let mut start = 0;
        for (i, u) in units.iter().enumerate() {
            if let Some(reason) = step.rejected(u) {
                self.isolate(step, &units[start..i]).await?;
                self.dead_letter(step, u, &reason).await?;
                start = i + 1;
            }
        }
        self.isolate(step, &units[start..]).await
    }

    /// Process `units`; a permanent error splits them in halves, tried in order, down to the
    /// unit that is dead-lettered.
    async fn isolate<S: Step>(&self, step: &mut S, units: &[S::Unit]) -> Result<(), Stopped> {
        // Ranges still to do; the next one on top.
        #[allow(clippy::single_range_in_vec_init)] // a stack of ranges, one to start
        let mut todo = vec![0..units.len()];
        while let Some(r) = todo.pop() {
            if r.is_empty() {
                continue;
            }
            let part = &units[r.clone()];
            let mut attempt = 0u32;
            let mut delays = backoff(self.max_delay);
            let outcome = loop {
                match step.process(part, attempt).await {
                    Ok(()) => break Ok(()),
                    Err(StepError::Permanent(e)) => break Err(e),
                    Err(StepError::Transient(e)) => {
                        self.wait_transient(&e, &mut attempt, &mut delays).await?;
                    }
                }
            };
            self.recovered(attempt);
            let Err(e) = outcome else { continue };
            if part.len() == 1 {
                let reason = format!("{e:#}");
                self.dead_letter(step, &part[0], &reason).await?;
            } else {
                metrics::counter!(self.names.bisections).increment(1);
                let mid = r.start + part.len() / 2;
                tracing::warn!(error = %format!("{e:#}"), units = part.len(), "permanent error: bisecting the batch");
                todo.push(mid..r.end);
                todo.push(r.start..mid);
            }
        }
        Ok(())
    }

    async fn dead_letter<S: Step>(&self, step: &mut S, unit: &S::Unit, reason: &str) -> Result<(), Stopped> {
        tracing::warn!(partition = unit.partition(), offset = unit.offset(), %reason, "dead-lettering");
        let mut attempt = 0u32;
        let mut delays = backoff(self.max_delay);
        loop {
            match step.dead_letter(unit, reason).await {
                Ok(()) => break,
                // Dead-lettering has nowhere else to go: whatever its error, retry it.
                Err(StepError::Transient(e) | StepError::Permanent(e)) => {
                    self.wait_transient(&e, &mut attempt, &mut delays).await?;
                }
            }
        }
        self.recovered(attempt);
        Ok(())
    }

    /// Count a transient failure, report not-ready, and sleep the next backoff delay (or stop).
    async fn wait_transient(
        &self,
        e: &anyhow::Error,
        attempt: &mut u32,
        delays: &mut impl Iterator<Item = Duration>,
    ) -> Result<(), Stopped> {
        *attempt += 1;
        metrics::counter!(self.names.errors, "stage" => self.names.stage).increment(1);
        self.ready.set(false);
        let delay = delays.next().unwrap_or(self.max_delay);
        tracing::warn!(error = %format!("{e:#}"), attempt = *attempt, delay_ms = delay.as_millis() as u64, "transient error: retrying");
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(Stopped),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    fn recovered(&self, attempts: u32) {
        if attempts > 0 {
            tracing::info!(attempts, "recovered");
            self.ready.set(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct U(i64, bool);
    impl Unit for U {
        fn partition(&self) -> i32 {
            0
        }
        fn offset(&self) -> i64 {
            self.0
        }
    }

    /// Fails permanently on a batch holding a poison unit (`.1`), transiently on the first try of
    /// every batch when `flaky`; records what took effect and what was dead-lettered.
    #[derive(Default)]
    struct Fake {
        flaky: bool,
        applied: Vec<i64>,
        dead: Vec<(i64, String)>,
        tries: usize,
    }
    impl Step for Fake {
        type Unit = U;
        fn decode(&self, _m: &BorrowedMessage<'_>) -> Vec<U> {
            unreachable!()
        }
        fn rejected(&self, u: &U) -> Option<String> {
            (u.0 < 0).then(|| "undecodable".to_owned())
        }
        async fn process(&mut self, units: &[U], attempt: u32) -> Result<(), StepError> {
            self.tries += 1;
            if self.flaky && attempt == 0 {
                return Err(StepError::Transient(anyhow::anyhow!("blip")));
            }
            if units.iter().any(|u| u.1) {
                return Err(StepError::Permanent(anyhow::anyhow!("poison")));
            }
            self.applied.extend(units.iter().map(|u| u.0));
            Ok(())
        }
        async fn dead_letter(&mut self, u: &U, reason: &str) -> Result<(), StepError> {
            self.dead.push((u.0, reason.to_owned()));
            Ok(())
        }
    }

    fn runner() -> Runner {
        Runner {
            ready: Ready::default(),
            shutdown: CancellationToken::new(),
            names: Names {
                errors: "t_errors_total",
                bisections: "t_bisections_total",
                stage: "test",
            },
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn bisection_dead_letters_only_the_poison_and_keeps_order() {
        for flaky in [false, true] {
            let units: Vec<U> = (0..37)
                .map(|i| U(if i == 5 { -1 } else { i }, i == 11 || i == 30))
                .collect();
            let mut step = Fake {
                flaky,
                ..Fake::default()
            };
            runner().batch(&mut step, &units).await.unwrap();
            let want: Vec<i64> = (0..37).filter(|i| ![5, 11, 30].contains(i)).collect();
            assert_eq!(
                step.applied, want,
                "everything else applied once, in order (flaky {flaky})"
            );
            assert_eq!(
                step.dead,
                vec![(-1, "undecodable".into()), (11, "poison".into()), (30, "poison".into())]
            );
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_shutdown_stops_them() {
        struct Down(usize);
        impl Step for Down {
            type Unit = U;
            fn decode(&self, _m: &BorrowedMessage<'_>) -> Vec<U> {
                unreachable!()
            }
            fn rejected(&self, _u: &U) -> Option<String> {
                None
            }
            async fn process(&mut self, _units: &[U], _attempt: u32) -> Result<(), StepError> {
                self.0 += 1;
                Err(StepError::Transient(anyhow::anyhow!("postgres is down")))
            }
            async fn dead_letter(&mut self, _u: &U, _r: &str) -> Result<(), StepError> {
                panic!("a transient error is never dead-lettered")
            }
        }
        let r = runner();
        r.ready.set(true);
        let stop = r.shutdown.clone();
        let ready = r.ready.clone();
        let mut step = Down(0);
        let units = vec![U(1, false)];
        {
            let run = r.batch(&mut step, &units);
            tokio::pin!(run);
            // A second of retries (at most 2 ms apart here): still trying, not ready, never
            // dead-lettered.
            tokio::select! {
                _ = &mut run => panic!("gave up on a transient error"),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            assert!(!ready.get());
            stop.cancel();
            assert!(run.await.is_err(), "stopped without storing the batch");
        }
        assert!(step.0 > 100, "retried for the whole second: {}", step.0);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_ends() {
        let d: Vec<Duration> = backoff(MAX_DELAY).take(40).collect();
        assert_eq!(d.len(), 40);
        assert!(d.iter().all(|x| *x <= Duration::from_secs(20)), "{d:?}");
        assert!(d[30] >= Duration::from_secs(5), "{d:?}");
    }

    #[test]
    fn classes() {
        let io = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("settle");
        assert_eq!(classify(&io), Class::Transient);
        let other = anyhow::anyhow!("anything else");
        assert_eq!(classify(&other), Class::Transient);
        let redis_io = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "x"));
        assert_eq!(classify(&anyhow::Error::new(redis_io)), Class::Transient);
        let too_large =
            rdkafka::error::KafkaError::MessageProduction(rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&anyhow::Error::new(too_large)), Class::Permanent);
        let queue = rdkafka::error::KafkaError::MessageProduction(rdkafka::error::RDKafkaErrorCode::QueueFull);
        assert_eq!(classify(&anyhow::Error::new(queue)), Class::Transient);
    }
}
