//! The sender: fans new outbox messages out to their endpoints' deliveries, claims due
//! deliveries, posts them with Standard Webhooks headers, and records each attempt.
//!
//! Claims take `FOR UPDATE SKIP LOCKED` rows and stamp them with a lease (a fresh id, and a due
//! time pushed past the request timeout), in a short transaction: two ledger-writers never send
//! the same delivery at once, and one that dies mid-send leaves a lease that runs out, after
//! which the delivery is sent again with the same `webhook-id`. Each attempt is signed afresh
//! (new `webhook-timestamp`) with the endpoint's secret and, for 24 hours after a rotation, the
//! previous one too. 2xx within the timeout is success; anything else is retried on the
//! schedule and then marked failed; an endpoint whose message failed with no success to it in
//! the meantime is disabled. Concurrency is bounded by a semaphore, and per endpoint, and the
//! sender has its own Postgres pool and thread, so hanging receivers cost the settle path
//! nothing; while settlement is busy the sender also holds back to a low rate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared::webhook::address::{check_url, RefusedAddress, SafeResolver};
use shared::webhook::sign::signature_header;
use sqlx::PgPool;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::outbox::{dispatch, flush_rejections, public_id};
use super::{Config, SettleDuty};
use crate::metric as m;

/// How long after a rotation the previous secret still signs.
const ROTATION_OVERLAP: chrono::Duration = chrono::Duration::hours(24);
/// How much of a receiver's answer the delivery log keeps.
const RESPONSE_KEEP: usize = 1024;

pub struct Sender {
    db: PgPool,
    http: reqwest::Client,
    cfg: Config,
    /// Settlement's duty cycle: the sender yields while settlement is busy.
    duty: SettleDuty,
}

/// Deliveries in flight per endpoint, by the task that sends each.
#[derive(Default)]
struct InFlight {
    per_endpoint: HashMap<Uuid, i32>,
    task_endpoint: HashMap<tokio::task::Id, Uuid>,
}

impl InFlight {
    fn start(&mut self, task: tokio::task::Id, endpoint: Uuid) {
        *self.per_endpoint.entry(endpoint).or_default() += 1;
        self.task_endpoint.insert(task, endpoint);
    }

    /// A task ended, however it ended (a panic too): its delivery no longer counts.
    fn end(&mut self, task: tokio::task::Id) {
        let Some(endpoint) = self.task_endpoint.remove(&task) else {
            return;
        };
        if let Some(n) = self.per_endpoint.get_mut(&endpoint) {
            *n -= 1;
            if *n <= 0 {
                self.per_endpoint.remove(&endpoint);
            }
        }
    }
}

fn task_id(r: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match r {
        Ok((id, ())) => *id,
        Err(e) => e.id(),
    }
}

/// A claimed delivery and what is needed to send it.
#[derive(sqlx::FromRow)]
struct Claimed {
    message_id: Uuid,
    endpoint_id: Uuid,
    attempts: i32,
    max_attempts: Option<i32>,
    first_attempt_at: Option<DateTime<Utc>>,
    url: String,
    secret: String,
    previous_secret: Option<String>,
    rotated_at: Option<DateTime<Utc>>,
    body: String,
}

/// A finished attempt, on its way to the recorder.
struct Done {
    d: Claimed,
    lease: Uuid,
    a: Attempt,
    elapsed: Duration,
    started_at: DateTime<Utc>,
}

/// Column vectors of one recorder batch.
#[derive(Default)]
struct RecordCols {
    message: Vec<Uuid>,
    endpoint: Vec<Uuid>,
    lease: Vec<Uuid>,
    attempt: Vec<i32>,
    at: Vec<DateTime<Utc>>,
    first: Vec<DateTime<Utc>>,
    outcome: Vec<&'static str>,
    code: Vec<Option<i32>>,
    ms: Vec<i32>,
    response: Vec<Option<String>>,
    status: Vec<&'static str>,
    delay: Vec<f64>,
}

/// How one attempt ended. `outcome` is one of a fixed set (it labels a metric).
struct Attempt {
    outcome: &'static str,
    status: Option<u16>,
    response: Option<String>,
}

impl Attempt {
    fn ok(&self) -> bool {
        self.outcome == "success"
    }
}

impl Sender {
    pub fn new(db: PgPool, cfg: Config, duty: SettleDuty) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names where we cannot check them.
            .no_proxy()
            .user_agent(concat!("credits-webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(30));
        if !cfg.allow_private {
            b = b.dns_resolver(Arc::new(SafeResolver));
        }
        Ok(Sender {
            db,
            http: b.build()?,
            cfg,
            duty,
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms) + Duration::from_secs(5)
    }

    /// Claim and send until `shutdown`; then wait (bounded) for the attempts in flight.
    ///
    /// Settlement comes first: while it spends most of its time settling, each poll starts at
    /// most its share of `busy_rate` deliveries and fans out few messages, and the sender
    /// catches up once settlement does. No endpoint has more than `endpoint_concurrency`
    /// deliveries in flight, so hanging receivers leave slots to the others.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.cfg.concurrency as usize));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut in_flight = InFlight::default();
        let (done, finished) = mpsc::channel::<Done>(this.cfg.concurrency as usize * 2);
        let recorder = tokio::spawn(this.clone().recorder(finished));
        let poll = Duration::from_millis(this.cfg.poll_ms.max(10));
        let busy_per_poll = ((u64::from(this.cfg.busy_rate) * poll.as_millis() as u64) / 1000).max(1) as usize;
        let mut last_flush = Instant::now();
        let mut last_gauge: Option<Instant> = None;
        // Whether the last claim found fewer due deliveries than it could take.
        let mut short = true;
        // How long the most overdue work has waited (from the gauges, every 5 s).
        let mut overdue = Duration::ZERO;
        tracing::info!(
            concurrency = this.cfg.concurrency,
            endpoint_concurrency = this.cfg.endpoint_concurrency,
            busy_rate = this.cfg.busy_rate,
            "webhook sender running"
        );
        while !shutdown.is_cancelled() {
            while let Some(r) = tasks.try_join_next_with_id() {
                in_flight.end(task_id(&r));
            }
            if last_flush.elapsed() >= Duration::from_secs(1) {
                last_flush = Instant::now();
                match flush_rejections(&this.db, this.cfg.rejected_window_s).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(messages = n, "rejection windows closed"),
                    Err(e) => this.error("flush", &e),
                }
            }
            if last_gauge.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                last_gauge = Some(Instant::now());
                match this.gauges().await {
                    Ok(o) => overdue = Duration::from_secs_f64(o.max(0.0)),
                    Err(e) => this.error("gauge", &e),
                }
            }
            // Settlement first, but not forever: past `max_yield_s` of overdue work the sender
            // runs at full speed until it has caught up.
            let yielding =
                this.cfg.busy_rate > 0 && overdue < Duration::from_secs(this.cfg.max_yield_s) && this.duty.busy();
            if yielding {
                metrics::counter!(m::WEBHOOK_YIELDED_POLLS).increment(1);
            }
            // Fan messages out to deliveries: all of them normally; while yielding, only when
            // the last claim found too little due, and no more messages than the poll may send
            // (each gives at least one delivery; fan-out is most of the sender's Postgres work).
            let fan_out = match (yielding, short) {
                (false, _) => 1000,
                (true, true) => busy_per_poll as i64,
                (true, false) => 0,
            };
            if fan_out > 0 {
                loop {
                    match dispatch(&this.db, fan_out).await {
                        Ok(n) if n == fan_out as u64 && !yielding => continue,
                        Ok(_) => break,
                        Err(e) => {
                            this.error("dispatch", &e.into());
                            break;
                        }
                    }
                }
            }
            let want = slots
                .available_permits()
                .min(if yielding { busy_per_poll } else { 500 });
            let mut claimed = 0;
            if want > 0 {
                match this.claim(want, &in_flight.per_endpoint).await {
                    Ok(batch) => {
                        claimed = batch.len();
                        short = claimed < want;
                        for (d, lease) in batch {
                            let Ok(permit) = slots.clone().acquire_owned().await else {
                                break;
                            };
                            let endpoint = d.endpoint_id;
                            let task = tasks.spawn(this.clone().deliver(d, lease, done.clone(), permit));
                            in_flight.start(task.id(), endpoint);
                        }
                    }
                    Err(e) => this.error("claim", &e),
                }
            }
            if !yielding && claimed > 0 && claimed == want {
                continue; // more may be due
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(r) = tasks.join_next_with_id(), if slots.available_permits() == 0 => in_flight.end(task_id(&r)),
            }
        }
        let drained = tokio::time::timeout(shared::config::SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Their leases run out and another sender (or the next start) sends them again.
            tasks.abort_all();
        }
        drop(done);
        let _ = tokio::time::timeout(Duration::from_secs(5), recorder).await;
        tracing::info!("webhook sender stopped");
    }

    fn error(&self, stage: &'static str, e: &anyhow::Error) {
        metrics::counter!(m::ERRORS, "stage" => format!("webhook_{stage}")).increment(1);
        tracing::warn!(error = %format!("{e:#}"), stage, "webhook sender");
    }

    /// Set the backlog gauges; returns how long the most overdue work has waited past its time,
    /// in seconds: the oldest due delivery, or the oldest message not yet fanned out.
    async fn gauges(&self) -> anyhow::Result<f64> {
        let (n, age, overdue): (i64, f64, f64) = sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(d.created_at)), 0)::float8,
                GREATEST(
                    COALESCE(EXTRACT(EPOCH FROM now() - min(d.next_attempt_at) FILTER (WHERE d.next_attempt_at <= now())), 0),
                    COALESCE((SELECT EXTRACT(EPOCH FROM now() - min(created_at)) FROM webhook_messages
                              WHERE NOT dispatched), 0))::float8
             FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.disabled_at IS NULL
             WHERE d.status = 'pending'",
        )
        .fetch_one(&self.db)
        .await?;
        metrics::gauge!(m::WEBHOOK_BACKLOG).set(n as f64);
        metrics::gauge!(m::WEBHOOK_OLDEST_AGE).set(age);
        Ok(overdue)
    }

    /// Take up to `n` due deliveries of enabled endpoints under a new lease, none for an
    /// endpoint beyond `endpoint_concurrency` counting those `in_flight` in this process (the
    /// cap is per replica). Endpoints take turns (the one with the fewest in flight first, then
    /// the oldest due), so hanging receivers cannot crowd out the rest. Candidates are ranked
    /// without locks; only the `n` chosen are locked (`SKIP LOCKED`: another replica's are
    /// left to it).
    async fn claim(&self, n: usize, in_flight: &HashMap<Uuid, i32>) -> anyhow::Result<Vec<(Claimed, Uuid)>> {
        let lease = Uuid::now_v7();
        let (busy, counts): (Vec<Uuid>, Vec<i32>) = in_flight.iter().map(|(e, c)| (*e, *c)).unzip();
        let rows: Vec<Claimed> = sqlx::query_as(
            "WITH ranked AS (
                SELECT x.message_id, x.endpoint_id FROM webhook_endpoints e2
                LEFT JOIN UNNEST($4::uuid[], $5::int4[]) AS b(id, n) ON b.id = e2.id
                CROSS JOIN LATERAL (
                    SELECT d2.message_id, d2.endpoint_id, d2.next_attempt_at,
                           row_number() OVER (ORDER BY d2.next_attempt_at) AS rank
                    FROM webhook_deliveries d2
                    WHERE d2.endpoint_id = e2.id AND d2.status = 'pending' AND d2.next_attempt_at <= now()
                    ORDER BY d2.next_attempt_at LIMIT GREATEST($6 - COALESCE(b.n, 0), 0)) x
                WHERE e2.disabled_at IS NULL
                ORDER BY COALESCE(b.n, 0) + x.rank, x.next_attempt_at LIMIT $3),
             due AS (
                SELECT d3.message_id, d3.endpoint_id FROM webhook_deliveries d3
                JOIN ranked r ON r.message_id = d3.message_id AND r.endpoint_id = d3.endpoint_id
                WHERE d3.status = 'pending' AND d3.next_attempt_at <= now()
                FOR UPDATE OF d3 SKIP LOCKED)
             UPDATE webhook_deliveries d SET lease = $1, next_attempt_at = now() + make_interval(secs => $2)
             FROM due, webhook_endpoints e, webhook_messages m
             WHERE d.message_id = due.message_id AND d.endpoint_id = due.endpoint_id
               AND e.id = d.endpoint_id AND m.id = d.message_id
             RETURNING d.message_id, d.endpoint_id, d.attempts, d.max_attempts, d.first_attempt_at, e.url, e.secret,
                       e.previous_secret, e.rotated_at, m.body",
        )
        .bind(lease)
        .bind(self.lease().as_secs_f64())
        .bind(n as i64)
        .bind(&busy)
        .bind(&counts)
        .bind(self.cfg.endpoint_concurrency as i32)
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| (r, lease)).collect())
    }

    async fn deliver(self: Arc<Self>, d: Claimed, lease: Uuid, done: mpsc::Sender<Done>, _slot: OwnedSemaphorePermit) {
        let started_at = Utc::now();
        let started = Instant::now();
        let a = self.send(&d).await;
        let elapsed = started.elapsed();
        metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => a.outcome).increment(1);
        metrics::histogram!(m::WEBHOOK_DURATION).record(elapsed.as_secs_f64());
        // The lease keeps the delivery from being claimed again until the recorder has it.
        let _ = done
            .send(Done {
                d,
                lease,
                a,
                elapsed,
                started_at,
            })
            .await;
    }

    async fn send(&self, d: &Claimed) -> Attempt {
        let refused = |why: String| Attempt {
            outcome: "refused_address",
            status: None,
            response: Some(why),
        };
        let url = match check_url(&d.url, self.cfg.allow_private) {
            Ok(u) => u,
            Err(e) => return refused(e.to_string()),
        };
        let id = public_id(d.message_id);
        let ts = Utc::now().timestamp();
        let mut secrets = vec![d.secret.as_str()];
        if let (Some(p), Some(at)) = (&d.previous_secret, d.rotated_at) {
            if Utc::now() < at + ROTATION_OVERLAP {
                secrets.push(p);
            }
        }
        let sig = match signature_header(&secrets, &id, ts, d.body.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                return Attempt {
                    outcome: "error",
                    status: None,
                    response: Some(e.to_string()),
                }
            }
        };
        let sent = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(d.body.clone())
            .send()
            .await;
        match sent {
            Ok(mut r) => {
                let status = r.status();
                let mut kept: Vec<u8> = Vec::new();
                let mut timed_out = false;
                while kept.len() < RESPONSE_KEEP {
                    match r.chunk().await {
                        Ok(Some(c)) => kept.extend_from_slice(&c[..c.len().min(RESPONSE_KEEP - kept.len())]),
                        Ok(None) => break,
                        Err(e) => {
                            timed_out = e.is_timeout();
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&kept).into_owned();
                let outcome = if timed_out {
                    "timeout"
                } else if status.is_success() {
                    "success"
                } else {
                    "http_error"
                };
                Attempt {
                    outcome,
                    status: Some(status.as_u16()),
                    response: Some(text),
                }
            }
            Err(e) => {
                let mut source: Option<&dyn std::error::Error> = Some(&e);
                while let Some(s) = source {
                    if let Some(r) = s.downcast_ref::<RefusedAddress>() {
                        return refused(r.to_string());
                    }
                    source = s.source();
                }
                let outcome = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "error"
                };
                Attempt {
                    outcome,
                    status: None,
                    response: Some(format!("{e:#}").chars().take(RESPONSE_KEEP).collect()),
                }
            }
        }
    }

    /// Records finished attempts, many per transaction, until every sender of `rx` is gone.
    async fn recorder(self: Arc<Self>, mut rx: mpsc::Receiver<Done>) {
        let mut batch: Vec<Done> = Vec::new();
        while rx.recv_many(&mut batch, 500).await > 0 {
            for attempt in 1..=5u64 {
                match self.record(&batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        self.error("record", &e);
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                }
            }
            batch.clear();
        }
    }

    /// Log the attempts and move each delivery on: delivered, due again on the schedule, or
    /// failed (and its endpoint disabled if nothing reached it since the message's first try).
    async fn record(&self, batch: &[Done]) -> anyhow::Result<()> {
        let schedule = &self.cfg.retry_schedule.0;
        let mut c = RecordCols::default();
        for x in batch {
            let n = x.d.attempts + 1;
            let max = x.d.max_attempts.unwrap_or(1 + schedule.len() as i32);
            let (status, delay) = if x.a.ok() {
                ("delivered", Duration::ZERO)
            } else if n >= max {
                ("failed", Duration::ZERO)
            } else {
                let i = ((n - 1).max(0) as usize).min(schedule.len().saturating_sub(1));
                ("pending", schedule.get(i).copied().unwrap_or_default())
            };
            c.message.push(x.d.message_id);
            c.endpoint.push(x.d.endpoint_id);
            c.lease.push(x.lease);
            c.attempt.push(n);
            c.at.push(x.started_at);
            c.first.push(x.d.first_attempt_at.unwrap_or(x.started_at));
            c.outcome.push(x.a.outcome);
            c.code.push(x.a.status.map(i32::from));
            c.ms.push(x.elapsed.as_millis().min(i32::MAX as u128) as i32);
            c.response.push(x.a.response.clone());
            c.status.push(status);
            c.delay.push(delay.as_secs_f64());
        }
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (message_id, endpoint_id, attempt, at, outcome, status_code, duration_ms, response)
             SELECT k.m, k.e, k.n, k.at, k.o, k.c, k.ms, k.r
             FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::timestamptz[], $5::text[], $6::int4[], $7::int4[],
                $8::text[]) AS k(m, e, n, at, o, c, ms, r)
             JOIN webhook_deliveries d ON d.message_id = k.m AND d.endpoint_id = k.e",
        )
        .bind(&c.message)
        .bind(&c.endpoint)
        .bind(&c.attempt)
        .bind(&c.at)
        .bind(&c.outcome)
        .bind(&c.code)
        .bind(&c.ms)
        .bind(&c.response)
        .execute(&mut *tx)
        .await?;
        // Only a delivery still under this attempt's lease moves (a manual retry may have
        // taken it over meanwhile).
        let moved: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE webhook_deliveries d SET status = k.s, attempts = d.attempts + 1, lease = NULL,
                first_attempt_at = COALESCE(d.first_attempt_at, k.at), last_attempt_at = now(),
                next_attempt_at = now() + make_interval(secs => k.delay)
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::float8[],
                $7::timestamptz[]) AS k(m, e, l, s, at, delay, first)
             WHERE d.message_id = k.m AND d.endpoint_id = k.e AND d.lease = k.l
             RETURNING d.endpoint_id, d.status, k.first",
        )
        .bind(&c.message)
        .bind(&c.endpoint)
        .bind(&c.lease)
        .bind(&c.status)
        .bind(&c.at)
        .bind(&c.delay)
        .bind(&c.first)
        .fetch_all(&mut *tx)
        .await?;
        let mut ok: Vec<Uuid> = moved.iter().filter(|r| r.1 == "delivered").map(|r| r.0).collect();
        ok.sort_unstable();
        ok.dedup();
        if !ok.is_empty() {
            sqlx::query("UPDATE webhook_endpoints SET last_success_at = now() WHERE id = ANY ($1)")
                .bind(&ok)
                .execute(&mut *tx)
                .await?;
        }
        for (endpoint, _, first) in moved.iter().filter(|r| r.1 == "failed") {
            let disabled = sqlx::query(
                "UPDATE webhook_endpoints SET disabled_at = now(),
                    disabled_reason = 'every attempt failed since ' || to_char($2 AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                 WHERE id = $1 AND disabled_at IS NULL AND (last_success_at IS NULL OR last_success_at < $2)",
            )
            .bind(endpoint)
            .bind(first)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if disabled == 1 {
                metrics::counter!(m::WEBHOOK_ENDPOINTS_DISABLED).increment(1);
                tracing::warn!(%endpoint, "webhook endpoint disabled after repeated total failure");
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
