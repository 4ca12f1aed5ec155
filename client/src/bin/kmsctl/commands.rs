//! Runs one parsed command: reads its input, makes the request on a
//! [`BlockingClient`], and writes the rendered result to stdout.
//!
//! Input is read and checked before connecting, so bad input never reaches
//! the daemon and a usage mistake does not depend on the daemon running.

use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kms_client::proto::{Context, CreateKey, KeyInfo, MAX_DEK, MAX_PLAINTEXT};
use kms_client::{blob, default_socket_path, BlockingClient, GeneratedDataKey};
use zeroize::Zeroizing;

use crate::cli::{AuditCommand, Cli, Command, ContextArgs, FsCommand, KeyCommand, RotationCommand};
use crate::error::CliError;
use crate::input::{b64, encode_output, read_input, read_limited};
use crate::output::{self, Format};

/// Largest blob `decrypt` or `re-encrypt` may read: a 64 KiB plaintext
/// plus header and tag.
const MAX_DATA_BLOB: usize = MAX_PLAINTEXT + blob::MIN_BLOB_LEN;
/// The audit log of `kmsd --dev` started in the current directory.
const DEV_AUDIT_LOG: &str = "kmsd-dev/state/audit.log";
/// The audit log of the system daemon.
const SYSTEM_AUDIT_LOG: &str = "/var/lib/kmsd/audit.log";
/// Largest snapshot `backup` accepts from the daemon (whose own
/// `max_frame` is the limit that matters).
const MAX_SNAPSHOT_FRAME: usize = 64 << 20;
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
        match &mut self.client {
            Some(client) => Ok(client),
            slot @ None => Ok(slot.insert(BlockingClient::connect(&self.socket)?)),
        }
    }
}

/// Runs `cli` and prints its result.
///
/// # Errors
/// Whatever the command fails with; see [`CliError`].
pub fn run(cli: Cli) -> Result<(), CliError> {
    let format = if cli.json { Format::Json } else { Format::Human };
    if let Command::Audit(AuditCommand::Verify { file }) = &cli.command {
        return audit_verify(file.as_deref(), format);
    }
    let mut session = Session {
        socket: cli.socket.unwrap_or_else(default_socket_path),
        client: None,
    };
    let output = execute(cli.command, format, &mut session)?;
    write_stdout(&output)
}

/// `audit verify`: prints what it found on stdout; a broken chain then
/// fails with [`CliError::Broken`] (exit 1).
fn audit_verify(file: Option<&Path>, format: Format) -> Result<(), CliError> {
    let path = file.map_or_else(default_audit_log, Path::to_path_buf);
    let file_err = |source| CliError::File {
        path: path.clone(),
        source,
    };
    let f = std::fs::File::open(&path).map_err(file_err)?;
    let report = kms_client::audit::verify(io::BufReader::new(f)).map_err(file_err)?;
    write_stdout(&Output::Text(output::render(format, &report, output::audit_report)))?;
    if report.is_intact() {
        Ok(())
    } else {
        Err(CliError::Broken)
    }
}

fn default_audit_log() -> PathBuf {
    let dev = Path::new(".").join(DEV_AUDIT_LOG);
    if dev.exists() {
        dev
    } else {
        PathBuf::from(SYSTEM_AUDIT_LOG)
    }
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
    let stdin = || io::stdin().lock();
    let secret = Output::Secret;
    match command {
        Command::Status => {
            let c = s.client()?;
            let status = c.status()?;
            // A kmsd older than the store status answers `malformed`.
            let store = c.store_status().ok();
            let info = output::FullStatus { status, store };
            Ok(Output::Text(output::render(format, &info, output::status)))
        }
        Command::Backup { out, backup_key } => backup(s, &out, &backup_key).map(Output::Text),
        Command::Key(cmd) => key_command(cmd, format, s.client()?).map(Output::Text),
        Command::Fs(cmd) => fs_command(cmd, format, s).map(Output::Text),
        Command::Audit(AuditCommand::Verify { file }) => {
            audit_verify(file.as_deref(), format).map(|()| Output::Text(String::new()))
        }
        Command::Encrypt { key, context } => encrypt(s, &key, &context, stdin()).map(secret),
        Command::Decrypt { context } => decrypt(s, &context, stdin()).map(secret),
        Command::Wrap { key, context, encoding } => wrap(s, &key, &context, encoding.base64, stdin()).map(secret),
        Command::Unwrap { context, encoding } => unwrap(s, &context, encoding.base64, stdin()).map(secret),
        Command::GenerateDataKey {
            key,
            no_plaintext,
            context,
        } => {
            let context = context_of(&context)?;
            let dk = s.client()?.generate_data_key(&key, &context, !no_plaintext)?;
            Ok(secret(data_key_json(&dk)))
        }
        Command::ReEncrypt {
            to,
            context,
            to_context,
        } => re_encrypt(s, to.as_deref(), &context, &to_context, stdin()).map(secret),
    }
}

/// `backup`: the key is read and `out` checked absent before the daemon is
/// asked for the snapshot, so that nothing is fetched for a file that
/// cannot be written. The sealed snapshot goes to a new temporary file in
/// `out`'s folder (mode 0600, never through a link), is synced, then
/// linked to `out` (which fails if `out` exists: never over another file)
/// and the folder synced: `out` appears whole or not at all, even if kmsctl
/// dies part-way. The temporary file is removed in every case but a kill.
fn backup(s: &mut Session, out: &Path, key_file: &Path) -> Result<String, CliError> {
    let key = kms_client::backup::read_key_file(key_file).map_err(|e| CliError::Input(crate::error::chain(&e)))?;
    let write_err = |source| CliError::Write {
        path: out.to_path_buf(),
        source,
    };
    if std::fs::symlink_metadata(out).is_ok() {
        let exists = io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it exists; a backup never replaces a file (choose a new name)",
        );
        return Err(write_err(exists));
    }
    let (tmp, mut f) = temp_beside(out).map_err(write_err)?;
    let written = (|| -> Result<usize, CliError> {
        // Its own connection: a snapshot may exceed the default frame
        // limit when the daemon's max_frame was raised for it.
        let options = kms_client::ClientOptions {
            max_frame: MAX_SNAPSHOT_FRAME,
            ..kms_client::ClientOptions::default()
        };
        let snapshot = BlockingClient::connect_with(&s.socket, &options)?.backup()?;
        let sealed = kms_client::backup::seal(&key, &snapshot);
        drop(snapshot);
        f.write_all(&sealed).and_then(|()| f.sync_all()).map_err(write_err)?;
        std::fs::hard_link(&tmp, out).map_err(write_err)?;
        Ok(sealed.len())
    })();
    let _ = std::fs::remove_file(&tmp);
    let len = written?;
    std::fs::File::open(folder_of(out))
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(format!("backup written to {} ({len} bytes)\n", out.display()))
}

/// The folder `path` is in.
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A new file `.NAME.RANDOM.tmp` beside `path` (mode 0600, created
/// exclusively, so never through a link).
fn temp_beside(path: &Path) -> io::Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = folder_of(path).join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    Ok((tmp, f))
}

fn key_command(cmd: KeyCommand, format: Format, c: &mut BlockingClient) -> Result<String, CliError> {
    let change = |action: &str, key: &str, info: Option<KeyInfo>| match format {
        Format::Json => output::key_change_json(info.as_ref()),
        Format::Human => output::key_change(action, key, info.as_ref()),
    };
    Ok(match cmd {
        KeyCommand::Create {
            name,
            description,
            no_rotation,
            rotation_period,
        } => {
            let rotation = create_rotation(no_rotation, rotation_period);
            let key = c.create_key(CreateKey {
                name,
                description,
                rotation,
            })?;
            output::render(format, &key, output::key)
        }
        KeyCommand::List => output::render(format, &c.list_keys()?, |k| output::key_list(k)),
        KeyCommand::Describe { key } => output::render(format, &c.describe_key(&key)?, output::key),
        KeyCommand::Rotations { key } => output::render(format, &c.list_rotations(&key)?, |r| output::rotations(r)),
        KeyCommand::Enable { key } => change("enabled", &key, c.enable_key(&key)?),
        KeyCommand::Disable { key } => change("disabled", &key, c.disable_key(&key)?),
        KeyCommand::ScheduleDeletion { key, days } => {
            change("deletion scheduled", &key, c.schedule_deletion(&key, days)?)
        }
        KeyCommand::CancelDeletion { key } => change("deletion cancelled", &key, c.cancel_deletion(&key)?),
        KeyCommand::Rotate { key } => change("rotated", &key, c.rotate_key(&key)?),
        KeyCommand::Replicate { key, zone } => {
            change(&format!("replicated to {zone}"), &key, c.replicate_key(&key, &zone)?)
        }
        KeyCommand::Promote { key } => change("promoted: this zone is now its primary", &key, c.promote_key(&key)?),
        KeyCommand::Unreplicate { key, zone } => change(
            &format!("no longer replicated to {zone}"),
            &key,
            c.unreplicate_key(&key, &zone)?,
        ),
        KeyCommand::Rotation(RotationCommand::Enable { key, period }) => {
            change("automatic rotation enabled", &key, c.enable_rotation(&key, period)?)
        }
        KeyCommand::Rotation(RotationCommand::Disable { key }) => {
            change("automatic rotation disabled", &key, c.disable_rotation(&key)?)
        }
    })
}

/// `CreateKey::rotation` from the two flags (clap makes them exclusive).
fn create_rotation(no_rotation: bool, period: Option<u32>) -> Option<Option<u32>> {
    match (no_rotation, period) {
        (true, _) => Some(None),
        (false, Some(days)) => Some(Some(days)),
        (false, None) => None,
    }
}

fn context_of(pairs: &ContextArgs) -> Result<Context, CliError> {
    pairs.to_context().map_err(CliError::Usage)
}

type Secret = Zeroizing<Vec<u8>>;

fn encrypt(s: &mut Session, key: &str, ctx: &ContextArgs, input: impl Read) -> Result<Secret, CliError> {
    let context = context_of(ctx)?;
    let data = read_limited(input, MAX_PLAINTEXT, "plaintext")?;
    Ok(Zeroizing::new(s.client()?.encrypt(key, &data, &context)?))
}

fn decrypt(s: &mut Session, ctx: &ContextArgs, input: impl Read) -> Result<Secret, CliError> {
    let context = context_of(ctx)?;
    let data = read_limited(input, MAX_DATA_BLOB, "ciphertext blob")?;
    Ok(s.client()?.decrypt(&data, &context)?)
}

fn wrap(s: &mut Session, key: &str, ctx: &ContextArgs, base64: bool, input: impl Read) -> Result<Secret, CliError> {
    let context = context_of(ctx)?;
    let dek = read_input(input, base64, MAX_DEK, "data key")?;
    Ok(encode_output(&s.client()?.wrap(key, &dek, &context)?, base64))
}

fn unwrap(s: &mut Session, ctx: &ContextArgs, base64: bool, input: impl Read) -> Result<Secret, CliError> {
    let context = context_of(ctx)?;
    let data = read_input(input, base64, MAX_DEK_BLOB, "wrapped key blob")?;
    Ok(encode_output(&s.client()?.unwrap(&data, &context)?, base64))
}

fn re_encrypt(
    s: &mut Session,
    to: Option<&str>,
    ctx: &ContextArgs,
    to_ctx: &[(String, String)],
    input: impl Read,
) -> Result<Secret, CliError> {
    let context = context_of(ctx)?;
    let to_context = non_empty_context(to_ctx)?;
    let data = read_limited(input, MAX_DATA_BLOB, "ciphertext blob")?;
    let blob = s.client()?.re_encrypt(&data, &context, to, to_context.as_ref())?;
    Ok(Zeroizing::new(blob))
}

fn non_empty_context(pairs: &[(String, String)]) -> Result<Option<Context>, CliError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    crate::cli::to_context(pairs).map(Some).map_err(CliError::Usage)
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

fn fs_command(cmd: FsCommand, format: Format, s: &mut Session) -> Result<String, CliError> {
    Ok(match cmd {
        FsCommand::Versions { mount } => {
            let mount = mount_arg(&mount)?;
            let info = s.client()?.fs_versions(&mount)?;
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
    })
}

/// The mount as an absolute path with symlinks resolved, as mount
/// processes report theirs: the daemon does not share our cwd, and does
/// not look paths up itself (a lookup under a mountpoint is a request to
/// that mount). A path that does not resolve (a dead mount) is sent as
/// given, made absolute.
fn mount_arg(mount: &Path) -> Result<String, CliError> {
    let absolute = std::fs::canonicalize(mount).or_else(|_| std::path::absolute(mount));
    let absolute = absolute.map_err(|e| CliError::Usage(format!("bad mount path {}: {e}", mount.display())))?;
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

    use std::os::unix::net::UnixListener;

    use kms_client::blocking::{read_frame, write_frame};
    use kms_client::proto::codec::{decode_body, encode_body, Decoded};
    use kms_client::proto::{ErrorCode, ErrorReply, Frame, Request, Response, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

    /// A one-connection fake daemon answering with `answer`; returns the
    /// session pointed at it and the directory holding its socket.
    fn fake_daemon(answer: fn(Request) -> Response) -> (Session, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kmsd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            while let Ok(body) = read_frame(&mut conn, DEFAULT_MAX_FRAME) {
                let Decoded::Frame(frame) = decode_body::<Request>(&body) else {
                    return;
                };
                let reply = match frame.body {
                    Request::Hello { .. } => Response::Hello {
                        server: "fake".into(),
                        protocol: PROTOCOL_VERSION,
                        zone: "z".into(),
                    },
                    other => answer(other),
                };
                let out = encode_body(&Frame {
                    id: frame.id,
                    body: reply,
                })
                .unwrap();
                write_frame(&mut conn, &out, DEFAULT_MAX_FRAME).unwrap();
            }
        });
        let session = Session { socket, client: None };
        (session, dir)
    }

    #[test]
    fn encrypt_sends_stdin_and_context() {
        let (mut s, _dir) = fake_daemon(|req| match req {
            Request::Encrypt { plaintext, context, .. } if context.contains_key("a") => {
                Response::Blob(plaintext.to_vec())
            }
            _ => Response::Done,
        });
        let ctx = ContextArgs {
            pairs: vec![("a".into(), "1".into())],
        };
        let out = encrypt(&mut s, "k", &ctx, &b"secret"[..]).unwrap();
        assert_eq!(out.as_slice(), b"secret");
    }

    #[test]
    fn server_error_exits_1_with_its_code() {
        let (mut s, _dir) = fake_daemon(|_| Response::Error(ErrorReply::new(ErrorCode::NotFound, "no key named k")));
        let cmd = Command::Key(KeyCommand::Describe { key: "k".into() });
        let Err(err) = execute(cmd, Format::Human, &mut s) else {
            panic!("expected an error")
        };
        assert_eq!(err.exit_code(), 1);
        assert_eq!(err.render(false), "kmsctl: not-found: no key named k\n");
    }

    #[test]
    fn oversized_plaintext_is_refused_before_connecting() {
        let mut s = Session {
            socket: "/nonexistent/kmsd.sock".into(),
            client: None,
        };
        let big = vec![0u8; MAX_PLAINTEXT + 1];
        let ctx = ContextArgs { pairs: vec![] };
        let err = encrypt(&mut s, "k", &ctx, &big[..]).unwrap_err();
        assert!(matches!(err, CliError::Input(_)), "{err:?}");
    }

    #[test]
    fn unreachable_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session {
            socket: dir.path().join("none.sock"),
            client: None,
        };
        let Err(err) = execute(Command::Status, Format::Human, &mut s) else {
            panic!("connected to a socket that does not exist");
        };
        assert_eq!(err.exit_code(), 3);
    }
}
