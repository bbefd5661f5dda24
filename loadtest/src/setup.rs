//! Run setup through the public API: fresh tenants, their rate limits, the `ai-tokens` credit
//! type, the `llm-call` mapping, and one large grant per customer.
//!
//! Every tenant is new (`loadtest-<uuid>`), so runs never see each other's data and the
//! verification can scope every query to the tenants created here.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::{Client, Method, StatusCode};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::args::Args;
use crate::generator::{customer_name, CustomerMix, CREDITS_PER_UNIT, EVENT_NAME};

/// The credit type every event is charged in.
pub const CREDIT_TYPE: &str = "ai-tokens";
/// Grant per customer, large enough that no event is ever denied.
pub const GRANT_AMOUNT: Decimal = Decimal::from_parts(100_000_000, 0, 0, false, 0);
/// Grants in flight at once during setup.
const GRANT_CONCURRENCY: usize = 32;

/// A tenant created for the run.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub api_key: String,
    /// Customer indices that received a grant (see `generator::customer_name`).
    pub customers: Vec<u32>,
}

#[derive(Deserialize)]
struct CreatedTenant {
    tenant_id: Value,
    api_key: String,
}

/// The HTTP client shared by setup and the load: plain HTTP/1.1, keep-alive, no retries.
pub fn http_client(concurrency: usize) -> Result<Client> {
    Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// Sends one JSON call and fails with the status and body unless the status is one of `ok`.
async fn call(
    client: &Client,
    method: Method,
    url: &str,
    token: &str,
    body: &Value,
    ok: &[StatusCode],
) -> Result<Value> {
    let resp = client
        .request(method.clone(), url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("{method} {url}: reading the body"))?;
    if !ok.contains(&status) {
        bail!("{method} {url}: expected {ok:?}, got {status}: {text}");
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {url}: body is not JSON: {text}"))
}

/// Creates `args.tenants` tenants and everything the load needs in each.
pub async fn setup(client: &Client, args: &Args, mix: &CustomerMix) -> Result<Vec<Tenant>> {
    let mut tenants = Vec::with_capacity(mix.tenant_count());
    for t in 0..mix.tenant_count() {
        let tenant = setup_tenant(client, args, mix.customers_of(t))
            .await
            .with_context(|| format!("setting up tenant {} of {}", t + 1, mix.tenant_count()))?;
        if args.ingest_only {
            eprintln!("setup: tenant {} ready (ingest only: no grants)", tenant.id);
        } else {
            eprintln!(
                "setup: tenant {} ready ({} customers granted {} {CREDIT_TYPE})",
                tenant.id,
                tenant.customers.len(),
                GRANT_AMOUNT
            );
        }
        tenants.push(tenant);
    }
    Ok(tenants)
}

async fn setup_tenant(client: &Client, args: &Args, customers: &[u32]) -> Result<Tenant> {
    let base = args.base_url();
    let created = call(
        client,
        Method::POST,
        &format!("{base}/v1/admin/tenants"),
        args.admin_token(),
        &json!({ "name": format!("loadtest-{}", uuid::Uuid::new_v4()) }),
        &[StatusCode::CREATED, StatusCode::OK],
    )
    .await?;
    let created: CreatedTenant = serde_json::from_value(created).context("tenant reply lacks {tenant_id, api_key}")?;
    let id = match created.tenant_id {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let key = created.api_key;

    call(
        client,
        Method::PUT,
        &format!("{base}/v1/admin/tenants/{id}/limits"),
        args.admin_token(),
        &json!({ "events_per_second": args.tenant_events_per_second() }),
        &[StatusCode::OK, StatusCode::NO_CONTENT, StatusCode::CREATED],
    )
    .await?;

    call(
        client,
        Method::POST,
        &format!("{base}/v1/credit-types"),
        &key,
        &json!({
            "id": CREDIT_TYPE,
            "name": "AI Tokens",
            "unit_singular": "token",
            "unit_plural": "tokens",
            "decimals": 2,
            "limit": "hard",
        }),
        &[StatusCode::CREATED, StatusCode::OK],
    )
    .await?;

    call(
        client,
        Method::PUT,
        &format!("{base}/v1/features/{EVENT_NAME}/credit-mapping"),
        &key,
        &json!({
            "credit_type": CREDIT_TYPE,
            "credits_per_unit": CREDITS_PER_UNIT.to_string(),
            "quantity_dimension": "tokens",
        }),
        &[StatusCode::OK, StatusCode::CREATED],
    )
    .await?;

    // Ingest alone needs no funded pools (nothing will verify them, and a grant waits for the
    // rater to apply it).
    if args.ingest_only {
        return Ok(Tenant {
            id,
            api_key: key,
            customers: customers.to_vec(),
        });
    }
    let grants_url = format!("{base}/v1/credits/grants");
    stream::iter(customers.iter().copied())
        .map(|c| {
            let body = json!({
                "customer_id": customer_name(c),
                "credit_type": CREDIT_TYPE,
                "amount": GRANT_AMOUNT.to_string(),
                "display_name": "loadtest",
            });
            let (grants_url, key) = (&grants_url, &key);
            async move {
                call(
                    client,
                    Method::POST,
                    grants_url,
                    key,
                    &body,
                    &[StatusCode::CREATED, StatusCode::ACCEPTED],
                )
                .await
                .with_context(|| format!("granting {}", customer_name(c)))
            }
        })
        .buffer_unordered(GRANT_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await?;

    Ok(Tenant {
        id,
        api_key: key,
        customers: customers.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_render_as_the_api_expects() {
        assert_eq!(GRANT_AMOUNT.to_string(), "100000000");
        assert_eq!(CREDITS_PER_UNIT.to_string(), "0.01");
        // Even 20k events/s for 10 minutes, all to one customer at the most tokens, fits.
        let worst = Decimal::from(20_000u64 * 600) * Decimal::from(500u32) * CREDITS_PER_UNIT;
        assert!(worst < GRANT_AMOUNT);
    }
}
