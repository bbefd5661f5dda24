//! What the three services of the credits pipeline share: the messages on the topics, amounts,
//! Redis keys, pricing, configuration pieces and telemetry.

pub mod amount;
pub mod billing;
pub mod config;
pub mod consume;
pub mod db;
pub mod dead_letter;
pub mod hot_pool;
pub mod kafka;
pub mod keys;
pub mod model;
pub mod pricing;
pub mod redis_conn;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod webhook;
