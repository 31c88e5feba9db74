//! credit-worker: bills AI-workflow node executions in credits.
//!
//! Data path: `consumer` (RabbitMQ deliveries) → `decide` (one PostgreSQL transaction per
//! batch, through `ledger`) → ack; `outbox` publishes the committed events; `refill` tops users
//! up monthly; `control` answers operator commands; `telemetry` exposes metrics and health.
//! `tools` (bench, demo, publish) sit beside the core and use only its public API.

pub mod amqp;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod consumer;
pub mod control;
pub mod cost;
pub mod db;
pub mod decide;
pub mod events;
pub(crate) mod health;
pub(crate) mod http;
pub mod ledger;
pub(crate) mod logs;
pub mod message;
pub(crate) mod outbox;
pub(crate) mod progress;
pub(crate) mod redact;
pub mod refill;
pub(crate) mod retry;
pub mod service;
pub(crate) mod signal;
pub mod telemetry;
pub(crate) mod throttle;
pub mod tools;
