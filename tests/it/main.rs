//! The integration tests, one binary: the harness, shared fixtures, and a module per area.
//! Run one area with `cargo test --test it consumer::`, one test by (part of) its name.

mod helpers;

mod fixtures;

mod access;
mod amqps;
mod bench;
mod consumer;
mod control;
mod dead_letters;
mod demo;
mod deployment;
mod docs;
mod faults;
mod ledger;
mod operations;
mod outbox;
mod pipeline;
mod properties;
mod tls;
