//! `kmsd`: parse arguments, set up logging, load the configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kmsd::app::{self, StartError};
use kmsd::config::{self, Config};
use kmsd::logging;

/// kmsd: local key-management sidecar.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_CONFIG, conflicts_with = "dev")]
    config: PathBuf,
    /// Keep everything (socket, state, root key, config) in one local folder.
    #[arg(long)]
    dev: bool,
    /// The --dev folder.
    #[arg(long, default_value = app::DEFAULT_DEV_DIR, requires = "dev")]
    dev_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match start(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: &Args) -> anyhow::Result<()> {
    // Before any key is read and before the runtime's threads exist.
    let hardening = kmsd::harden::process();
    // Log the start-up at info until the config says otherwise.
    let log = logging::init("info");
    kmsd::harden::log(&hardening);
    let (cfg, dev_dir) = load(args)?;
    log.set(&cfg.log_level);
    let again = args.clone();
    let reload = app::Reloader {
        load: Box::new(move || load(&again).map(|(cfg, _)| cfg)),
        log,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    Ok(runtime.block_on(app::run(cfg, dev_dir, reload))?)
}

fn load(args: &Args) -> Result<(Config, Option<PathBuf>), StartError> {
    if args.dev {
        let (cfg, dir) = app::dev_config(&args.dev_dir)?;
        return Ok((cfg, Some(dir)));
    }
    let cfg = Config::load(&args.config, config::process_env()).map_err(|source| StartError::Config {
        path: args.config.clone(),
        source: Box::new(source),
    })?;
    Ok((cfg, None))
}
