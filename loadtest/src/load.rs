//! The open-loop driver: dispatches each batch when it is due, records what came back.
//!
//! One generator loop sleeps until batch `k` is due, takes a permit from a semaphore of
//! `--concurrency` without waiting (if none is free the batch is counted as dropped by the
//! generator, so the schedule never slips), and spawns the request. Latency is measured from
//! the *scheduled* time, so any queueing (in the generator, the client or the server) counts.
//! Nothing is retried. A single collector task owns every counter, the histogram and the
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
    /// HTTP latency after warm-up, microseconds from the scheduled send time.
    pub http_us: Histogram<u64>,
    pub expected: Expected,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

enum SendResult {
    Accepted { reported: Option<u64> },
    Rejected(String),
}

struct Completion {
    batch: Batch,
    result: SendResult,
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
    let collector = tokio::spawn(collect(rx, progress.clone()));
    let semaphore = Arc::new(Semaphore::new(cfg.concurrency));

    let started_at = Utc::now();
    let start = Instant::now();
    let (mut dropped_batches, mut dropped_events) = (0u64, 0u64);
    for k in 0..total_batches {
        let offset = schedule.offset(k);
        let due = start + offset;
        tokio::time::sleep_until(due).await;
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
        tokio::spawn(async move {
            let result = send(&client, &url, &key, &batch).await;
            let latency = due.elapsed();
            drop(permit);
            // The collector outlives every sender; a send error would only mean it panicked.
            let _ = tx.send(Completion {
                batch,
                result,
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
    Ok(outcome)
}

async fn send(client: &Client, url: &str, key: &str, batch: &Batch) -> SendResult {
    let body = batch_body(&batch.events);
    let resp = match client
        .post(url)
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => return SendResult::Rejected(transport_label(&e).to_owned()),
    };
    let status = resp.status();
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return SendResult::Rejected(format!("{}_body", transport_label(&e))),
    };
    if status == StatusCode::ACCEPTED {
        let reported = serde_json::from_slice::<AcceptedReply>(&bytes).ok().map(|r| r.accepted);
        SendResult::Accepted { reported }
    } else {
        SendResult::Rejected(status.as_u16().to_string())
    }
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

async fn collect(mut rx: mpsc::UnboundedReceiver<Completion>, progress: ProgressBar) -> LoadOutcome {
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
        http_us: new_histogram(),
        expected: Expected::new(),
    };
    while let Some(c) = rx.recv().await {
        let n = c.batch.events.len() as u64;
        o.requests += 1;
        o.sent += n;
        o.duplicates_sent += u64::from(c.batch.duplicates);
        match c.result {
            SendResult::Accepted { reported } => {
                o.accepted += n;
                if reported != Some(n) {
                    o.accepted_count_mismatches += 1;
                }
                for ev in &c.batch.events {
                    o.expected.accept(c.batch.tenant, ev);
                }
            }
            SendResult::Rejected(label) => {
                o.rejected += n;
                *o.rejected_by_status.entry(label).or_default() += n;
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
    format!("sent {} accepted {} rejected {}", o.sent, o.accepted, o.rejected)
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
    }
}
