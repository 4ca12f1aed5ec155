//! Command-line definitions (clap derive) and argument value parsers.
//!
//! Everything here is pure: `Cli::try_parse_from` is the unit under test.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kms_client::proto::Context;

/// Control and use the kmsd key-management daemon.
#[derive(Debug, Parser)]
#[command(name = "kmsctl", version)]
pub struct Cli {
    /// kmsd's socket [default: ./kmsd-dev/kmsd.sock if it exists, else
    /// /run/kmsd/kmsd.sock]
    #[arg(long, global = true, env = "KMSD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print responses (and errors, on stderr) as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's status.
    Status,
    /// Manage keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypt stdin (at most 64 KiB) to a blob on stdout.
    Encrypt {
        /// Key id or name.
        key: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Decrypt a blob on stdin to plaintext on stdout.
    Decrypt {
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Wrap a data key read from stdin; the blob goes to stdout.
    Wrap {
        /// Key id or name.
        key: String,
        #[command(flatten)]
        context: ContextArgs,
        #[command(flatten)]
        encoding: Base64Arg,
    },
    /// Unwrap a blob read from stdin; the data key goes to stdout.
    Unwrap {
        #[command(flatten)]
        context: ContextArgs,
        #[command(flatten)]
        encoding: Base64Arg,
    },
    /// Generate a data key; prints JSON with base64 `blob` and `plaintext`.
    GenerateDataKey {
        /// Key id or name.
        key: String,
        /// Return only the wrapped key.
        #[arg(long)]
        no_plaintext: bool,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Re-encrypt a blob on stdin to the active version of a key, inside
    /// the daemon; the new blob goes to stdout.
    ReEncrypt {
        /// Target key [default: the blob's own key].
        #[arg(long, value_name = "KEY")]
        to: Option<String>,
        #[command(flatten)]
        context: ContextArgs,
        /// Context of the new blob [default: the same as --context].
        #[arg(long = "to-context", value_name = "K=V", value_parser = parse_pair)]
        to_context: Vec<(String, String)>,
    },
    /// Encrypted filesystem mounts.
    #[command(subcommand)]
    Fs(FsCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write a consistent snapshot of every key of the zone, sealed under a
    /// backup key, to a new file (mode 0600). Global admins only.
    Backup {
        /// The backup file to create (must not exist; never replaced).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// 32-byte key file, mode 0600 (head -c 32 /dev/urandom > FILE).
        #[arg(long, value_name = "KEYFILE")]
        backup_key: PathBuf,
    },
}

/// `kmsctl audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log file (read directly, no
    /// daemon needed); exits 1 when it is broken.
    Verify {
        /// The audit log [default: ./kmsd-dev/state/audit.log if it
        /// exists, else /var/lib/kmsd/audit.log]
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
}

/// `kmsctl key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a customer key.
    Create {
        /// Unique name (alias).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Create without automatic rotation.
        #[arg(long, conflicts_with = "rotation_period")]
        no_rotation: bool,
        /// Automatic rotation period [default: 365].
        #[arg(long, value_name = "DAYS")]
        rotation_period: Option<u32>,
    },
    /// List keys.
    List,
    /// Show a key, its rotation settings and versions.
    Describe { key: String },
    /// Enable a key.
    Enable { key: String },
    /// Disable a key: it serves nothing until enabled.
    Disable { key: String },
    /// Schedule deletion after a waiting period.
    ScheduleDeletion {
        key: String,
        /// Waiting period, 7 to 30 days [default: 30].
        #[arg(long)]
        days: Option<u32>,
    },
    /// Cancel a scheduled deletion.
    CancelDeletion { key: String },
    /// Rotate now (manual rotation).
    Rotate { key: String },
    /// List versions with time and origin.
    Rotations { key: String },
    /// Automatic rotation settings.
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// Replicate a key into another zone.
    Replicate {
        key: String,
        #[arg(long)]
        zone: String,
    },
    /// On the primary: stop replicating a key to a zone, whose replica is
    /// removed (the primary keeps every version).
    Unreplicate {
        key: String,
        #[arg(long)]
        zone: String,
    },
    /// In a replica zone: make this zone the key's primary (when the
    /// primary zone is lost; it becomes a replica when it is back).
    Promote { key: String },
}

/// `kmsctl key rotation ...`
#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Enable automatic rotation.
    Enable {
        key: String,
        /// Rotation period [default: 365].
        #[arg(long, value_name = "DAYS")]
        period: Option<u32>,
    },
    /// Disable automatic rotation.
    Disable { key: String },
}

/// `kmsctl fs ...`
#[derive(Debug, Subcommand)]
pub enum FsCommand {
    /// Count files per key version under a mount.
    Versions { mount: PathBuf },
    /// Re-wrap every file header under a mount to the active key version.
    Rewrap { mount: PathBuf },
}

/// Repeated `--context K=V`.
#[derive(Debug, Args)]
pub struct ContextArgs {
    /// Encryption context pair; repeat for more.
    #[arg(long = "context", value_name = "K=V", value_parser = parse_pair)]
    pub pairs: Vec<(String, String)>,
}

impl ContextArgs {
    /// The pairs as a context.
    ///
    /// # Errors
    /// A key given twice.
    pub fn to_context(&self) -> Result<Context, String> {
        to_context(&self.pairs)
    }
}

/// `--base64` for commands that move binary data.
#[derive(Debug, Args)]
pub struct Base64Arg {
    /// Read and write base64 text instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
}

/// Builds a context, refusing a key given twice (which one was meant?).
///
/// # Errors
/// The duplicate key, in a message.
pub fn to_context(pairs: &[(String, String)]) -> Result<Context, String> {
    let mut context = Context::new();
    for (k, v) in pairs {
        if context.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("context key {k:?} given twice"));
        }
    }
    Ok(context)
}

/// Parses `K=V` (the value may contain `=`; the key may not be empty).
///
/// # Errors
/// A message for clap when there is no `=` or the key is empty.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("invalid context {s:?}: empty key")),
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => Err(format!("invalid context {s:?}: expected K=V")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("kmsctl").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn audit_verify_takes_an_optional_file() {
        let cli = parse(&["audit", "verify", "--file", "/tmp/a.log"]);
        let Command::Audit(AuditCommand::Verify { file }) = cli.command else {
            panic!("not audit verify");
        };
        assert_eq!(file.as_deref(), Some(std::path::Path::new("/tmp/a.log")));
        assert!(matches!(
            parse(&["audit", "verify"]).command,
            Command::Audit(AuditCommand::Verify { file: None })
        ));
    }

    fn fails(args: &[&str]) -> clap::error::ErrorKind {
        let argv = std::iter::once("kmsctl").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap_err().kind()
    }

    fn key_cmd(args: &[&str]) -> KeyCommand {
        match parse(args).command {
            Command::Key(k) => k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["key", "list", "--json", "--socket", "/tmp/s"]);
        assert!(cli.json);
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/s")));
        assert!(matches!(cli.command, Command::Key(KeyCommand::List)));
        assert!(matches!(parse(&["status"]).command, Command::Status));
        assert!(matches!(
            parse(&["backup", "--out", "b.kmsbak", "--backup-key", "k"]).command,
            Command::Backup { .. }
        ));
    }

    #[test]
    fn key_create_flags() {
        let cmd = key_cmd(&["key", "create", "--name", "n", "--description", "d"]);
        assert!(
            matches!(cmd, KeyCommand::Create { name: Some(ref n), ref description, no_rotation: false, rotation_period: None } if n == "n" && description == "d")
        );
        let cmd = key_cmd(&["key", "create", "--rotation-period", "90"]);
        assert!(matches!(
            cmd,
            KeyCommand::Create {
                rotation_period: Some(90),
                ..
            }
        ));
        let cmd = key_cmd(&["key", "create", "--no-rotation"]);
        assert!(matches!(cmd, KeyCommand::Create { no_rotation: true, .. }));
        let conflict = fails(&["key", "create", "--no-rotation", "--rotation-period", "9"]);
        assert_eq!(conflict, clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn key_subcommands_take_a_key() {
        for verb in [
            "describe",
            "enable",
            "disable",
            "cancel-deletion",
            "rotate",
            "rotations",
        ] {
            let cmd = key_cmd(&["key", verb, "k1"]);
            let key = match cmd {
                KeyCommand::Describe { key }
                | KeyCommand::Enable { key }
                | KeyCommand::Disable { key }
                | KeyCommand::CancelDeletion { key }
                | KeyCommand::Rotate { key }
                | KeyCommand::Rotations { key } => key,
                other => panic!("{verb}: {other:?}"),
            };
            assert_eq!(key, "k1");
            assert_eq!(fails(&["key", verb]), clap::error::ErrorKind::MissingRequiredArgument);
        }
    }

    #[test]
    fn key_deletion_rotation_and_replication() {
        let cmd = key_cmd(&["key", "schedule-deletion", "k", "--days", "7"]);
        assert!(matches!(cmd, KeyCommand::ScheduleDeletion { days: Some(7), .. }));
        let cmd = key_cmd(&["key", "rotation", "enable", "k", "--period", "30"]);
        assert!(matches!(
            cmd,
            KeyCommand::Rotation(RotationCommand::Enable { period: Some(30), .. })
        ));
        let cmd = key_cmd(&["key", "rotation", "disable", "k"]);
        assert!(matches!(cmd, KeyCommand::Rotation(RotationCommand::Disable { .. })));
        let cmd = key_cmd(&["key", "promote", "k"]);
        assert!(matches!(cmd, KeyCommand::Promote { ref key } if key == "k"));
        let cmd = key_cmd(&["key", "unreplicate", "k", "--zone", "eu"]);
        assert!(matches!(cmd, KeyCommand::Unreplicate { ref zone, .. } if zone == "eu"));
        let cmd = key_cmd(&["key", "replicate", "k", "--zone", "eu"]);
        assert!(matches!(cmd, KeyCommand::Replicate { ref zone, .. } if zone == "eu"));
        assert_eq!(
            fails(&["key", "replicate", "k"]),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            fails(&["key", "schedule-deletion", "k", "--days", "x"]),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn data_commands() {
        let cli = parse(&["encrypt", "k", "--context", "a=1", "--context", "b=x=y"]);
        let Command::Encrypt { key, context } = cli.command else {
            panic!()
        };
        assert_eq!(key, "k");
        let ctx = context.to_context().unwrap();
        assert_eq!(ctx.get("b").map(String::as_str), Some("x=y"));
        assert!(matches!(parse(&["decrypt"]).command, Command::Decrypt { .. }));
        let cli = parse(&["wrap", "k", "--base64"]);
        assert!(matches!(
            cli.command,
            Command::Wrap {
                encoding: Base64Arg { base64: true },
                ..
            }
        ));
        let cli = parse(&["unwrap", "--context", "f=1"]);
        assert!(matches!(
            cli.command,
            Command::Unwrap {
                encoding: Base64Arg { base64: false },
                ..
            }
        ));
        let cli = parse(&["generate-data-key", "k", "--no-plaintext"]);
        assert!(matches!(
            cli.command,
            Command::GenerateDataKey { no_plaintext: true, .. }
        ));
        let cli = parse(&["re-encrypt", "--to", "k2", "--context", "a=1", "--to-context", "b=2"]);
        let Command::ReEncrypt { to, to_context, .. } = cli.command else {
            panic!()
        };
        assert_eq!((to.as_deref(), to_context.len()), (Some("k2"), 1));
    }

    #[test]
    fn fs_commands() {
        let cli = parse(&["fs", "versions", "/mnt/x"]);
        assert!(matches!(cli.command, Command::Fs(FsCommand::Versions { .. })));
        let cli = parse(&["fs", "rewrap", "/mnt/x"]);
        assert!(matches!(cli.command, Command::Fs(FsCommand::Rewrap { .. })));
    }

    #[test]
    fn malformed_context_is_a_usage_error() {
        let kind = fails(&["encrypt", "k", "--context", "novalue"]);
        assert_eq!(kind, clap::error::ErrorKind::ValueValidation);
        assert_eq!(
            fails(&["decrypt", "--context", "=v"]),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn context_pairs() {
        assert_eq!(parse_pair("a=").unwrap(), ("a".into(), String::new()));
        assert!(parse_pair("a").is_err());
        let dup = [("a".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())];
        assert!(to_context(&dup).unwrap_err().contains("twice"));
    }

    #[test]
    fn unknown_command_is_refused() {
        assert_eq!(fails(&["frobnicate"]), clap::error::ErrorKind::InvalidSubcommand);
    }
}
