//! Logging through tracing to stderr (journald reads it), with ANSI colours
//! only on a terminal, and a filter that can be changed at run time (config
//! load and SIGHUP reload).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the active log filter.
#[derive(Debug, Clone)]
pub struct LogHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LogHandle {
    /// Applies `level` (EnvFilter syntax) unless `RUST_LOG` overrides it.
    pub fn set(&self, level: &str) {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        if let (Some(h), Ok(f)) = (&self.0, EnvFilter::try_new(level)) {
            let _ = h.reload(f);
        }
    }
}

/// Installs the global subscriber with an initial `level` (`RUST_LOG` wins).
pub fn init(level: &str) -> LogHandle {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match tracing_subscriber::registry().with(layer).with(fmt).try_init() {
        Ok(()) => LogHandle(Some(handle)),
        Err(_) => LogHandle(None),
    }
}
