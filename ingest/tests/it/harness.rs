//! A whole pipeline per test: its own database, topics, Redis prefix and consumer groups, and
//! the three real binaries as child processes (so a test can SIGKILL one and restart it).
//! Addresses come from the environment with loopback defaults.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::{Child, Command};

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}
fn db_base() -> String {
    std::env::var("DATABASE_URL_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A workspace binary. `CREDITS_BIN_DIR` names a directory that holds the built binaries
/// (deploy/local/test sets it after its `cargo build --release --workspace --bins --tests`);
/// without it, Cargo builds them (escargot runs that same build for this test's profile, a
/// no-op when nothing changed, once per test process), so `cargo test -p ingest` alone builds
/// what the pipeline tests start.
fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<HashMap<String, PathBuf>> = std::sync::OnceLock::new();
    if let Some(dir) = std::env::var_os("CREDITS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let built = BUILT.get_or_init(build_binaries);
    match built.get(name) {
        Some(p) => p.clone(),
        None => panic!("cargo built no binary named {name} (built: {:?})", built.keys()),
    }
}

/// `cargo build --workspace --bins --tests` (the selection deploy/local/test builds, so features
/// unify the same way and nothing is rebuilt twice): binary name -> its path.
fn build_binaries() -> HashMap<String, PathBuf> {
    let msgs = escargot::CargoBuild::new()
        .current_release()
        .args(["--workspace", "--bins", "--tests"])
        .exec()
        .expect("starting cargo build for the pipeline tests' binaries");
    let mut out = HashMap::new();
    for m in msgs {
        let m = m.expect("cargo build of the pipeline tests' binaries failed");
        if let Ok(escargot::format::Message::CompilerArtifact(a)) = m.decode() {
            // A bin target's own unit-test harness is an executable too: not the binary.
            let binary = a.target.kind.iter().any(|k| k == "bin") && !a.profile.test;
            if let (true, Some(exe)) = (binary, a.executable) {
                out.insert(a.target.name.to_string(), exe.to_path_buf());
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Svc {
    Ingest,
    /// A second ingest (same topics, database and Redis; its own ports: `url2`).
    Ingest2,
    Rater,
    /// A second rater in the same consumer group.
    Rater2,
    LedgerWriter,
}

impl Svc {
    fn bin(self) -> &'static str {
        match self {
            Svc::Ingest | Svc::Ingest2 => "ingest",
            Svc::Rater | Svc::Rater2 => "rater",
            Svc::LedgerWriter => "ledger-writer",
        }
    }
}

pub struct Stack {
    pub name: String,
    pub db: PgPool,
    pub db_name: String,
    pub env: Vec<(String, String)>,
    pub url: String,
    /// The second ingest's API (Svc::Ingest2).
    pub url2: String,
    pub admin_token: String,
    pub http: reqwest::Client,
    pub input_topic: String,
    pub ledger_topic: String,
    pub dlq_topic: String,
    pub redis_prefix: String,
    metrics: HashMap<Svc, String>,
    children: HashMap<Svc, Child>,
    logs: PathBuf,
}

impl Stack {
    /// Bring up a fresh pipeline named after the test.
    pub async fn start(test: &str, partitions: i32) -> Stack {
        Self::start_with(test, partitions, &[]).await
    }

    /// [`Stack::start`] with extra environment for every service (it wins over the defaults).
    pub async fn start_with(test: &str, partitions: i32, extra: &[(&str, &str)]) -> Stack {
        let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let name = format!("{}_{suffix}", test.replace('-', "_"));
        // Database.
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", db_base()))
            .await
            .unwrap();
        let db_name = format!("it_{name}");
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let db_url = format!("{}/{db_name}", db_base());
        let db = PgPoolOptions::new().max_connections(4).connect(&db_url).await.unwrap();
        shared::db::MIGRATOR.run(&db).await.unwrap();
        // Topics.
        let input_topic = format!("it.{name}.input");
        let ledger_topic = format!("it.{name}.ledger");
        let dlq_topic = format!("it.{name}.dlq");
        create_topics(&[&input_topic, &ledger_topic, &dlq_topic], partitions).await;
        let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
        let ingest_port = free_port();
        let metrics: HashMap<Svc, String> = [Svc::Ingest, Svc::Ingest2, Svc::Rater, Svc::Rater2, Svc::LedgerWriter]
            .into_iter()
            .map(|s| (s, format!("127.0.0.1:{}", free_port())))
            .collect();
        let redis_prefix = format!("it_{name}");
        let env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS".into(), brokers()),
            ("INPUT_TOPIC".into(), input_topic.clone()),
            ("LEDGER_TOPIC".into(), ledger_topic.clone()),
            ("DLQ_TOPIC".into(), dlq_topic.clone()),
            ("REDIS_URL".into(), redis_url()),
            ("REDIS_PREFIX".into(), redis_prefix.clone()),
            // DATABASE_URL_QUERY in `extra`: the services connect by name (localhost, which a
            // server certificate can name) with these connection parameters (TLS tests).
            (
                "DATABASE_URL".into(),
                match extra.iter().find(|(k, _)| *k == "DATABASE_URL_QUERY") {
                    Some((_, q)) => format!("{}?{q}", db_url.replacen("@127.0.0.1:", "@localhost:", 1)),
                    None => db_url,
                },
            ),
            ("INGEST_LISTEN".into(), format!("127.0.0.1:{ingest_port}")),
            ("INGEST_ADMIN_TOKEN".into(), admin_token.clone()),
            ("INGEST_METRICS_LISTEN".into(), metrics[&Svc::Ingest].clone()),
            ("RATER_METRICS_LISTEN".into(), metrics[&Svc::Rater].clone()),
            (
                "LEDGER_WRITER_METRICS_LISTEN".into(),
                metrics[&Svc::LedgerWriter].clone(),
            ),
            ("RATER_GROUP_ID".into(), format!("it-{name}-rater")),
            ("LEDGER_WRITER_GROUP_ID".into(), format!("it-{name}-ledger-writer")),
            ("RUST_LOG".into(), "info,rdkafka=warn".into()),
            // Webhook receivers in tests listen on loopback.
            ("WEBHOOK_ALLOW_PRIVATE".into(), "true".into()),
            ("WEBHOOK_POLL_MS".into(), "50".into()),
        ];
        let mut env = env;
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let logs = bin("ingest").parent().unwrap().join("it-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut s = Stack {
            name,
            db,
            db_name,
            env,
            url: format!("http://127.0.0.1:{ingest_port}"),
            url2: format!("http://127.0.0.1:{}", free_port()),
            admin_token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            input_topic,
            ledger_topic,
            dlq_topic,
            redis_prefix,
            metrics,
            children: HashMap::new(),
            logs,
        };
        for svc in [Svc::LedgerWriter, Svc::Rater, Svc::Ingest] {
            s.spawn(svc).await;
        }
        s
    }

    /// Start a service and wait until it is ready.
    ///
    /// The listen ports come from binding port 0 and letting go, so another process (an
    /// outgoing connection of a parallel test) can take one before the service binds it. A
    /// service that exits at start-up because its address is in use gets fresh ports and is
    /// started again; any other early exit fails the test with the end of its log.
    pub async fn spawn(&mut self, svc: Svc) {
        for attempt in 1..=5 {
            match self.try_spawn(svc).await {
                Ok(()) => return,
                Err(tail) if attempt < 5 && tail.contains("in use") => {
                    eprintln!("{} could not bind (attempt {attempt}); new ports", svc.bin());
                    self.rebind(svc);
                }
                Err(tail) => panic!(
                    "{} exited during start-up; its log ends:\n{tail}\n(logs in {})",
                    svc.bin(),
                    self.logs.display()
                ),
            }
        }
    }

    /// Move `svc` to fresh listen ports (the HTTP port too for ingest).
    fn rebind(&mut self, svc: Svc) {
        let addr = format!("127.0.0.1:{}", free_port());
        self.metrics.insert(svc, addr.clone());
        let key = match svc {
            Svc::Ingest => "INGEST_METRICS_LISTEN",
            Svc::LedgerWriter => "LEDGER_WRITER_METRICS_LISTEN",
            // Each rater's metrics address is set per spawn from `metrics`; the env keeps the
            // first rater's, which tests read.
            Svc::Rater => "RATER_METRICS_LISTEN",
            Svc::Rater2 => return,
            Svc::Ingest2 => {
                self.url2 = format!("http://127.0.0.1:{}", free_port());
                return;
            }
        };
        self.set_env(key, &addr);
        if svc == Svc::Ingest {
            let port = free_port();
            self.set_env("INGEST_LISTEN", &format!("127.0.0.1:{port}"));
            self.url = format!("http://127.0.0.1:{port}");
        }
    }

    fn set_env(&mut self, key: &str, value: &str) {
        for (k, v) in self.env.iter_mut() {
            if k == key {
                *v = value.to_owned();
            }
        }
    }

    /// Start `svc`; on an exit before it is ready, the last lines of its log.
    async fn try_spawn(&mut self, svc: Svc) -> Result<(), String> {
        let path = self.logs.join(format!("{}-{svc:?}.log", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let logged_before = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let child = Command::new(bin(svc.bin()))
            .envs(self.env.iter().cloned())
            .env(
                "RATER_METRICS_LISTEN",
                &self.metrics[if svc == Svc::Rater2 { &Svc::Rater2 } else { &Svc::Rater }],
            )
            .envs(match svc {
                Svc::Ingest2 => vec![
                    ("INGEST_METRICS_LISTEN".to_owned(), self.metrics[&Svc::Ingest2].clone()),
                    (
                        "INGEST_LISTEN".to_owned(),
                        self.url2.trim_start_matches("http://").to_owned(),
                    ),
                ],
                _ => vec![],
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.children.insert(svc, child);
        let url = format!("http://{}/readyz", self.metrics[&svc]);
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(c) = self.children.get_mut(&svc) {
                if let Ok(Some(status)) = c.try_wait() {
                    self.children.remove(&svc);
                    let text = std::fs::read(&path).unwrap_or_default();
                    let text = String::from_utf8_lossy(&text[logged_before.min(text.len())..]);
                    // With RUST_BACKTRACE set, anyhow's report ends in a long backtrace:
                    // keep the error itself (the first lines of the report) as well as the end.
                    let lines: Vec<&str> = text.lines().collect();
                    let error: Vec<&str> = lines
                        .iter()
                        .copied()
                        .filter(|l| l.starts_with("Error:") || l.contains("in use") || l.contains("ERROR"))
                        .take(10)
                        .collect();
                    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                    return Err(format!("{status}\n{}\n...\n{tail}", error.join("\n")));
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} not ready in 60 s",
                svc.bin()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What `svc` serves on /metrics now (the Prometheus text format).
    pub async fn metrics_text(&self, svc: Svc) -> String {
        let url = format!("http://{}/metrics", self.metrics[&svc]);
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// Wait until the raters' assigned-partition gauges add up to `total`, none of them zero.
    pub async fn wait_assigned(&self, raters: &[Svc], total: u64) {
        let started = Instant::now();
        loop {
            let mut counts = Vec::new();
            for r in raters {
                let text = match self
                    .http
                    .get(format!("http://{}/metrics", self.metrics[r]))
                    .send()
                    .await
                {
                    Ok(resp) => resp.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let n = text
                    .lines()
                    .find(|l| l.starts_with("rater_assigned_partitions "))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map_or(0, |v| v as u64);
                counts.push(n);
            }
            if counts.iter().all(|&c| c > 0) && counts.iter().sum::<u64>() == total {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "partitions not assigned: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Run `ledger-writer reconcile`: (exit code, stdout lines).
    pub async fn reconcile(&self) -> (i32, Vec<String>) {
        self.reconcile_with(&[]).await
    }

    /// `ledger-writer reconcile --strict`: ledger-order differences fail it too.
    pub async fn reconcile_strict(&self) -> (i32, Vec<String>) {
        self.reconcile_with(&["--strict"]).await
    }

    /// `ledger-writer sweep --at`: send the expiries and activations of one customer's grants
    /// due at `at` (the injectable sweep clock); returns once the commands are in the topic.
    pub async fn sweep_at(&self, at: chrono::DateTime<chrono::Utc>, tenant: &str, customer: &str) {
        let out = Command::new(bin("ledger-writer"))
            .args([
                "sweep",
                "--allow-future",
                "--at",
                &at.to_rfc3339(),
                "--tenant",
                tenant,
                "--customer",
                customer,
            ])
            .envs(self.env.iter().cloned())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "sweep: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Run `ledger-writer compact-rollups`: every pending usage row moves into the rollups.
    pub async fn compact_rollups(&self) {
        let out = Command::new(bin("ledger-writer"))
            .arg("compact-rollups")
            .envs(self.env.iter().cloned())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "compact-rollups: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn reconcile_with(&self, args: &[&str]) -> (i32, Vec<String>) {
        let out = Command::new(bin("ledger-writer"))
            .arg("reconcile")
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .await
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        (out.status.code().unwrap_or(-1), lines)
    }

    /// Point every service (when next spawned) at new, empty topics and new consumer groups, as
    /// a topic deleted and created again, a broker restarted without its storage, or a move to
    /// another cluster would: offsets start from 0 again. The old topics are deleted.
    pub async fn move_to_new_topics(&mut self, generation: u32, partitions: i32) {
        let old = [
            self.input_topic.clone(),
            self.ledger_topic.clone(),
            self.dlq_topic.clone(),
        ];
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        let refs: Vec<&str> = old.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
        self.input_topic = format!("it.{}.g{generation}.input", self.name);
        self.ledger_topic = format!("it.{}.g{generation}.ledger", self.name);
        self.dlq_topic = format!("it.{}.g{generation}.dlq", self.name);
        create_topics(&[&self.input_topic, &self.ledger_topic, &self.dlq_topic], partitions).await;
        let name = self.name.clone();
        let set = [
            ("INPUT_TOPIC", self.input_topic.clone()),
            ("LEDGER_TOPIC", self.ledger_topic.clone()),
            ("DLQ_TOPIC", self.dlq_topic.clone()),
            ("RATER_GROUP_ID", format!("it-{name}-g{generation}-rater")),
            (
                "LEDGER_WRITER_GROUP_ID",
                format!("it-{name}-g{generation}-ledger-writer"),
            ),
        ];
        for (k, v) in set {
            self.env.retain(|(key, _)| key != k);
            self.env.push((k.to_owned(), v));
        }
    }

    /// Whether `svc` is still running (it has not exited on its own).
    pub fn running(&mut self, svc: Svc) -> bool {
        self.children
            .get_mut(&svc)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no drain, no final commit.
    pub async fn kill(&mut self, svc: Svc) {
        if let Some(mut c) = self.children.remove(&svc) {
            c.start_kill().unwrap();
            c.wait().await.unwrap();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub async fn stop(&mut self, svc: Svc) {
        if let Some(mut c) = self.children.remove(&svc) {
            if let Some(pid) = c.id() {
                std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .unwrap();
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), c.wait()).await;
        }
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A tenant with a credit type "ai" (2 places, `limit`) and a mapping "llm" at 0.01 per token.
    pub async fn tenant(&self, limit: &str) -> String {
        let (st, t) = self
            .call(
                reqwest::Method::POST,
                "/v1/admin/tenants",
                &self.admin_token,
                Some(json!({"name": "it"})),
            )
            .await;
        assert_eq!(st, 201, "{t}");
        let key = t["api_key"].as_str().unwrap().to_owned();
        let tid = t["tenant_id"].as_str().unwrap().to_owned();
        let (st, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/admin/tenants/{tid}/limits"),
                &self.admin_token,
                Some(json!({"events_per_second": 1_000_000})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        let (st, b) = self
            .call(
                reqwest::Method::POST,
                "/v1/credit-types",
                &key,
                Some(json!({"id": "ai", "name": "AI Tokens", "unit_singular": "token", "unit_plural": "tokens", "decimals": 2, "limit": limit})),
            )
            .await;
        assert_eq!(st, 201, "{b}");
        let (st, b) = self
            .call(
                reqwest::Method::PUT,
                "/v1/features/llm/credit-mapping",
                &key,
                Some(
                    json!({"credit_type": "ai", "credits_per_unit": "0.01", "quantity_dimension": "tokens",
                            "effective_at": "2000-01-01T00:00:00Z"}),
                ),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        key
    }

    pub async fn grant(&self, key: &str, customer: &str, amount: &str) -> Value {
        let (st, b) = self
            .call(
                reqwest::Method::POST,
                "/v1/credits/grants",
                key,
                Some(json!({"customer_id": customer, "credit_type": "ai", "amount": amount, "display_name": "it"})),
            )
            .await;
        // 202 = accepted but not yet applied (a rebalance can hold it past 5 s); its order
        // before later events is kept either way.
        assert!(st == 201 || st == 202, "grant: {st} {b}");
        b
    }

    pub async fn balance(&self, key: &str, customer: &str) -> rust_decimal::Decimal {
        let (st, b) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/credits/balance?customer_id={customer}&credit_type=ai"),
                key,
                None,
            )
            .await;
        assert_eq!(st, 200, "{b}");
        b["balance"].as_str().unwrap().parse().unwrap()
    }

    /// Wait until `settled` usage rows and `dups` duplicate rows exist (or time out).
    pub async fn wait_settled(&self, settled: i64, dups: i64, limit: Duration) {
        let started = Instant::now();
        loop {
            let (n, d): (i64, i64) =
                sqlx::query_as("SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM duplicate_events)")
                    .fetch_one(&self.db)
                    .await
                    .unwrap();
            if n >= settled && d >= dups {
                assert_eq!((n, d), (settled, dups), "more rows than events sent");
                return;
            }
            assert!(
                started.elapsed() < limit,
                "not settled in {limit:?}: {n}/{settled} events, {d}/{dups} duplicates"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Delete every Redis key of this stack at once, as losing Redis would (one Lua call: atomic).
    pub async fn flush_redis(&self) {
        let mut con = shared::testkit::redis_conn().await;
        let n = shared::testkit::delete_keys(&mut con, &self.redis_prefix)
            .await
            .unwrap();
        assert!(n > 0, "nothing to flush");
    }

    /// Remove everything this stack made (processes, database, keys).
    pub async fn cleanup(mut self) {
        for svc in [Svc::Ingest, Svc::Ingest2, Svc::Rater, Svc::Rater2, Svc::LedgerWriter] {
            self.kill(svc).await;
        }
        self.db.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", db_base()))
            .await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name))
                .execute(&admin)
                .await;
        }
        shared::testkit::delete_redis_prefix(&self.redis_prefix).await;
        let admin: Result<AdminClient<DefaultClientContext>, _> =
            ClientConfig::new().set("bootstrap.servers", brokers()).create();
        if let Ok(admin) = admin {
            let topics = [
                self.input_topic.clone(),
                self.ledger_topic.clone(),
                self.dlq_topic.clone(),
            ];
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
        }
    }
}

/// The headers of the first message on partition 0 of a dead-letter topic.
pub async fn first_dead_letter_headers(topic: &str) -> HashMap<String, String> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a dead letter")
        .unwrap();
    let out = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| {
                    (
                        x.key.to_owned(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    drop(m);
    // Closing a consumer blocks; do it off the runtime, and do not wait on it forever.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || drop(consumer)),
    )
    .await;
    out
}

pub async fn create_topics(names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in res {
        if let Err((t, e)) = r {
            panic!("create topic {t}: {e}");
        }
    }
}
