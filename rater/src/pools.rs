//! The hot pools in Redis: one `apply.lua` call per pool per batch, all pools pipelined in one
//! round trip; typed replies; pools missing from Redis are rebuilt from Postgres.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use redis::Script;
use rust_decimal::Decimal;
use shared::amount::{from_fixed, to_fixed_signed};
use shared::hot_pool::OrderKey;
use shared::keys::Keys;
use shared::model::{Category, LimitKind, PoolId};
use shared::redis_conn::RedisConn;
use sqlx::PgPool;
use uuid::Uuid;

use crate::metric as m;

static APPLY: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| Script::new(include_str!("lua/apply.lua")));
static INIT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| Script::new(include_str!("lua/init.lua")));

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("unexpected reply from apply.lua: {0}")]
    Reply(String),
    #[error("pool {0:?} still missing after rebuild")]
    StillMissing(PoolId),
    #[error("settlement wait: {0}")]
    Settlement(String),
    #[error("redis replication: {acked} of {wanted} replicas acknowledged the writes in time")]
    Replication { acked: i64, wanted: u32 },
}

/// How long WAIT gives the replicas (a short answer fails the batch, which is retried).
const WAIT_TIMEOUT_MS: u64 = 1_000;

/// The pipelines of one round (pure): all in one on a single server; on a cluster one per hash
/// tag (the customer), in the order of first appearance.
pub fn pipeline_groups<'a>(keys: impl Iterator<Item = &'a str>, cluster: bool) -> Vec<Vec<usize>> {
    if !cluster {
        let all: Vec<usize> = keys.enumerate().map(|(i, _)| i).collect();
        return if all.is_empty() { Vec::new() } else { vec![all] };
    }
    let mut by_tag: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, k) in keys.enumerate() {
        let g = *by_tag.entry(shared::redis_conn::hash_tag(k)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// What one input message asks of its pool: one variant per operation kind apply.lua
/// understands (see its header for the ARGV each becomes).
#[derive(Debug, Clone, PartialEq)]
pub enum PoolOp {
    /// "u": charge `cost` (fixed int) unless the idempotency key was seen in the window.
    Usage { idempotency_key: String, cost: i64 },
    /// "g": add a grant of `amount` (fixed int) at its place in the consumption order.
    Grant {
        grant_id: Uuid,
        amount: i64,
        order: OrderKey,
    },
    /// "v": end a grant now.
    Void { grant_id: Uuid },
    /// "e": end a grant once the operation's time is at or past its expiry.
    Expire { grant_id: Uuid },
    /// "a": a scheduled grant enters the ledger once the operation's time reaches its effective time.
    Activate { grant_id: Uuid },
    /// "r": give back what a charge took, per grant (None = overdraft), amounts as charged
    /// (negative, fixed int); `release`: the idempotency key whose dedupe mark goes too.
    Reverse {
        event_uid: Uuid,
        entries: Vec<(Option<Uuid>, i64)>,
        release: Option<String>,
    },
    /// "l": the pool's limit override (None: back to the credit type's).
    Limit { limit: Option<LimitKind> },
}

impl PoolOp {
    /// The kind letter apply.lua dispatches on.
    pub fn kind(&self) -> &'static str {
        match self {
            PoolOp::Usage { .. } => "u",
            PoolOp::Grant { .. } => "g",
            PoolOp::Void { .. } => "v",
            PoolOp::Expire { .. } => "e",
            PoolOp::Activate { .. } => "a",
            PoolOp::Reverse { .. } => "r",
            PoolOp::Limit { .. } => "l",
        }
    }

    /// apply.lua's `a`, `b` and `c` of this operation.
    fn abc(&self) -> [Vec<u8>; 3] {
        let text = |s: &str| s.as_bytes().to_vec();
        match self {
            PoolOp::Usage { idempotency_key, cost } => [
                shared::keys::dedupe_member(idempotency_key).to_vec(),
                text(&cost.to_string()),
                Vec::new(),
            ],
            PoolOp::Grant {
                grant_id,
                amount,
                order,
            } => [
                text(&grant_id.to_string()),
                text(&amount.to_string()),
                text(&order.to_string()),
            ],
            PoolOp::Void { grant_id } | PoolOp::Expire { grant_id } | PoolOp::Activate { grant_id } => {
                [text(&grant_id.to_string()), Vec::new(), Vec::new()]
            }
            PoolOp::Reverse {
                event_uid,
                entries,
                release,
            } => {
                let parts: Vec<String> = entries
                    .iter()
                    .map(|(gid, amt)| {
                        let gid = gid.map_or_else(|| "-".to_owned(), |g| g.to_string());
                        format!("{gid}:{amt}")
                    })
                    .collect();
                let release = match release.as_deref() {
                    // A reverse that releases the dedupe mark of this idempotency key.
                    Some(k) if !k.is_empty() => shared::keys::dedupe_member(k).to_vec(),
                    _ => Vec::new(),
                };
                [text(&event_uid.to_string()), text(&parts.join(",")), release]
            }
            PoolOp::Limit { limit } => [text(limit.map_or("", |k| k.as_str())), Vec::new(), Vec::new()],
        }
    }
}

/// One operation for apply.lua, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// Index of the input message in the batch.
    pub msg: usize,
    pub offset: i64,
    /// The time the operation happens at (an event's timestamp, a command's time).
    pub ts_ms: i64,
    /// The identity of the message (see [`ident`]): with the offset, it keys the journal.
    pub id: String,
    pub op: PoolOp,
}

impl Op {
    /// The 7 values apply.lua takes per operation: offset, kind, a, b, c, ts_ms, id.
    pub fn to_argv(&self) -> [Vec<u8>; 7] {
        let [a, b, c] = self.op.abc();
        [
            self.offset.to_string().into_bytes(),
            self.op.kind().as_bytes().to_vec(),
            a,
            b,
            c,
            self.ts_ms.to_string().into_bytes(),
            self.id.as_bytes().to_vec(),
        ]
    }
}

/// apply.lua's whole ARGV for one pool: the customer's dedupe prefix, the dedupe window, the
/// partition's committed offset, the limit kind, the number of operations, then each
/// operation's [`Op::to_argv`].
pub fn apply_argv(b: &PoolOps, dedupe_prefix: &str, window_s: u64, committed: i64) -> Vec<Vec<u8>> {
    let mut argv = vec![
        dedupe_prefix.as_bytes().to_vec(),
        window_s.to_string().into_bytes(),
        committed.to_string().into_bytes(),
        if b.hard { "hard" } else { "soft" }.as_bytes().to_vec(),
        b.ops.len().to_string().into_bytes(),
    ];
    for op in &b.ops {
        argv.extend(op.to_argv());
    }
    argv
}

/// A short identity of a message for the journal: the random half of a uuid (an event uid
/// assigned at ingest, a grant id), 64 bits.
pub fn ident(id: &Uuid) -> String {
    let mut buf = [0u8; 32];
    id.simple().encode_lower(&mut buf)[16..].to_owned()
}

/// Every operation of one batch for one pool.
#[derive(Debug)]
pub struct PoolOps {
    pub pool: PoolId,
    pub partition: i32,
    pub decimals: u32,
    pub hard: bool,
    pub ops: Vec<Op>,
}

/// One touched grant (None = overdraft): delta and the pool balance after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub grant_id: Option<Uuid>,
    pub delta: i64,
    pub end: i64,
}

/// A scheduled grant activated by the event that first drew on it (before the sweeper did):
/// its whole remaining enters the ledger ahead of the event's parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub grant_id: Uuid,
    /// What entered the ledger (the grant's remaining, overdraft repaid included).
    pub amount: i64,
    /// The pool's ledger balance after it.
    pub end: i64,
    /// Overdraft repaid from it.
    pub repaid: i64,
    pub effective_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    Charged {
        end: i64,
        parts: Vec<Part>,
        activated: Vec<Activation>,
    },
    Denied {
        end: i64,
        reason: String,
    },
    Duplicate,
    Granted {
        end: i64,
        remaining: i64,
        repaid: i64,
    },
    GrantKnown,
    Voided {
        end: i64,
        removed: i64,
    },
    Activated {
        end: i64,
        remaining: i64,
        repaid: i64,
    },
    /// A reverse applied: what went back (deltas positive), the pool's balance after each.
    Reversed {
        end: i64,
        parts: Vec<Part>,
    },
    LimitSet,
    NotApplied,
    Refused(String),
}

fn num(s: Option<&str>, line: &str) -> Result<i64, PoolError> {
    s.and_then(|v| v.parse().ok())
        .ok_or_else(|| PoolError::Reply(line.to_owned()))
}

/// One "<gid>:<delta>:<end>" part of a reply (gid "-" = overdraft).
fn part(p: &str, line: &str) -> Result<Part, PoolError> {
    let mut f = p.split(':');
    let grant_id = match f.next() {
        Some("-") => None,
        Some(g) => Some(Uuid::parse_str(g).map_err(|_| PoolError::Reply(line.to_owned()))?),
        None => return Err(PoolError::Reply(line.to_owned())),
    };
    Ok(Part {
        grant_id,
        delta: num(f.next(), line)?,
        end: num(f.next(), line)?,
    })
}

/// Parse one "<offset>|<result>" line of apply.lua.
pub fn parse_result(line: &str) -> Result<(i64, OpResult), PoolError> {
    let mut it = line.split('|');
    let off = num(it.next(), line)?;
    let r = match it.next() {
        Some("S") => {
            let end = num(it.next(), line)?;
            let mut parts = Vec::new();
            let mut activated = Vec::new();
            for p in it.next().unwrap_or("").split(';').filter(|p| !p.is_empty()) {
                if let Some(a) = p.strip_prefix('+') {
                    let mut f = a.split(':');
                    let gid = f.next().and_then(|g| Uuid::parse_str(g).ok());
                    activated.push(Activation {
                        grant_id: gid.ok_or_else(|| PoolError::Reply(line.to_owned()))?,
                        amount: num(f.next(), line)?,
                        end: num(f.next(), line)?,
                        repaid: num(f.next(), line)?,
                        effective_ms: num(f.next(), line)?,
                    });
                    continue;
                }
                parts.push(part(p, line)?);
            }
            OpResult::Charged { end, parts, activated }
        }
        Some("D") => OpResult::Denied {
            end: num(it.next(), line)?,
            reason: it.next().unwrap_or("").to_owned(),
        },
        Some("P") => OpResult::Duplicate,
        Some("G") => OpResult::Granted {
            end: num(it.next(), line)?,
            remaining: num(it.next(), line)?,
            repaid: num(it.next(), line)?,
        },
        Some("X") => OpResult::GrantKnown,
        Some("V") => OpResult::Voided {
            end: num(it.next(), line)?,
            removed: num(it.next(), line)?,
        },
        Some("A") => OpResult::Activated {
            end: num(it.next(), line)?,
            remaining: num(it.next(), line)?,
            repaid: num(it.next(), line)?,
        },
        Some("R") => {
            let end = num(it.next(), line)?;
            let parts = it
                .next()
                .unwrap_or("")
                .split(';')
                .filter(|p| !p.is_empty())
                .map(|p| part(p, line))
                .collect::<Result<_, _>>()?;
            OpResult::Reversed { end, parts }
        }
        Some("L") => OpResult::LimitSet,
        Some("N") => OpResult::NotApplied,
        Some("E") => OpResult::Refused(it.next().unwrap_or("").to_owned()),
        _ => return Err(PoolError::Reply(line.to_owned())),
    };
    Ok((off, r))
}

/// The Redis side of the rater.
pub struct PoolStore {
    pub redis: RedisConn,
    pub keys: Keys,
    pub db: PgPool,
    pub dedupe_window_s: u64,
    /// Replicas that must hold a round's writes before its replies count (WAIT); 0: none.
    pub wait_replicas: u32,
}

impl PoolStore {
    /// Load the scripts (again after a Redis restart).
    pub async fn load_scripts(&self) -> Result<(), redis::RedisError> {
        let mut con = self.redis.clone();
        APPLY.prepare_invoke().load_async(&mut con).await?;
        INIT.prepare_invoke().load_async(&mut con).await?;
        Ok(())
    }

    /// One pipelined round: returns per pool either its results or None (pool missing). On a
    /// Redis Cluster the round is one pipeline per hash tag (a pipeline cannot cross slots; the
    /// client sends each to its slot's master, all at once over one connection per node).
    async fn round(
        &self,
        batches: &[&PoolOps],
        committed: &HashMap<i32, i64>,
    ) -> Result<Vec<Option<Vec<String>>>, PoolError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let invocations: Vec<(String, redis::ScriptInvocation<'static>)> = batches
            .iter()
            .map(|b| {
                let pool_key = self.keys.pool(
                    &b.pool.tenant_id,
                    &b.pool.customer_id,
                    &b.pool.credit_type,
                    &b.pool.resource_id,
                );
                let mut inv = APPLY.prepare_invoke();
                inv.key(&pool_key).key(self.keys.journal(&pool_key));
                for k in self
                    .keys
                    .dedupe_sets(&b.pool.tenant_id, &b.pool.customer_id, now_ms, self.dedupe_window_s)
                {
                    inv.key(k);
                }
                // Last, each reverse's mark, in the operations' order (see apply.lua).
                for op in &b.ops {
                    if let PoolOp::Reverse { event_uid, .. } = &op.op {
                        inv.key(
                            self.keys
                                .reverse_mark(&b.pool.tenant_id, &b.pool.customer_id, event_uid),
                        );
                    }
                }
                let prefix = self.keys.dedupe_prefix(&b.pool.tenant_id, &b.pool.customer_id);
                let committed = committed.get(&b.partition).copied().unwrap_or(0);
                for v in apply_argv(b, &prefix, self.dedupe_window_s, committed) {
                    inv.arg(&v[..]);
                }
                (pool_key, inv)
            })
            .collect();
        let groups = pipeline_groups(invocations.iter().map(|(k, _)| k.as_str()), self.redis.is_cluster());
        let started = Instant::now();
        let replies = futures::future::try_join_all(
            groups
                .iter()
                .map(|idx| self.round_pipeline(idx.iter().map(|&i| &invocations[i].1))),
        )
        .await?;
        metrics::histogram!(m::LUA_DURATION).record(started.elapsed().as_secs_f64());
        let mut out: Vec<Option<Vec<String>>> = vec![None; batches.len()];
        for (idx, group) in groups.iter().zip(replies) {
            for (&i, r) in idx.iter().zip(group) {
                out[i] = (r.first().map(String::as_str) != Some("MISSING")).then_some(r);
            }
        }
        Ok(out)
    }

    /// One pipeline of apply.lua calls (one slot on a cluster), then, when `wait_replicas` is
    /// set, WAIT: the replies count only once that many replicas hold the writes, so a failover
    /// to a replica cannot lose a decision whose facts were produced.
    async fn round_pipeline<'a>(
        &self,
        invocations: impl Iterator<Item = &'a redis::ScriptInvocation<'static>>,
    ) -> Result<Vec<Vec<String>>, PoolError> {
        let mut pipe = redis::pipe();
        let mut n = 0;
        for inv in invocations {
            pipe.invoke_script(inv);
            n += 1;
        }
        if self.wait_replicas > 0 {
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT_MS);
        }
        let mut con = self.redis.clone();
        let mut values: Vec<redis::Value> = match pipe.query_async(&mut con).await {
            Ok(r) => r,
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                pipe.query_async(&mut con).await?
            }
            Err(e) => return Err(e.into()),
        };
        if self.wait_replicas > 0 {
            let acked: i64 = redis::from_redis_value(&values.pop().unwrap_or(redis::Value::Nil))?;
            if acked < self.wait_replicas as i64 {
                metrics::counter!(m::REDIS_REPLICATION_WAITS, "outcome" => "short").increment(1);
                return Err(PoolError::Replication {
                    acked,
                    wanted: self.wait_replicas,
                });
            }
            metrics::counter!(m::REDIS_REPLICATION_WAITS, "outcome" => "ok").increment(1);
        }
        debug_assert_eq!(values.len(), n);
        values
            .iter()
            .map(|v| redis::from_redis_value(v).map_err(PoolError::from))
            .collect()
    }

    /// Apply every pool's operations. `wait_settled` is called once, before any rebuild, when
    /// Redis lost its state (the sentinel is gone): it returns once the ledger-writer has settled
    /// every fact produced so far, so a rebuild from Postgres misses nothing.
    pub async fn apply<F, Fut>(
        &self,
        batches: &[PoolOps],
        committed: &HashMap<i32, i64>,
        wait_settled: F,
    ) -> Result<Vec<Vec<(i64, OpResult)>>, PoolError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut out: Vec<Option<Vec<(i64, OpResult)>>> = vec![None; batches.len()];
        let mut todo: Vec<usize> = (0..batches.len()).collect();
        for _ in 0..3 {
            if todo.is_empty() {
                break;
            }
            let refs: Vec<&PoolOps> = todo.iter().map(|&i| &batches[i]).collect();
            let replies = self.round(&refs, committed).await?;
            let mut missing = Vec::new();
            for (&i, reply) in todo.iter().zip(replies) {
                match reply {
                    Some(lines) => {
                        let parsed = lines.iter().map(|l| parse_result(l)).collect::<Result<Vec<_>, _>>()?;
                        out[i] = Some(parsed);
                    }
                    None => missing.push(i),
                }
            }
            if !missing.is_empty() {
                // Wait for settlement before rebuilding when Redis lost everything (no sentinel) or
                // when a missing pool existed before (Postgres knows it: a partial loss). A pool
                // Postgres has never seen, with the sentinel present, is new: nothing to wait for.
                let mut lost = !self.sentinel_present().await?;
                if !lost {
                    for &i in &missing {
                        lost |= self.known(&batches[i].pool).await?;
                    }
                }
                if lost {
                    tracing::warn!(
                        pools = missing.len(),
                        "redis lost pools: waiting for the ledger to settle before rebuilding"
                    );
                    wait_settled().await.map_err(PoolError::Settlement)?;
                    self.set_sentinel().await?;
                }
                for &i in &missing {
                    self.rebuild(&batches[i]).await?;
                }
            }
            todo = missing;
        }
        if let Some(&i) = todo.first() {
            return Err(PoolError::StillMissing(batches[i].pool.clone()));
        }
        Ok(out.into_iter().map(|o| o.unwrap_or_default()).collect())
    }

    fn sentinel_key(&self) -> String {
        format!("{}:sentinel", self.keys.prefix())
    }

    pub async fn sentinel_present(&self) -> Result<bool, redis::RedisError> {
        let mut con = self.redis.clone();
        redis::cmd("EXISTS")
            .arg(self.sentinel_key())
            .query_async(&mut con)
            .await
    }

    pub async fn set_sentinel(&self) -> Result<(), redis::RedisError> {
        let mut con = self.redis.clone();
        redis::cmd("SET")
            .arg(self.sentinel_key())
            .arg(Utc::now().to_rfc3339())
            .query_async(&mut con)
            .await
    }

    /// Whether Postgres has settled anything for this pool.
    async fn known(&self, p: &PoolId) -> Result<bool, PoolError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pools WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3
                AND resource_id = $4)",
        )
        .bind(&p.tenant_id)
        .bind(&p.customer_id)
        .bind(&p.credit_type)
        .bind(&p.resource_id)
        .fetch_one(&self.db)
        .await?)
    }

    /// Create the pool hash from its settled state in Postgres.
    async fn rebuild(&self, b: &PoolOps) -> Result<(), PoolError> {
        let p = &b.pool;
        let settled = self.settled(p).await?;
        let argv = init_argv(&settled, b.decimals)?;
        let pool_key = self
            .keys
            .pool(&p.tenant_id, &p.customer_id, &p.credit_type, &p.resource_id);
        let mut inv = INIT.prepare_invoke();
        inv.key(&pool_key);
        for v in &argv {
            inv.arg(&v[..]);
        }
        let mut con = self.redis.clone();
        let created: i64 = inv.invoke_async(&mut con).await?;
        if created == 1 {
            metrics::counter!(m::POOL_REBUILDS).increment(1);
        }
        Ok(())
    }

    /// The pool's settled state: its grants, overdraft and limit override.
    async fn settled(&self, p: &PoolId) -> Result<SettledPool, PoolError> {
        let grants: Vec<SettledGrant> = sqlx::query_as(
            "SELECT id, priority, expires_at, category, effective_at, created_at, remaining, status, activated
             FROM grants WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
        )
        .bind(&p.tenant_id)
        .bind(&p.customer_id)
        .bind(&p.credit_type)
        .bind(&p.resource_id)
        .fetch_all(&self.db)
        .await?;
        let overdraft: Option<Decimal> = sqlx::query_scalar(
            "SELECT overdraft FROM pools WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
        )
        .bind(&p.tenant_id)
        .bind(&p.customer_id)
        .bind(&p.credit_type)
        .bind(&p.resource_id)
        .fetch_optional(&self.db)
        .await?;
        let limit: Option<String> = sqlx::query_scalar(
            "SELECT limit_kind FROM pool_limits WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3
                AND resource_id = $4",
        )
        .bind(&p.tenant_id)
        .bind(&p.customer_id)
        .bind(&p.credit_type)
        .bind(&p.resource_id)
        .fetch_optional(&self.db)
        .await?;
        Ok(SettledPool {
            grants,
            overdraft,
            limit,
        })
    }
}

/// A grant of a pool as Postgres settled it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SettledGrant {
    id: Uuid,
    priority: i32,
    expires_at: Option<DateTime<Utc>>,
    category: String,
    effective_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    remaining: Decimal,
    status: String,
    activated: bool,
}

/// A pool as Postgres settled it (what a rebuild puts back in Redis).
#[derive(Debug, Clone, Default)]
struct SettledPool {
    grants: Vec<SettledGrant>,
    /// None: no pool row yet.
    overdraft: Option<Decimal>,
    /// The limit override ("hard" or "soft"); None: the credit type's.
    limit: Option<String>,
}

/// init.lua's whole ARGV for a settled pool, byte for byte as its header documents it: the
/// overdraft (fixed int), the limit override ("" = none), the number of grants, then per grant
/// its id, order key and remaining: "v" once ended, "a<fixed>" for a scheduled grant already
/// activated, else the fixed amount. An amount that does not fit `decimals` is an error.
fn init_argv(s: &SettledPool, decimals: u32) -> Result<Vec<Vec<u8>>, PoolError> {
    let fixed =
        |d: Decimal| to_fixed_signed(d, decimals).map_err(|e| PoolError::Reply(format!("settled amount {d}: {e}")));
    let text = |s: String| s.into_bytes();
    let mut argv = vec![
        text(fixed(s.overdraft.unwrap_or_default())?.to_string()),
        text(s.limit.clone().unwrap_or_default()),
        text(s.grants.len().to_string()),
    ];
    for g in &s.grants {
        let cat = if g.category == "promo" {
            Category::Promo
        } else {
            Category::Paid
        };
        let order = OrderKey::new(g.priority as u32, g.expires_at, cat, g.effective_at, g.created_at, g.id);
        let remaining = if g.status == "voided" || g.status == "expired" {
            "v".to_owned()
        } else if g.activated && g.effective_at > g.created_at {
            format!("a{}", fixed(g.remaining)?)
        } else {
            fixed(g.remaining)?.to_string()
        };
        argv.extend([text(g.id.to_string()), text(order.to_string()), text(remaining)]);
    }
    Ok(argv)
}

/// The decimal value of a fixed amount (re-exported for the batch step).
pub fn dec(v: i64, decimals: u32) -> Decimal {
    from_fixed(v, decimals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_in_consumption_order() {
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        let id = Uuid::nil();
        let k = |p, e, c, f| OrderKey::new(p, e, c, f, t(0), id).to_string();
        // priority first
        assert!(k(1, None, Category::Paid, t(5)) < k(2, Some(t(1)), Category::Promo, t(0)));
        // then sooner expiry, never last
        assert!(k(1, Some(t(10)), Category::Paid, t(0)) < k(1, Some(t(20)), Category::Paid, t(0)));
        assert!(k(1, Some(t(20)), Category::Paid, t(0)) < k(1, None, Category::Paid, t(0)));
        // then promo before paid
        assert!(k(1, None, Category::Promo, t(9)) < k(1, None, Category::Paid, t(0)));
        // then effective_at
        assert!(k(1, None, Category::Paid, t(1)) < k(1, None, Category::Paid, t(2)));
        assert_eq!(
            k(1000, None, Category::Paid, t(0)).len(),
            k(0, None, Category::Paid, t(0)).len()
        );
    }

    /// init.lua's ARGV for a settled pool, byte for byte as its header documents it.
    #[test]
    fn init_argv_is_pinned() {
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        let grant = |id: u128, category: &str, status: &str, effective: i64, activated: bool| SettledGrant {
            id: Uuid::from_u128(id),
            priority: 7,
            expires_at: Some(t(900)),
            category: category.into(),
            effective_at: t(effective),
            created_at: t(100),
            remaining: Decimal::new(1255, 2),
            status: status.into(),
            activated,
        };
        let settled = SettledPool {
            grants: vec![
                grant(1, "paid", "active", 100, true),
                grant(2, "promo", "depleted", 100, true),
                grant(3, "paid", "voided", 100, true),
                grant(4, "paid", "expired", 200, true),
                // Scheduled: activated carries "a", not yet activated is plain.
                grant(5, "paid", "active", 200, true),
                grant(6, "paid", "active", 200, false),
            ],
            overdraft: Some(Decimal::new(-3, 1)),
            limit: Some("soft".into()),
        };
        let order = |id: u128, cat, effective| {
            OrderKey::new(7, Some(t(900)), cat, t(effective), t(100), Uuid::from_u128(id)).to_string()
        };
        let s = |x: &str| x.as_bytes().to_vec();
        let mut want = vec![s("-30"), s("soft"), s("6")];
        for (id, cat, effective, remaining) in [
            (1, Category::Paid, 100, "1255"),
            (2, Category::Promo, 100, "1255"),
            (3, Category::Paid, 100, "v"),
            (4, Category::Paid, 200, "v"),
            (5, Category::Paid, 200, "a1255"),
            (6, Category::Paid, 200, "1255"),
        ] {
            want.extend([
                s(&Uuid::from_u128(id).to_string()),
                s(&order(id, cat, effective)),
                s(remaining),
            ]);
        }
        assert_eq!(init_argv(&settled, 2).unwrap(), want);
        // A pool Postgres has no row for: no overdraft, the credit type's limit, no grants.
        assert_eq!(init_argv(&SettledPool::default(), 2).unwrap(), [s("0"), s(""), s("0")]);
        // A settled amount finer than the credit type's decimals is refused, not rounded.
        assert!(matches!(init_argv(&settled, 1), Err(PoolError::Reply(_))));
    }

    /// The ARGV of every kind, byte for byte as apply.lua's header documents it.
    #[test]
    fn argv_of_every_kind_is_pinned() {
        let g = Uuid::from_u128(0x11);
        let gs = "00000000-0000-0000-0000-000000000011";
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        let order = OrderKey::new(100, None, Category::Paid, t(1), t(1), g);
        let op = |op| Op {
            msg: 3,
            offset: 42,
            ts_ms: 1_700_000_000_123,
            id: "0123456789abcdef".into(),
            op,
        };
        let member = |k: &str| shared::keys::dedupe_member(k).to_vec();
        let s = |x: &str| x.as_bytes().to_vec();
        let argv = |kind: &str, a: Vec<u8>, b: &str, c: Vec<u8>| {
            [s("42"), s(kind), a, s(b), c, s("1700000000123"), s("0123456789abcdef")]
        };
        let cases = [
            (
                PoolOp::Usage {
                    idempotency_key: "key-1".into(),
                    cost: 150,
                },
                argv("u", member("key-1"), "150", vec![]),
            ),
            (
                PoolOp::Grant {
                    grant_id: g,
                    amount: 5_000,
                    order,
                },
                argv(
                    "g",
                    s(gs),
                    "5000",
                    s(&format!("0100.9999999999999.1.0000000001000.0000000001000.{gs}")),
                ),
            ),
            (PoolOp::Void { grant_id: g }, argv("v", s(gs), "", vec![])),
            (PoolOp::Expire { grant_id: g }, argv("e", s(gs), "", vec![])),
            (PoolOp::Activate { grant_id: g }, argv("a", s(gs), "", vec![])),
            (
                PoolOp::Reverse {
                    event_uid: g,
                    entries: vec![(Some(g), -7), (None, -3), (Some(g), 0)],
                    release: None,
                },
                argv("r", s(gs), &format!("{gs}:-7,-:-3,{gs}:0"), vec![]),
            ),
            (
                PoolOp::Reverse {
                    event_uid: g,
                    entries: vec![],
                    release: Some(String::new()),
                },
                argv("r", s(gs), "", vec![]),
            ),
            (
                PoolOp::Reverse {
                    event_uid: g,
                    entries: vec![(None, -3)],
                    release: Some("key-1".into()),
                },
                argv("r", s(gs), "-:-3", member("key-1")),
            ),
            (
                PoolOp::Limit {
                    limit: Some(LimitKind::Hard),
                },
                argv("l", s("hard"), "", vec![]),
            ),
            (
                PoolOp::Limit {
                    limit: Some(LimitKind::Soft),
                },
                argv("l", s("soft"), "", vec![]),
            ),
            (PoolOp::Limit { limit: None }, argv("l", vec![], "", vec![])),
        ];
        for (o, want) in cases {
            assert_eq!(op(o.clone()).to_argv(), want, "{o:?}");
        }
        // The header, then each operation's seven values.
        let b = PoolOps {
            pool: PoolId {
                tenant_id: "t".into(),
                customer_id: "c".into(),
                resource_id: String::new(),
                credit_type: "ai".into(),
            },
            partition: 0,
            decimals: 2,
            hard: false,
            ops: vec![op(PoolOp::Void { grant_id: g })],
        };
        let mut want = vec![s("cr:{t:c}:d:"), s("600"), s("-1"), s("soft"), s("1")];
        want.extend(argv("v", s(gs), "", vec![]));
        assert_eq!(apply_argv(&b, "cr:{t:c}:d:", 600, -1), want);
    }

    #[test]
    fn parses_every_reply() {
        let g = "00000000-0000-0000-0000-000000000001";
        assert_eq!(
            parse_result(&format!("7|S|-5|{g}:-10:5;-:-10:-5")).unwrap(),
            (
                7,
                OpResult::Charged {
                    end: -5,
                    parts: vec![
                        Part {
                            grant_id: Some(Uuid::parse_str(g).unwrap()),
                            delta: -10,
                            end: 5
                        },
                        Part {
                            grant_id: None,
                            delta: -10,
                            end: -5
                        }
                    ],
                    activated: vec![]
                }
            )
        );
        // A scheduled grant activated by the event: its part comes first, with its own fields.
        assert_eq!(
            parse_result(&format!("7|S|3|+{g}:5:5:0:1700000000000;{g}:-2:3"))
                .unwrap()
                .1,
            OpResult::Charged {
                end: 3,
                parts: vec![Part {
                    grant_id: Some(Uuid::parse_str(g).unwrap()),
                    delta: -2,
                    end: 3
                }],
                activated: vec![Activation {
                    grant_id: Uuid::parse_str(g).unwrap(),
                    amount: 5,
                    end: 5,
                    repaid: 0,
                    effective_ms: 1_700_000_000_000
                }]
            }
        );
        assert_eq!(
            parse_result("8|S|5|").unwrap().1,
            OpResult::Charged {
                end: 5,
                parts: vec![],
                activated: vec![]
            }
        );
        assert_eq!(parse_result("9|P").unwrap().1, OpResult::Duplicate);
        assert_eq!(
            parse_result("9|D|3|insufficient_balance").unwrap().1,
            OpResult::Denied {
                end: 3,
                reason: "insufficient_balance".into()
            }
        );
        assert_eq!(
            parse_result("9|G|10|8|2").unwrap().1,
            OpResult::Granted {
                end: 10,
                remaining: 8,
                repaid: 2
            }
        );
        assert_eq!(
            parse_result("9|E|pool_total_too_large").unwrap().1,
            OpResult::Refused("pool_total_too_large".into())
        );
        assert!(parse_result("x|S").is_err());
    }
}
