//! credit-worker: bills AI-workflow node executions in credits.
//!
//! Data path: `consumer` (RabbitMQ deliveries) → `decide` (one PostgreSQL transaction per
//! batch, through `ledger`) → ack; `outbox` publishes the committed events; `refill` tops users
//! up monthly; `control` answers operator commands; `telemetry` exposes metrics and health.

pub mod bench;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod control;
pub mod cost;
pub mod db;
pub mod decide;
pub mod demo;
pub mod events;
pub mod ledger;
pub mod message;
pub mod outbox;
pub mod publish;
pub mod refill;
pub mod retry;
pub mod scratch;
pub mod service;
pub mod telemetry;
pub mod topology;
