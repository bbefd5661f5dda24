//! Integration tests against the real thing: nisshi (Kafka protocol), Redis, Postgres, HTTP,
//! and the three service binaries as processes.

mod billing;
mod faults;
mod harness;
mod isolation;
mod observability;
mod pipeline;
mod property;
mod semantics;
mod tls;
mod truth;
mod webhooks;
