//! The open-loop driver: dispatches each batch when it is due, records what came back.
//!
//! One generator loop sleeps until batch `k` is due, takes a permit from a semaphore of
//! `--concurrency` without waiting (if none is free the batch is counted as dropped by the
//! generator, so the schedule never slips), and spawns the request. Latency is measured from
//! the *scheduled* time, so any queueing (in the generator, the client or the server) counts.
//! Without a [`RetryPolicy`] nothing is retried; with one (`--retry`) a request that fails with a
//! connection error, a timeout, a 5xx or a 429 is sent again with the same body until a try gets
//! a 202 or its budget runs out, holding its concurrency permit meanwhile (latency then runs to
//! the final answer). A single collector task owns every counter, the histogram and the
//! expected-charge bookkeeping, and drives the progress bar.
#![allow(clippy::float_arithmetic)] // rates and latencies only; money is Decimal

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use reqwest::{Client, StatusCode};
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::expected::Expected;
use crate::generator::{batch_body, Batch, CustomerMix, Generator, Schedule};
use crate::setup::Tenant;
use crate::timeline::{bump, LoadSeries};

/// Recent originals kept per tenant for duplicates to pick from.
const RING_CAPACITY: usize = 2048;
/// Highest latency the histograms track: one hour, in microseconds.
pub const HIST_MAX_US: u64 = 3_600_000_000;

/// What the load phase needs besides the tenants.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub batch: u32,
    pub concurrency: usize,
    pub duplicates: f64,
    /// Retry failed requests as a product server does (`--retry`); None: never retry.
    pub retry: Option<RetryPolicy>,
    /// Stop sending once this file exists (`--stop-file`).
    pub stop_file: Option<std::path::PathBuf>,
}

/// How a request that failed is retried: exponential backoff from `base` doubling up to `cap`,
/// with jitter (each wait is drawn from its upper half), at least the server's `Retry-After`
/// (itself capped at `max_retry_after`), until `max_total` has passed since the first try.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_total: Duration,
    pub base: Duration,
    pub cap: Duration,
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    /// The default backoff (100 ms doubling to 5 s, `Retry-After` honoured up to 10 s) with a
    /// total budget per request.
    pub fn with_budget(max_total: Duration) -> Self {
        Self {
            max_total,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(10),
        }
    }

    /// The wait before try `failed + 1` after `failed` failed tries; `jitter` in `[0, 1)`.
    pub fn delay(&self, failed: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << failed.saturating_sub(1).min(20))
            .min(self.cap);
        let jittered = exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        jittered.max(retry_after.map_or(Duration::ZERO, |r| r.min(self.max_retry_after)))
    }
}

/// Everything observed while sending.
#[derive(Debug)]
pub struct LoadOutcome {
    pub started_at: DateTime<Utc>,
    /// From the first due time until the last batch was dispatched.
    pub send_window: Duration,
    pub requests: u64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Rejected events by HTTP status (`"503"`) or transport failure (`"timeout"`, ...).
    pub rejected_by_status: BTreeMap<String, u64>,
    pub dropped_by_generator: u64,
    pub dropped_batches: u64,
    pub duplicates_sent: u64,
    /// 202 replies whose `accepted` differed from the batch size.
    pub accepted_count_mismatches: u64,
    /// HTTP tries, first ones included (equal to `requests` without `--retry`).
    pub tries: u64,
    /// Requests that needed more than one try.
    pub retried_requests: u64,
    /// Tries that failed and were retried, by what they failed with (`"503"`, `connect_error`, ...).
    pub retries_by_cause: BTreeMap<String, u64>,
    /// Most tries one request took.
    pub max_tries: u32,
    /// Events accepted on a try after the first.
    pub accepted_after_retry: u64,
    /// Events of requests given up when the retry budget ran out (part of `rejected`).
    pub abandoned: u64,
    /// The load ended early because the `--stop-file` appeared.
    pub stopped_by_file: bool,
    /// HTTP latency after warm-up, microseconds from the scheduled send time.
    pub http_us: Histogram<u64>,
    pub expected: Expected,
    /// Offered, accepted and rejected events per second, for the timeline.
    pub series: LoadSeries,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

enum SendResult {
    Accepted { reported: Option<u64> },
    Rejected(String),
}

/// One try: accepted, or failed with a label, whether it may be retried, whether the server may
/// have taken the events anyway, and the `Retry-After` it asked for.
enum TryResult {
    Accepted {
        reported: Option<u64>,
    },
    Failed {
        label: String,
        retryable: bool,
        ambiguous: bool,
        retry_after: Option<Duration>,
    },
}

/// A request's outcome over all its tries.
struct SendOutcome {
    result: SendResult,
    tries: u32,
    /// Labels of the failed tries that were retried.
    retried: Vec<String>,
    /// Some failed try may have reached the server and been processed (a timeout, a dropped
    /// connection, a 5xx): if the request was never accepted, its events may still settle.
    ambiguous: bool,
    /// The retry budget ran out.
    gave_up: bool,
}

struct Completion {
    batch: Batch,
    /// When it was due, from the start.
    offset: Duration,
    outcome: SendOutcome,
    latency: Duration,
    warmup: bool,
}

#[derive(Deserialize)]
struct AcceptedReply {
    accepted: u64,
}

/// Runs the load against the tenants and returns what was observed.
pub async fn run_load(client: &Client, cfg: &LoadConfig, tenants: &[Tenant], mix: CustomerMix) -> Result<LoadOutcome> {
    let schedule = Schedule::new(cfg.batch, cfg.rate, cfg.duration);
    let total_batches = schedule.total_batches();
    let mut generator = Generator::new(mix, cfg.duplicates, RING_CAPACITY, StdRng::from_entropy());
    let events_url: Arc<str> = format!("{}/v1/events", cfg.url.trim_end_matches('/')).into();
    let keys: Vec<Arc<str>> = tenants.iter().map(|t| Arc::from(t.api_key.as_str())).collect();

    let progress = progress_bar(total_batches * u64::from(cfg.batch))?;
    let (tx, rx) = mpsc::unbounded_channel::<Completion>();
    let collector = tokio::spawn(collect(rx, progress.clone(), cfg.retry.is_some()));
    let semaphore = Arc::new(Semaphore::new(cfg.concurrency));

    // About ten checks a second for the stop file, whatever the rate.
    let check_every = ((cfg.rate / f64::from(cfg.batch)) / 10.0).ceil().max(1.0) as u64;
    let mut stopped_by_file = false;
    let started_at = Utc::now();
    let start = Instant::now();
    let (mut dropped_batches, mut dropped_events) = (0u64, 0u64);
    let mut offered = Vec::new();
    for k in 0..total_batches {
        let offset = schedule.offset(k);
        let due = start + offset;
        tokio::time::sleep_until(due).await;
        if k % check_every == 0 && cfg.stop_file.as_deref().is_some_and(std::path::Path::exists) {
            stopped_by_file = true;
            break;
        }
        bump(&mut offered, offset.as_secs(), u64::from(cfg.batch));
        let Ok(permit) = semaphore.clone().try_acquire_owned() else {
            dropped_batches += 1;
            dropped_events += u64::from(cfg.batch);
            progress.inc(u64::from(cfg.batch));
            continue;
        };
        let batch = generator.next_batch(cfg.batch as usize);
        let (client, url, key, tx) = (
            client.clone(),
            events_url.clone(),
            keys[batch.tenant].clone(),
            tx.clone(),
        );
        let warmup = offset < cfg.warmup;
        let retry = cfg.retry;
        tokio::spawn(async move {
            let outcome = send_with_retries(&client, &url, &key, &batch, retry).await;
            let latency = due.elapsed();
            drop(permit);
            // The collector outlives every sender; a send error would only mean it panicked.
            let _ = tx.send(Completion {
                batch,
                offset,
                outcome,
                latency,
                warmup,
            });
        });
    }
    let send_window = start.elapsed();
    drop(tx);
    let mut outcome = collector.await.context("the collector task panicked")?;
    progress.finish_with_message(progress_message(&outcome));
    outcome.started_at = started_at;
    outcome.send_window = send_window;
    outcome.dropped_batches = dropped_batches;
    outcome.dropped_by_generator = dropped_events;
    outcome.stopped_by_file = stopped_by_file;
    outcome.series.offered = offered;
    Ok(outcome)
}

/// Sends a batch; with a retry policy, again with the same body after each retryable failure
/// until a try is accepted or the budget since the first try runs out.
async fn send_with_retries(
    client: &Client,
    url: &str,
    key: &str,
    batch: &Batch,
    retry: Option<RetryPolicy>,
) -> SendOutcome {
    // One body for every try: the same bytes, so the same idempotency keys.
    let body = batch_body(&batch.events);
    let first = Instant::now();
    let mut out = SendOutcome {
        result: SendResult::Rejected(String::new()),
        tries: 0,
        retried: Vec::new(),
        ambiguous: false,
        gave_up: false,
    };
    loop {
        out.tries += 1;
        match send_once(client, url, key, body.clone()).await {
            TryResult::Accepted { reported } => {
                out.result = SendResult::Accepted { reported };
                return out;
            }
            TryResult::Failed {
                label,
                retryable,
                ambiguous,
                retry_after,
            } => {
                out.ambiguous |= ambiguous;
                let Some(policy) = retry.filter(|_| retryable) else {
                    out.result = SendResult::Rejected(label);
                    return out;
                };
                let delay = policy.delay(out.tries, retry_after, rand::random::<f64>());
                if first.elapsed() + delay > policy.max_total {
                    out.gave_up = true;
                    out.result = SendResult::Rejected(label);
                    return out;
                }
                out.retried.push(label);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn send_once(client: &Client, url: &str, key: &str, body: Vec<u8>) -> TryResult {
    let transport = |label: String, e: &reqwest::Error| TryResult::Failed {
        label,
        retryable: true,
        // Refused before it was sent: the server never saw it. Anything later may have been
        // processed with the answer lost.
        ambiguous: !e.is_connect(),
        retry_after: None,
    };
    let resp = match client
        .post(url)
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => return transport(transport_label(&e).to_owned(), &e),
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return transport(format!("{}_body", transport_label(&e)), &e),
    };
    if status == StatusCode::ACCEPTED {
        let reported = serde_json::from_slice::<AcceptedReply>(&bytes).ok().map(|r| r.accepted);
        return TryResult::Accepted { reported };
    }
    TryResult::Failed {
        label: status.as_u16().to_string(),
        retryable: is_retryable(status),
        ambiguous: status.is_server_error(),
        retry_after,
    }
}

/// Statuses a product server retries with the same keys: every 5xx and 429.
pub fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn transport_label(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect_error"
    } else {
        "transport_error"
    }
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Completion>, progress: ProgressBar, retry: bool) -> LoadOutcome {
    let mut o = LoadOutcome {
        started_at: Utc::now(),
        send_window: Duration::ZERO,
        requests: 0,
        sent: 0,
        accepted: 0,
        rejected: 0,
        rejected_by_status: BTreeMap::new(),
        dropped_by_generator: 0,
        dropped_batches: 0,
        duplicates_sent: 0,
        accepted_count_mismatches: 0,
        tries: 0,
        retried_requests: 0,
        retries_by_cause: BTreeMap::new(),
        max_tries: 0,
        accepted_after_retry: 0,
        abandoned: 0,
        stopped_by_file: false,
        http_us: new_histogram(),
        expected: Expected::new(),
        series: LoadSeries::default(),
    };
    while let Some(c) = rx.recv().await {
        let n = c.batch.events.len() as u64;
        o.requests += 1;
        o.sent += n;
        o.duplicates_sent += u64::from(c.batch.duplicates);
        let tries = c.outcome.tries;
        o.tries += u64::from(tries);
        o.max_tries = o.max_tries.max(tries);
        if tries > 1 {
            o.retried_requests += 1;
        }
        for label in c.outcome.retried {
            *o.retries_by_cause.entry(label).or_default() += 1;
        }
        // The second the final answer came.
        let answered = (c.offset + c.latency).as_secs();
        match c.outcome.result {
            SendResult::Accepted { reported } => {
                o.accepted += n;
                bump(&mut o.series.accepted, answered, n);
                if tries > 1 {
                    o.accepted_after_retry += n;
                }
                if reported != Some(n) {
                    o.accepted_count_mismatches += 1;
                }
                for ev in &c.batch.events {
                    o.expected.accept(c.batch.tenant, ev);
                }
            }
            SendResult::Rejected(label) => {
                o.rejected += n;
                bump(&mut o.series.rejected, answered, n);
                *o.rejected_by_status.entry(label).or_default() += n;
                if c.outcome.gave_up {
                    o.abandoned += n;
                }
                // With retries, a request that was never accepted but may have reached the
                // server is not an error if it settles (once): remember its events.
                if retry && c.outcome.ambiguous {
                    for ev in &c.batch.events {
                        o.expected.maybe(c.batch.tenant, ev);
                    }
                }
            }
        }
        if !c.warmup {
            let us = u64::try_from(c.latency.as_micros()).unwrap_or(u64::MAX);
            o.http_us.saturating_record(us.max(1));
        }
        progress.inc(n);
        progress.set_message(progress_message(&o));
    }
    o
}

fn progress_message(o: &LoadOutcome) -> String {
    let retried = if o.tries > o.requests {
        format!(" retries {}", o.tries - o.requests)
    } else {
        String::new()
    };
    format!(
        "sent {} accepted {} rejected {}{retried}",
        o.sent, o.accepted, o.rejected
    )
}

fn progress_bar(total_events: u64) -> Result<ProgressBar> {
    let bar = ProgressBar::new(total_events);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} events ({per_sec}) {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    Ok(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// A minimal keep-alive HTTP/1.1 server: 202 `{"accepted": n}`, but every 5th request 503.
    async fn mock_ingest() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let served = served.clone();
                tokio::spawn(async move {
                    let mut rd = BufReader::new(sock);
                    loop {
                        let (mut line, mut len) = (String::new(), 0usize);
                        loop {
                            line.clear();
                            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        rd.read_exact(&mut body).await.unwrap();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let n = v["events"].as_array().unwrap().len();
                        let k = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let (status, reply) = if k % 5 == 4 {
                            (
                                "503 Service Unavailable",
                                r#"{"error":{"code":"saturated"}}"#.to_owned(),
                            )
                        } else {
                            ("202 Accepted", format!(r#"{{"accepted":{n}}}"#))
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        rd.get_mut().write_all(resp.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drives_the_schedule_and_accounts_for_every_event() {
        let url = mock_ingest().await;
        let tenants: Vec<Tenant> = (0..2)
            .map(|i| Tenant {
                id: format!("t{i}"),
                api_key: format!("k{i}"),
                customers: vec![],
            })
            .collect();
        let cfg = LoadConfig {
            url,
            rate: 2000.0,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            batch: 20,
            concurrency: 16,
            duplicates: 0.2,
            retry: None,
            stop_file: None,
        };
        let client = crate::setup::http_client(16).unwrap();
        let t0 = std::time::Instant::now();
        let o = run_load(&client, &cfg, &tenants, CustomerMix::new(10, 2, 0.1))
            .await
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(480),
            "the schedule spans the duration"
        );
        assert_eq!(o.sent + o.dropped_by_generator, 1000);
        assert_eq!(o.requests + o.dropped_batches, 50);
        assert_eq!(o.accepted + o.rejected, o.sent);
        assert_eq!(o.rejected_by_status.get("503").copied().unwrap_or(0), o.rejected);
        assert!(o.rejected > 0 && o.accepted > 0);
        assert_eq!(o.accepted_count_mismatches, 0);
        assert_eq!(o.expected.accepted_sends(), o.accepted);
        assert!(o.duplicates_sent > 0 && o.expected.unique_accepted() < o.accepted);
        // Warm-up batches (the first 5) are not in the histogram.
        assert!(o.http_us.len() <= o.requests + o.dropped_batches - 5);
        assert!(!o.http_us.is_empty());
        // Nothing is retried without a policy.
        assert_eq!((o.tries, o.retried_requests, o.max_tries), (o.requests, 0, 1));
        assert_eq!(o.expected.maybe_count(), 0);
        // The per-second series add up to the totals: every batch of half a second was offered
        // in second 0, dropped ones included.
        assert_eq!(o.series.offered, [1000]);
        assert_eq!(o.series.accepted.iter().sum::<u64>(), o.accepted);
        assert_eq!(o.series.rejected.iter().sum::<u64>(), o.rejected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_retries_every_event_is_accepted_with_its_own_keys() {
        let url = mock_ingest().await;
        let tenants: Vec<Tenant> = (0..2)
            .map(|i| Tenant {
                id: format!("t{i}"),
                api_key: format!("k{i}"),
                customers: vec![],
            })
            .collect();
        let cfg = LoadConfig {
            url,
            rate: 2000.0,
            duration: Duration::from_millis(500),
            warmup: Duration::ZERO,
            batch: 20,
            concurrency: 64,
            duplicates: 0.0,
            retry: Some(RetryPolicy::with_budget(Duration::from_secs(20))),
            stop_file: None,
        };
        let client = crate::setup::http_client(64).unwrap();
        let o = run_load(&client, &cfg, &tenants, CustomerMix::new(10, 2, 0.0))
            .await
            .unwrap();
        assert_eq!(o.dropped_batches, 0);
        assert_eq!(o.requests, 50);
        // Every 5th try is a 503: each one was retried, and every event ended accepted once.
        assert_eq!(o.rejected, 0);
        assert_eq!(o.accepted, 1000);
        assert_eq!(o.expected.unique_accepted(), 1000);
        assert_eq!(
            o.tries,
            o.requests + o.retries_by_cause.get("503").copied().unwrap_or(0)
        );
        assert!(o.tries > o.requests && o.retried_requests > 0);
        assert_eq!(o.accepted_after_retry, o.retried_requests * 20);
        assert_eq!(o.abandoned, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stop_file_ends_the_load_early() {
        let url = mock_ingest().await;
        let tenants = vec![Tenant {
            id: "t0".into(),
            api_key: "k0".into(),
            customers: vec![],
        }];
        let stop = std::env::temp_dir().join(format!("loadtest-stop-{}", uuid::Uuid::new_v4()));
        let cfg = LoadConfig {
            url,
            rate: 1000.0,
            duration: Duration::from_secs(30),
            warmup: Duration::ZERO,
            batch: 10,
            concurrency: 16,
            duplicates: 0.0,
            retry: None,
            stop_file: Some(stop.clone()),
        };
        let path = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            std::fs::write(&path, b"").unwrap();
        });
        let client = crate::setup::http_client(16).unwrap();
        let t0 = std::time::Instant::now();
        let o = run_load(&client, &cfg, &tenants, CustomerMix::new(4, 1, 0.0))
            .await
            .unwrap();
        std::fs::remove_file(&stop).unwrap();
        assert!(o.stopped_by_file);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "stopped after {:?}",
            t0.elapsed()
        );
        assert!(o.requests > 10 && o.requests < 3000, "{} requests", o.requests);
        assert_eq!(o.sent, o.requests * 10);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_until_the_budget_runs_out() {
        // A port nobody listens on: every try is a connection error (never ambiguous).
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let client = crate::setup::http_client(4).unwrap();
        let mut g = Generator::new(CustomerMix::new(2, 1, 0.0), 0.0, 16, StdRng::seed_from_u64(1));
        let batch = g.next_batch(3);
        let policy = RetryPolicy {
            max_total: Duration::from_millis(600),
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(1),
        };
        let t0 = std::time::Instant::now();
        let out = send_with_retries(&client, &format!("http://{addr}/v1/events"), "k", &batch, Some(policy)).await;
        assert!(t0.elapsed() <= Duration::from_secs(2));
        assert!(out.gave_up && !out.ambiguous && out.tries >= 3, "tries {}", out.tries);
        assert!(matches!(out.result, SendResult::Rejected(ref l) if l == "connect_error"));
        assert_eq!(out.retried.len() as u32, out.tries - 1);
        // Without a policy: one try.
        let once = send_with_retries(&client, &format!("http://{addr}/v1/events"), "k", &batch, None).await;
        assert_eq!((once.tries, once.gave_up), (1, false));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
        let p = RetryPolicy::with_budget(Duration::from_secs(120));
        assert_eq!(p.delay(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_millis(400));
        assert_eq!(p.delay(30, None, 1.0), Duration::from_secs(5));
        assert_eq!(p.delay(30, None, 0.0), Duration::from_millis(2500));
        assert_eq!(p.delay(1, Some(Duration::from_secs(1)), 0.5), Duration::from_secs(1));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 0.5),
            Duration::from_secs(10)
        );
        assert!(is_retryable(StatusCode::SERVICE_UNAVAILABLE) && is_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!is_retryable(StatusCode::UNPROCESSABLE_ENTITY) && !is_retryable(StatusCode::UNAUTHORIZED));
    }
}
