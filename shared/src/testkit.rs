//! What the services' own integration tests share (feature `testkit`, dev-dependencies only):
//! where the local Kafka, Postgres and Redis are, a database and topics of a test's own, a
//! service started and stopped the way an operator would, and a consumer group's progress.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::Child;

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn db_base() -> String {
    std::env::var("DATABASE_URL_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `GET http://addr/readyz` answers 200 (no HTTP client needed for one line).
pub fn ready(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

/// A database of the test's own, migrated; `(url, pool)`.
pub async fn create_db(name: &str, connections: u32) -> (String, PgPool) {
    let (url, db) = create_empty_db(name, connections).await;
    crate::db::MIGRATOR.run(&db).await.unwrap();
    (url, db)
}

/// A database of the test's own with no schema (a test migrates it as far as it needs).
pub async fn create_empty_db(name: &str, connections: u32) -> (String, PgPool) {
    let server = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", db_base()))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&server)
        .await
        .unwrap();
    server.close().await;
    let url = format!("{}/{name}", db_base());
    let db = PgPoolOptions::new()
        .max_connections(connections)
        .connect(&url)
        .await
        .unwrap();
    (url, db)
}

/// Drop a test's database (whoever is still connected).
pub async fn drop_db(db: PgPool, name: &str) {
    db.close().await;
    if let Ok(server) = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", db_base()))
        .await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&server)
            .await;
    }
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

pub async fn create_topics(topics: &[&str], partitions: i32) {
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin().create_topics(&new, &opts).await.unwrap() {
        r.map_err(|(t, e)| format!("create topic {t}: {e}")).unwrap();
    }
}

/// Delete a test's topics and consumer groups (best effort: cleanup never fails a test).
pub async fn delete_topics_and_groups(topics: &[&str], groups: &[&str]) {
    let admin = admin();
    let _ = admin.delete_topics(topics, &AdminOptions::new()).await;
    let _ = admin.delete_groups(groups, &AdminOptions::new()).await;
}

/// A connection to the tests' Redis (`REDIS_URL`: one server or a cluster, as the services).
pub async fn redis_conn() -> crate::redis_conn::RedisConn {
    crate::redis_conn::connect(&redis_args()).await.expect("redis")
}

/// The services' Redis arguments for the tests' Redis (`REDIS_URL`, `REDIS_CA_FILE`...).
pub fn redis_args() -> crate::config::RedisArgs {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    crate::config::RedisArgs {
        redis_url: redis_url(),
        redis_prefix: "cr".into(),
        redis_ca_file: var("REDIS_CA_FILE"),
        redis_client_cert: var("REDIS_CLIENT_CERT"),
        redis_client_key: var("REDIS_CLIENT_KEY"),
    }
}

/// Delete every Redis key under `prefix:` (best effort; on a cluster, from every master).
pub async fn delete_redis_prefix(prefix: &str) {
    let Ok(mut con) = crate::redis_conn::connect(&redis_args()).await else {
        return;
    };
    let _ = delete_keys(&mut con, prefix).await;
}

/// Delete every key under `prefix:` and return how many there were. On one server it is one Lua
/// call (atomic, as losing Redis would be); on a cluster, KEYS on every master then DEL per slot.
pub async fn delete_keys(con: &mut crate::redis_conn::RedisConn, prefix: &str) -> redis::RedisResult<i64> {
    let pattern = format!("{prefix}:*");
    if !con.is_cluster() {
        return redis::Script::new(
            "local n = 0
             for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k); n = n + 1 end
             return n",
        )
        .arg(pattern)
        .invoke_async(con)
        .await;
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(con).await?;
    for k in &keys {
        let _: i64 = redis::cmd("DEL").arg(k).query_async(con).await?;
    }
    Ok(keys.len() as i64)
}

/// SIGKILL, and wait for it to be gone.
pub async fn kill(mut child: Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// SIGTERM, and the exit status once it has drained (at most 60 s).
pub async fn stop(mut child: Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id().unwrap();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not stop within 60 s of SIGTERM"))
        .unwrap()
}

/// (low, high, committed by the group) per partition of `topic`.
pub fn offsets(topic: &str, group: &str, partitions: i32) -> Vec<(i64, i64, Option<i64>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| {
            let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            let done = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            (low, high, done)
        })
        .collect()
}

/// Start a service and wait until its `/readyz` on `metrics` answers (at most 60 s). `command`
/// builds the process for a metrics address; the address came from binding port 0 and letting
/// go, so when another process took it meanwhile ("in use" in `log`), a new one is tried.
pub async fn start_service(
    what: &str,
    metrics: &std::sync::Mutex<String>,
    log: &std::path::Path,
    command: impl Fn(&str) -> tokio::process::Command,
) -> Child {
    for attempt in 1..=5 {
        let addr = metrics.lock().unwrap().clone();
        let mut child = command(&addr).spawn().unwrap();
        let started = std::time::Instant::now();
        loop {
            if ready(&addr) {
                return child;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if attempt < 5 && text.contains("in use") {
                    *metrics.lock().unwrap() = format!("127.0.0.1:{}", free_port());
                    break;
                }
                panic!("{what} exited at start-up ({status}); log {}", log.display());
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what} not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    unreachable!()
}
