//! One Redis connection type for a single server and for a Redis Cluster, over TCP or TLS.
//!
//! `REDIS_URL` selects the client: one `redis://` or `rediss://` URL is a single server (a
//! `ConnectionManager`, which reconnects); several URLs separated by commas, or the scheme
//! `redis+cluster://` / `rediss+cluster://` (seed nodes `host:port` separated by commas), select
//! redis-rs's cluster client, which follows MOVED/ASK and fails over with the cluster. Every key
//! a script touches is in its KEYS and the keys of one customer share a hash tag
//! (`cr:{tenant:customer}:...`), so a customer's work lands on one slot; a pipeline must stay
//! within one slot on a cluster ([`RedisConn::is_cluster`] tells callers to split theirs).
//!
//! TLS: `rediss://` verifies the server against the system's roots, or against `--redis-ca-file`
//! when given; `--redis-client-cert` and `--redis-client-key` add a client certificate (mTLS).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisArgs;

/// Each connection attempt gives up after this long (then the next attempt, with backoff).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// A request unanswered this long fails (transient: the batch is retried), so a Redis that hangs
/// does not hang its clients; well above a full pipeline's round trip (milliseconds).
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection to the hot store: cheap to clone (both kinds multiplex one connection per node).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What `REDIS_URL` names: one server, or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    Single(String),
    Cluster(Vec<String>),
}

/// Read `REDIS_URL` (pure): see the module's documentation for the forms.
pub fn topology(url: &str) -> Result<Topology, String> {
    let url = url.trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("REDIS_URL {url:?} has no scheme (redis://, rediss://, redis+cluster://)"))?;
    let (base, cluster) = match scheme {
        "redis" | "rediss" => (scheme, false),
        "redis+cluster" => ("redis", true),
        "rediss+cluster" => ("rediss", true),
        other => {
            return Err(format!(
                "REDIS_URL scheme {other:?} is not redis, rediss, redis+cluster or rediss+cluster"
            ))
        }
    };
    let parts: Vec<&str> = url.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if !cluster && parts.len() == 1 {
        return Ok(Topology::Single(url.to_owned()));
    }
    let mut nodes = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let node = if i == 0 {
            format!("{base}://{}", rest.split(',').next().unwrap_or("").trim())
        } else if p.contains("://") {
            // Several full URLs: each names its own scheme, which must agree on TLS.
            let s = p.split_once("://").map(|(s, _)| s).unwrap_or("");
            if s.trim_end_matches("+cluster") != base {
                return Err(format!("REDIS_URL mixes {base}:// and {s}:// nodes"));
            }
            format!("{base}://{}", p.split_once("://").map(|(_, r)| r).unwrap_or(""))
        } else {
            format!("{base}://{p}")
        };
        nodes.push(node);
    }
    Ok(Topology::Cluster(nodes))
}

fn read(path: &str, what: &str) -> RedisResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "cannot read a TLS file",
            format!("{what} {path}: {e}"),
        ))
    })
}

/// The CA and client certificate named by the arguments, if any.
fn certificates(args: &RedisArgs) -> RedisResult<Option<redis::TlsCertificates>> {
    let root_cert = args
        .redis_ca_file
        .as_deref()
        .map(|p| read(p, "--redis-ca-file"))
        .transpose()?;
    let client_tls = match (&args.redis_client_cert, &args.redis_client_key) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read(c, "--redis-client-cert")?,
            client_key: read(k, "--redis-client-key")?,
        }),
        (None, None) => None,
        _ => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "--redis-client-cert and --redis-client-key go together",
            )))
        }
    };
    Ok((root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates { client_tls, root_cert }))
}

/// Connect as `REDIS_URL` says (single server or cluster, TCP or TLS).
pub async fn connect(args: &RedisArgs) -> RedisResult<RedisConn> {
    let topo = topology(&args.redis_url)
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "REDIS_URL", e)))?;
    let certs = certificates(args)?;
    match topo {
        Topology::Single(url) => {
            let client = match certs {
                Some(c) => redis::Client::build_with_tls(url.as_str(), c)?,
                None => redis::Client::open(url.as_str())?,
            };
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT);
            Ok(RedisConn::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
        Topology::Cluster(nodes) => {
            let mut b = ClusterClientBuilder::new(nodes.iter().map(String::as_str).collect::<Vec<_>>())
                .retries(16)
                .max_retry_wait(2_000)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT);
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Ok(RedisConn::Cluster(b.build()?.get_async_connection().await?))
        }
    }
}

impl RedisConn {
    /// A pipeline must then stay within one hash slot (group commands by hash tag).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The hash tag of a key (`{...}`), which decides its slot on a cluster; the whole key if none.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_a_single_server() {
        assert_eq!(
            topology("redis://127.0.0.1:6379"),
            Ok(Topology::Single("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(
            topology("rediss://r.example:6380/0"),
            Ok(Topology::Single("rediss://r.example:6380/0".into()))
        );
    }

    #[test]
    fn several_urls_or_the_cluster_scheme_are_a_cluster() {
        let want = Topology::Cluster(vec!["redis://127.0.0.1:7000".into(), "redis://127.0.0.1:7001".into()]);
        assert_eq!(
            topology("redis://127.0.0.1:7000,redis://127.0.0.1:7001"),
            Ok(want.clone())
        );
        assert_eq!(topology("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"), Ok(want));
        assert_eq!(
            topology("rediss+cluster://a:7000"),
            Ok(Topology::Cluster(vec!["rediss://a:7000".into()]))
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        assert!(topology("127.0.0.1:6379").unwrap_err().contains("no scheme"));
        assert!(topology("http://x").unwrap_err().contains("\"http\""));
        assert!(topology("rediss://a:1,redis://b:2").unwrap_err().contains("mixes"));
    }

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("cr:{t1:c1}:p:credits/"), "t1:c1");
        assert_eq!(hash_tag("cr:{}:x"), "cr:{}:x");
        assert_eq!(hash_tag("plain"), "plain");
    }
}
