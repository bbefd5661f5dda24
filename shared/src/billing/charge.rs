//! The charge client. A charge is `POST charge_url` with a JSON body
//! `{charge_id, customer_id, amount, currency, payment_method_id, reason, credit_type, credits}`,
//! signed like a webhook (Standard Webhooks: `webhook-id` = the charge id, `webhook-timestamp`,
//! `webhook-signature`) and carrying `Idempotency-Key: <charge_id>`. The receiver answers 2xx
//! `{"status": "succeeded" | "failed"}`.
//!
//! Anything else (a timeout, a refused connection, 5xx, 408, 409, 429, a 2xx without a status) is
//! `Unknown`: the money may or may not have moved, so the caller retries with the same
//! `charge_id` and never with a new one. Other 4xx answers are a refusal (`Failed`).

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::webhook::address::{check_url, SafeResolver};
use crate::webhook::sign::sign;

#[derive(Debug, Clone, Serialize)]
pub struct ChargeRequest {
    pub charge_id: String,
    pub customer_id: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: String,
    pub payment_method_id: String,
    /// "top_up" or "auto_recharge".
    pub reason: String,
    pub credit_type: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub credits: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded,
    /// Declined or refused; the text says why (never sent to clients verbatim when internal).
    Failed(String),
    /// No answer we can trust: retry with the same charge id.
    Unknown(String),
}

#[derive(Clone)]
pub struct ChargeClient {
    http: reqwest::Client,
    allow_private: bool,
}

impl ChargeClient {
    pub fn new(timeout: Duration, allow_private: bool) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("credits-charges/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            b = b.dns_resolver(Arc::new(SafeResolver));
        }
        Ok(ChargeClient {
            http: b.build()?,
            allow_private,
        })
    }

    /// Send one attempt of a charge.
    pub async fn charge(&self, url: &str, secret: &str, req: &ChargeRequest) -> ChargeOutcome {
        if let Err(e) = check_url(url, self.allow_private) {
            return ChargeOutcome::Failed(format!("charge_url refused: {e}"));
        }
        let body = match serde_json::to_vec(req) {
            Ok(b) => b,
            Err(e) => return ChargeOutcome::Failed(format!("unserializable: {e}")),
        };
        let ts = chrono::Utc::now().timestamp();
        let sig = match sign(secret, &req.charge_id, ts, &body) {
            Ok(s) => s,
            Err(e) => return ChargeOutcome::Failed(format!("secret: {e}")),
        };
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &req.charge_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .header("idempotency-key", &req.charge_id)
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return ChargeOutcome::Unknown("timeout".into()),
            Err(e) => return ChargeOutcome::Unknown(format!("transport: {e}")),
        };
        let status = resp.status();
        if status.is_server_error() || [408, 409, 425, 429].contains(&status.as_u16()) {
            return ChargeOutcome::Unknown(format!("http {}", status.as_u16()));
        }
        if !status.is_success() {
            return ChargeOutcome::Failed(format!("http {}", status.as_u16()));
        }
        let v: serde_json::Value = match resp.json().await {
            Ok(v) => v,
            Err(e) if e.is_timeout() => return ChargeOutcome::Unknown("timeout".into()),
            Err(_) => return ChargeOutcome::Unknown("unreadable answer".into()),
        };
        match v.get("status").and_then(|s| s.as_str()) {
            Some("succeeded") => ChargeOutcome::Succeeded,
            Some("failed") => ChargeOutcome::Failed(
                v.get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("declined")
                    .chars()
                    .take(200)
                    .collect(),
            ),
            _ => ChargeOutcome::Unknown("answer without a status".into()),
        }
    }
}
