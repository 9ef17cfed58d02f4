//! The one tracing setup of the Tessera binaries: level from `RUST_LOG` (default
//! `info`), to stderr, human-readable or as JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text (coloured when stderr is a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The format a binary's `--log-json` flag asks for.
    pub fn from_json_flag(json: bool) -> Self {
        if json {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// A global subscriber was installed already (by an earlier call or another library).
#[derive(Debug, thiserror::Error)]
#[error("installing the tracing subscriber: {0}")]
pub struct InitTracingError(String);

/// Installs the process-wide subscriber. Call once, first thing in `main`.
pub fn init_tracing(format: LogFormat) -> Result<(), InitTracingError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    installed.map_err(|e| InitTracingError(e.to_string()))
}
