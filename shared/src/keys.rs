//! Redis keys. Every key of one customer carries the Cluster hash tag `{tenant:customer}`, so one
//! Lua call can touch all of them and the same code runs on Redis Cluster.

/// Key builder bound to a prefix (`cr` in production; tests use their own).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash holding one pool: its grants, overdraft, applied-offset watermark.
    pub fn pool(&self, tenant: &str, customer: &str, credit_type: &str, resource: &str) -> String {
        // `/` cannot occur in ids, so credit type and resource never run together.
        format!("{}:{{{tenant}:{customer}}}:p:{credit_type}/{resource}", self.prefix)
    }

    /// The journal of recent outcomes of one pool (for exact replay after a crash).
    pub fn journal(&self, pool_key: &str) -> String {
        format!("{pool_key}:j")
    }

    /// The prefix of the customer's dedupe marks; the Lua script appends the idempotency key.
    pub fn dedupe_prefix(&self, tenant: &str, customer: &str) -> String {
        format!("{}:{{{tenant}:{customer}}}:d:", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hash_tag_per_customer() {
        let k = Keys::new("cr");
        let p = k.pool("t1", "c1", "ai", "");
        assert_eq!(p, "cr:{t1:c1}:p:ai/");
        assert!(k.dedupe_prefix("t1", "c1").starts_with("cr:{t1:c1}:"));
        assert!(k.journal(&p).starts_with("cr:{t1:c1}:"));
    }
}
