//! Runs one parsed command: reads its input, makes the request on a
//! [`BlockingClient`], and writes the rendered result to stdout.
//!
//! Input is read and checked before connecting, so bad input never reaches
//! the daemon and a usage mistake does not depend on the daemon running.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kms_client::proto::{Context, CreateKey, MAX_DEK, MAX_PLAINTEXT};
use kms_client::{blob, default_socket_path, BlockingClient, GeneratedDataKey};
use zeroize::Zeroizing;

use crate::cli::{Cli, Command, FsCommand, KeyCommand, RotationCommand};
use crate::error::CliError;
use crate::input::{b64, encode_output, read_input, read_limited};
use crate::output::{self, Format};

/// Largest blob `decrypt` or `re-encrypt` may read: a 64 KiB plaintext
/// plus header and tag.
const MAX_DATA_BLOB: usize = MAX_PLAINTEXT + blob::MIN_BLOB_LEN;
/// Largest blob `unwrap` may read.
const MAX_DEK_BLOB: usize = MAX_DEK + blob::MIN_BLOB_LEN;

/// What a command prints on stdout.
enum Output {
    /// Rendered text.
    Text(String),
    /// Bytes that may be secret (plaintext, data keys): zeroized after use.
    Secret(Zeroizing<Vec<u8>>),
}

/// A connection opened on first use.
struct Session {
    socket: PathBuf,
    client: Option<BlockingClient>,
}

impl Session {
    fn client(&mut self) -> Result<&mut BlockingClient, CliError> {
        if self.client.is_none() {
            self.client = Some(BlockingClient::connect(&self.socket)?);
        }
        // Just filled in above.
        self.client
            .as_mut()
            .ok_or_else(|| CliError::Usage("no connection".into()))
    }
}

/// Runs `cli` and prints its result.
///
/// # Errors
/// Whatever the command fails with; see [`CliError`].
pub fn run(cli: Cli) -> Result<(), CliError> {
    let format = if cli.json {
        Format::Json
    } else {
        Format::Human
    };
    let mut session = Session {
        socket: cli.socket.unwrap_or_else(default_socket_path),
        client: None,
    };
    let output = execute(cli.command, format, &mut session)?;
    write_stdout(&output)
}

fn write_stdout(output: &Output) -> Result<(), CliError> {
    let bytes = match output {
        Output::Text(text) => text.as_bytes(),
        Output::Secret(bytes) => bytes.as_slice(),
    };
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Stdio {
            what: "write stdout",
            source,
        })
}

fn execute(command: Command, format: Format, s: &mut Session) -> Result<Output, CliError> {
    match command {
        Command::Status => {
            let info = s.client()?.status()?;
            Ok(Output::Text(output::render(format, &info, output::status)))
        }
        Command::Key(cmd) => key_command(cmd, format, s),
        Command::Fs(cmd) => fs_command(cmd, format, s),
        data => data_command(data, s),
    }
}

fn key_command(cmd: KeyCommand, format: Format, s: &mut Session) -> Result<Output, CliError> {
    let text = match cmd {
        KeyCommand::Create {
            name,
            description,
            no_rotation,
            rotation_period,
        } => {
            let rotation = match (no_rotation, rotation_period) {
                (true, _) => Some(None),
                (false, Some(days)) => Some(Some(days)),
                (false, None) => None,
            };
            let key = s.client()?.create_key(CreateKey {
                name,
                description,
                rotation,
            })?;
            output::render(format, &key, output::key)
        }
        KeyCommand::List => {
            output::render(format, &s.client()?.list_keys()?, |k| output::key_list(k))
        }
        KeyCommand::Describe { key } => {
            output::render(format, &s.client()?.describe_key(&key)?, output::key)
        }
        KeyCommand::Rotations { key } => {
            output::render(format, &s.client()?.list_rotations(&key)?, |r| {
                output::rotations(r)
            })
        }
        change => return key_change(change, format, s),
    };
    Ok(Output::Text(text))
}

/// Commands that change a key and may send the key back.
fn key_change(cmd: KeyCommand, format: Format, s: &mut Session) -> Result<Output, CliError> {
    let c = s.client()?;
    let (action, info, key) = match cmd {
        KeyCommand::Enable { key } => ("enabled", c.enable_key(&key)?, key),
        KeyCommand::Disable { key } => ("disabled", c.disable_key(&key)?, key),
        KeyCommand::ScheduleDeletion { key, days } => {
            ("deletion scheduled", c.schedule_deletion(&key, days)?, key)
        }
        KeyCommand::CancelDeletion { key } => ("deletion cancelled", c.cancel_deletion(&key)?, key),
        KeyCommand::Rotate { key } => ("rotated", c.rotate_key(&key)?, key),
        KeyCommand::Replicate { key, zone } => ("replicated", c.replicate_key(&key, &zone)?, key),
        KeyCommand::Rotation(RotationCommand::Enable { key, period }) => (
            "automatic rotation enabled",
            c.enable_rotation(&key, period)?,
            key,
        ),
        KeyCommand::Rotation(RotationCommand::Disable { key }) => (
            "automatic rotation disabled",
            c.disable_rotation(&key)?,
            key,
        ),
        KeyCommand::Create { .. }
        | KeyCommand::List
        | KeyCommand::Describe { .. }
        | KeyCommand::Rotations { .. } => {
            return Err(CliError::Usage("not a key change".into()));
        }
    };
    Ok(Output::Text(match format {
        Format::Json => output::key_change_json(info.as_ref()),
        Format::Human => output::key_change(action, &key, info.as_ref()),
    }))
}

fn context_of(pairs: &crate::cli::ContextArgs) -> Result<Context, CliError> {
    pairs.to_context().map_err(CliError::Usage)
}

/// encrypt, decrypt, wrap, unwrap, generate-data-key, re-encrypt: stdin
/// to stdout.
fn data_command(command: Command, s: &mut Session) -> Result<Output, CliError> {
    let stdin = io::stdin().lock();
    let out = match command {
        Command::Encrypt { key, context } => {
            let context = context_of(&context)?;
            let data = read_limited(stdin, MAX_PLAINTEXT, "plaintext")?;
            Zeroizing::new(s.client()?.encrypt(&key, &data, &context)?)
        }
        Command::Decrypt { context } => {
            let context = context_of(&context)?;
            let data = read_limited(stdin, MAX_DATA_BLOB, "ciphertext blob")?;
            s.client()?.decrypt(&data, &context)?
        }
        Command::Wrap {
            key,
            context,
            encoding,
        } => {
            let context = context_of(&context)?;
            let dek = read_input(stdin, encoding.base64, MAX_DEK, "data key")?;
            encode_output(&s.client()?.wrap(&key, &dek, &context)?, encoding.base64)
        }
        Command::Unwrap { context, encoding } => {
            let context = context_of(&context)?;
            let data = read_input(stdin, encoding.base64, MAX_DEK_BLOB, "wrapped key blob")?;
            encode_output(&s.client()?.unwrap(&data, &context)?, encoding.base64)
        }
        Command::GenerateDataKey {
            key,
            no_plaintext,
            context,
        } => {
            let context = context_of(&context)?;
            data_key_json(
                &s.client()?
                    .generate_data_key(&key, &context, !no_plaintext)?,
            )
        }
        Command::ReEncrypt {
            to,
            context,
            to_context,
        } => {
            let context = context_of(&context)?;
            let to_context = non_empty_context(&to_context)?;
            let data = read_limited(stdin, MAX_DATA_BLOB, "ciphertext blob")?;
            let blob =
                s.client()?
                    .re_encrypt(&data, &context, to.as_deref(), to_context.as_ref())?;
            Zeroizing::new(blob)
        }
        other => return Err(CliError::Usage(format!("not a data command: {other:?}"))),
    };
    Ok(Output::Secret(out))
}

fn non_empty_context(pairs: &[(String, String)]) -> Result<Option<Context>, CliError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    crate::cli::to_context(pairs)
        .map(Some)
        .map_err(CliError::Usage)
}

/// `{"blob": "<base64>", "plaintext": "<base64>"}`, built in zeroizing
/// memory (the plaintext is a live data key).
fn data_key_json(dk: &GeneratedDataKey) -> Zeroizing<Vec<u8>> {
    let blob = b64(&dk.blob);
    let plain = dk.plaintext.as_ref().map(|p| b64(p));
    let len = blob.len() + plain.as_ref().map_or(4, |p| p.len() + 2) + 32;
    let mut out = Zeroizing::new(String::with_capacity(len));
    out.push_str("{\"blob\": \"");
    out.push_str(&blob);
    out.push_str("\", \"plaintext\": ");
    match &plain {
        Some(p) => {
            out.push('"');
            out.push_str(p);
            out.push('"');
        }
        None => out.push_str("null"),
    }
    out.push_str("}\n");
    Zeroizing::new(out.as_bytes().to_vec())
}

fn fs_command(cmd: FsCommand, format: Format, s: &mut Session) -> Result<Output, CliError> {
    let text = match cmd {
        FsCommand::Versions { mount } => {
            let info = s.client()?.fs_versions(&mount_arg(&mount)?)?;
            output::render(format, &info, output::fs_versions)
        }
        FsCommand::Rewrap { mount } => {
            let mount = mount_arg(&mount)?;
            let mut progress = Progress::new(io::stderr().is_terminal());
            let info = s
                .client()?
                .fs_rewrap_with_progress(&mount, |d, t| progress.update(d, t))?;
            progress.finish();
            output::render(format, &info, output::fs_rewrap)
        }
    };
    Ok(Output::Text(text))
}

/// The mount as an absolute path: the daemon does not share our cwd.
fn mount_arg(mount: &Path) -> Result<String, CliError> {
    let absolute = std::path::absolute(mount)
        .map_err(|e| CliError::Usage(format!("bad mount path {}: {e}", mount.display())))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|p| CliError::Usage(format!("mount path is not UTF-8: {}", p.to_string_lossy())))
}

/// Progress on stderr: a self-updating line on a terminal, else a line at
/// most every few seconds.
struct Progress {
    tty: bool,
    last: Option<Instant>,
    shown: bool,
}

impl Progress {
    const LOG_EVERY: Duration = Duration::from_secs(2);

    fn new(tty: bool) -> Self {
        Self {
            tty,
            last: None,
            shown: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let due = self.last.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY);
        if !self.tty && !due && done < total {
            return;
        }
        self.last = Some(Instant::now());
        self.shown = true;
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let line = format!("rewrap: {done}/{total} files ({pct}%)");
        // Progress is best effort: a closed stderr must not fail the rewrap.
        let _ = if self.tty {
            write!(io::stderr(), "\r{line}")
        } else {
            writeln!(io::stderr(), "{line}")
        };
    }

    fn finish(&self) {
        if self.tty && self.shown {
            let _ = writeln!(io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_key_json_has_blob_and_plaintext() {
        let dk = GeneratedDataKey {
            blob: vec![1, 2, 3],
            plaintext: Some(Zeroizing::new(vec![9; 4])),
        };
        let value: serde_json::Value = serde_json::from_slice(&data_key_json(&dk)).unwrap();
        assert_eq!(value["blob"], "AQID");
        assert_eq!(value["plaintext"], "CQkJCQ==");
        let dk = GeneratedDataKey {
            blob: vec![1],
            plaintext: None,
        };
        let value: serde_json::Value = serde_json::from_slice(&data_key_json(&dk)).unwrap();
        assert!(value["plaintext"].is_null());
    }

    #[test]
    fn mount_paths_are_made_absolute() {
        let m = mount_arg(Path::new("mnt")).unwrap();
        assert!(Path::new(&m).is_absolute() && m.ends_with("mnt"));
    }

    #[test]
    fn unreachable_socket_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("kmsctl-test-{}", std::process::id()));
        let mut s = Session {
            socket: dir.join("none.sock"),
            client: None,
        };
        let Err(err) = execute(Command::Status, Format::Human, &mut s) else {
            panic!("connected to a socket that does not exist");
        };
        assert_eq!(err.exit_code(), 3);
    }
}
