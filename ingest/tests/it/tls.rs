//! The services over TLS: Postgres (the local server has TLS on) with `sslmode=require` and
//! `verify-full`, Redis (`rediss://`, a `redis-server` with test certificates started here, client
//! certificates required), and the whole pipeline over both.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use shared::config::{DbArgs, RedisArgs};
use shared::testkit::{db_base, free_port};
use tokio::process::{Child, Command};

use crate::harness::Stack;

/// Test certificates made with the openssl CLI: a CA, a server certificate for localhost and
/// 127.0.0.1, a client certificate, and a second CA that signed none of them.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Certs {
        let dir = std::env::temp_dir().join(format!("credits-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=credits test {ca}"),
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={}", if who == "server" { "localhost" } else { "credits" }),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
            ]);
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server that speaks only TLS and requires a client certificate; (child, port).
async fn tls_redis(certs: &Certs) -> (Child, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--tls-cert-file",
            &certs.path("server.crt"),
            "--tls-key-file",
            &certs.path("server.key"),
        ])
        .args(["--tls-ca-cert-file", &certs.path("ca.crt"), "--tls-auth-clients", "yes"])
        .args(["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (child, port);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the TLS redis-server did not listen on {port}");
}

fn redis_args(url: String, ca: Option<String>, client: Option<(String, String)>) -> RedisArgs {
    RedisArgs {
        redis_url: url,
        redis_prefix: "tls".into(),
        redis_ca_file: ca,
        redis_client_cert: client.as_ref().map(|c| c.0.clone()),
        redis_client_key: client.map(|c| c.1),
    }
}

/// The Postgres server's own certificate (self-signed for localhost on these machines): the CA
/// a `verify-full` client trusts.
async fn server_certificate() -> PathBuf {
    let db = sqlx::PgPool::connect(&format!("{}/postgres", db_base())).await.unwrap();
    let file: String = sqlx::query_scalar("SHOW ssl_cert_file").fetch_one(&db).await.unwrap();
    let on: String = sqlx::query_scalar("SHOW ssl").fetch_one(&db).await.unwrap();
    assert_eq!(on, "on", "the local Postgres has TLS on");
    PathBuf::from(file)
}

async fn ssl_in_use(url: &str) -> Result<bool, sqlx::Error> {
    let db = shared::db::connect(&DbArgs {
        database_url: url.to_owned(),
        database_max_connections: 1,
    })
    .await?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&db)
        .await?;
    db.close().await;
    Ok(ssl)
}

fn by_name(base: &str) -> String {
    base.replacen("@127.0.0.1:", "@localhost:", 1)
}

#[tokio::test]
async fn postgres_over_tls_require_and_verify_full() {
    let base = by_name(&db_base());
    let cert = server_certificate().await;
    assert!(
        ssl_in_use(&format!("{base}/postgres?sslmode=require")).await.unwrap(),
        "sslmode=require encrypts"
    );
    assert!(
        !ssl_in_use(&format!("{base}/postgres?sslmode=disable")).await.unwrap(),
        "the check can tell a plain connection"
    );
    let full = format!("{base}/postgres?sslmode=verify-full&sslrootcert={}", cert.display());
    assert!(ssl_in_use(&full).await.unwrap(), "verify-full with the server's CA");
    let missing = format!("{base}/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    assert!(
        ssl_in_use(&missing).await.is_err(),
        "a CA file that is not there is an error"
    );
    // sqlx adds `sslrootcert` to the system's roots (libpq uses it alone), and on these machines
    // the server's self-signed certificate is in the system's store, so a wrong CA file cannot
    // be shown refused here; the name check below shows the certificate is verified.
    // verify-full checks the name too: the certificate names localhost, not 127.0.0.2.
    let other_name = format!(
        "{}/postgres?sslmode=verify-full&sslrootcert={}",
        db_base().replacen("@127.0.0.1:", "@127.0.0.2:", 1),
        cert.display()
    );
    assert!(
        ssl_in_use(&other_name).await.is_err(),
        "a name the certificate does not hold is refused"
    );
}

#[tokio::test]
async fn redis_over_tls_with_a_ca_and_a_client_certificate() {
    let certs = Certs::make();
    let (mut server, port) = tls_redis(&certs).await;
    let url = format!("rediss://localhost:{port}");
    let client = Some((certs.path("client.crt"), certs.path("client.key")));
    let mut con = shared::redis_conn::connect(&redis_args(url.clone(), Some(certs.path("ca.crt")), client.clone()))
        .await
        .expect("CA and client certificate");
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    // Without the client certificate the server refuses the handshake (an error, or no answer).
    let no_client_args = redis_args(url.clone(), Some(certs.path("ca.crt")), None);
    let no_client = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = shared::redis_conn::connect(&no_client_args).await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    })
    .await;
    assert!(
        !matches!(no_client, Ok(Ok(_))),
        "a client without a certificate is refused"
    );
    // Trusting the wrong CA, the client refuses the server.
    let wrong_ca = redis_args(url.clone(), Some(certs.path("other-ca.crt")), client.clone());
    let wrong = tokio::time::timeout(Duration::from_secs(10), shared::redis_conn::connect(&wrong_ca)).await;
    assert!(
        !matches!(wrong, Ok(Ok(_))),
        "a server signed by an unknown CA is refused"
    );
    // A plain client cannot talk to it at all.
    let plain_args = redis_args(format!("redis://127.0.0.1:{port}"), None, None);
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = shared::redis_conn::connect(&plain_args).await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    })
    .await;
    assert!(!matches!(plain, Ok(Ok(_))), "plain text is not answered");
    // Half a client certificate is a configuration error, named.
    let half = RedisArgs {
        redis_client_key: None,
        ..redis_args(url, None, client)
    };
    let e = shared::redis_conn::connect(&half)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--redis-client-key"), "{e}");
    server.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_tls_to_postgres_and_redis() {
    let certs = Certs::make();
    let (mut server, port) = tls_redis(&certs).await;
    let pg_ca = server_certificate().await;
    let query = format!("sslmode=verify-full&sslrootcert={}", pg_ca.display());
    let redis_url = format!("rediss://localhost:{port}");
    let (ca, cert, key) = (certs.path("ca.crt"), certs.path("client.crt"), certs.path("client.key"));
    let s = Stack::start_with(
        "tls",
        2,
        &[
            ("DATABASE_URL_QUERY", query.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_CA_FILE", ca.as_str()),
            ("REDIS_CLIENT_CERT", cert.as_str()),
            ("REDIS_CLIENT_KEY", key.as_str()),
        ],
    )
    .await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c1", "100").await;
    let events: Vec<_> = (0..50)
        .map(|i| json!({"customer_id": "c1", "event_name": "llm", "idempotency_key": format!("e{i}"), "dimensions": {"tokens": 100}}))
        .collect();
    let (st, _) = s
        .call(Method::POST, "/v1/events", &key, Some(json!({ "events": events })))
        .await;
    assert_eq!(st, 202);
    s.wait_settled(50, 0, Duration::from_secs(60)).await;
    // Hot (Redis over TLS) and settled (Postgres over TLS) agree.
    let hot = s.balance(&key, "c1").await;
    let settled: rust_decimal::Decimal = sqlx::query_scalar("SELECT balance FROM pools WHERE customer_id = 'c1'")
        .fetch_one(&s.db)
        .await
        .unwrap();
    assert_eq!(hot, settled, "hot and settled balances");
    assert!(hot < rust_decimal::Decimal::from(100), "the events were charged: {hot}");
    // The services' Postgres sessions were encrypted.
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = current_database() AND a.application_name <> 'psql' AND NOT s.ssl
           AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'",
    )
    .fetch_one(&s.db)
    .await
    .unwrap();
    let tls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = current_database() AND s.ssl",
    )
    .fetch_one(&s.db)
    .await
    .unwrap();
    assert!(tls > 0, "the services hold TLS sessions");
    assert_eq!(plain, 0, "no session is in plain text");
    s.cleanup().await;
    server.start_kill().unwrap();
}
