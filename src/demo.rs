//! `credit-worker demo`.

use std::process::ExitCode;

use crate::config::Settings;

pub async fn run(_settings: Settings, _json: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo: not available yet")
}
