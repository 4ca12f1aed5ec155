//! `kmsd`: parse arguments, set up logging, load the configuration, run
//! the key daemon, or with `kmsd mount NAME` one mount process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kmsd::app::{self, StartError};
use kmsd::config::{self, Config};
use kmsd::logging;
use kmsd::mount::MountSettings;

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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Serve one encrypted filesystem as a client of kmsd (a mount
    /// process: kmsd-mount@NAME.service, or a child of kmsd).
    Mount(MountArgs),
    /// Fill the empty key store that --config names (file or etcd) from a
    /// backup made by `kmsctl backup`, sealed again under the config's root
    /// key. Run it with kmsd stopped.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The 32-byte backup key file the backup was made with.
        #[arg(long, value_name = "KEYFILE")]
        backup_key: PathBuf,
        /// Finish a restore that was cut off: empty the store it left
        /// marked as being restored and fill it from the start.
        #[arg(long)]
        resume: bool,
    },
    /// Copy the file store in state_dir into the empty etcd prefix that
    /// --config's [store] names. Run it with kmsd stopped.
    Migrate {
        /// Finish a migration that was cut off: empty the etcd prefix it
        /// left marked and fill it from the start.
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct MountArgs {
    /// The mount's name: its settings are /etc/kmsd/mounts/NAME.toml, its
    /// admin socket mounts/NAME.sock beside kmsd's socket.
    name: String,
    /// Settings file instead of /etc/kmsd/mounts/NAME.toml.
    #[arg(long, conflicts_with_all = ["source", "target", "key", "socket"])]
    settings: Option<PathBuf>,
    /// Backing folder (with --target and --key instead of a settings file).
    #[arg(long, requires_all = ["target", "key"])]
    source: Option<PathBuf>,
    /// Mountpoint.
    #[arg(long, requires_all = ["source", "key"])]
    target: Option<PathBuf>,
    /// Key (name or id).
    #[arg(long, requires_all = ["source", "target"])]
    key: Option<String>,
    /// kmsd's socket.
    #[arg(long, default_value = kmsd::mount::DEFAULT_SOCKET, requires = "source")]
    socket: PathBuf,
    /// Names of a new backing directory: encrypted or plain.
    #[arg(long, value_enum, default_value = "encrypted", requires = "source")]
    names: kmsd::mount::Names,
    /// A connection to kmsd on this descriptor (given by kmsd to the mount
    /// processes it starts itself).
    #[arg(long, hide = true, requires = "source")]
    kmsd_fd: Option<i32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (who, done) = match &args.command {
        Some(Command::Mount(m)) => ("kmsd mount", mount(m)),
        Some(Command::Restore {
            from,
            backup_key,
            resume,
        }) => (
            "kmsd restore",
            offline(&args, |cfg| kmsd::restore::restore(cfg, from, backup_key, *resume)),
        ),
        Some(Command::Migrate { resume }) => (
            "kmsd migrate",
            offline(&args, |cfg| kmsd::restore::migrate(cfg, *resume)),
        ),
        None => ("kmsd", start(&args)),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{who}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mount(args: &MountArgs) -> anyhow::Result<()> {
    // It holds the data keys of open files: no core dumps, no swap.
    let hardening = kmsd::harden::process();
    let log = logging::init("info");
    kmsd::harden::log(&hardening);
    anyhow::ensure!(
        kmsd::mount::name_ok(&args.name),
        "mount name {:?}: 1-64 characters from A-Z a-z 0-9 - _ . (not starting with .)",
        args.name
    );
    let settings = match (&args.source, &args.target, &args.key) {
        (Some(source), Some(target), Some(key)) => MountSettings::new(
            source.clone(),
            target.clone(),
            key.clone(),
            args.socket.clone(),
            args.names,
        )?,
        _ => {
            let path = args
                .settings
                .clone()
                .unwrap_or_else(|| PathBuf::from(kmsd::mount::MOUNTS_DIR).join(format!("{}.toml", args.name)));
            MountSettings::load(&path).with_context(|| format!("{}", path.display()))?
        }
    };
    log.set(&settings.log_level);
    Ok(kmsd::mount::run(
        &args.name,
        &settings,
        given_connection(args.kmsd_fd)?,
    )?)
}

/// The connection kmsd passed on descriptor `fd`, checked to be a socket.
fn given_connection(fd: Option<i32>) -> anyhow::Result<Option<std::os::unix::net::UnixStream>> {
    use std::os::fd::FromRawFd;
    let Some(fd) = fd else { return Ok(None) };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` into `st` or fails (EBADF for a
    // descriptor that is not open); `st` is read only after success.
    let mode = unsafe {
        if libc::fstat(fd, st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("--kmsd-fd {fd}"));
        }
        st.assume_init().st_mode
    };
    anyhow::ensure!(mode & libc::S_IFMT == libc::S_IFSOCK, "--kmsd-fd {fd} is not a socket");
    // The channel carries kmsd's authority: no program this process runs
    // (fusermount3, to mount or unmount) inherits it.
    // SAFETY: fcntl on an open descriptor with an integer flag argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("--kmsd-fd {fd}: close-on-exec"));
    }
    // SAFETY: `fd` is an open socket (checked above) that kmsd handed this
    // process for it alone; nothing else in the process owns it.
    Ok(Some(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) }))
}

/// Restore or migrate: with the configuration, no runtime of kmsd's own
/// (the etcd store runs its client on a thread of its own).
fn offline(
    args: &Args,
    run: impl FnOnce(&Config) -> Result<kmsd::restore::Report, kmsd::restore::RestoreError>,
) -> anyhow::Result<()> {
    let _log = logging::init("info");
    anyhow::ensure!(!args.dev, "restore and migrate take --config, not --dev");
    let (cfg, _) = load(args)?;
    let report = run(&cfg)?;
    println!("{} keys written into the {}", report.keys, report.target);
    Ok(())
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
