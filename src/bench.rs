//! `credit-worker bench`.

use std::process::ExitCode;

use clap::Args;

use crate::config::Settings;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Distinct users.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Override pipeline.max_batch for the worker under test.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Open-loop publish rate in msgs/s (latency runs); default: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
}

pub async fn run(_settings: Settings, _args: BenchArgs, _json: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench: not available yet")
}
