//! The workload of the crash and power-loss loops: clients that create,
//! rotate, wrap, re-encrypt and unwrap with keys, writers that append
//! fsynced records through the mount, the record of everything they were
//! told, and the check that all of it is there after a restart.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::TestDaemon;

/// A small deterministic generator (xorshift64*), so a seed replays a run.
#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Everything clients were told.
#[derive(Default)]
pub(crate) struct Acked {
    /// (blob, dek) for every blob handed out.
    pub(crate) blobs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Highest version each key was reported at (created keys at 1).
    pub(crate) versions: HashMap<String, u32>,
    /// Durable length of each log file whose name is durable.
    pub(crate) durable: HashMap<String, u64>,
    pub(crate) ops: u64,
}

pub(crate) type Shared = Arc<Mutex<Acked>>;

pub(crate) fn client_worker(socket: PathBuf, keys: Vec<String>, acked: Shared, stop: Arc<AtomicBool>, mut rng: Rng) {
    let Ok(mut c) = BlockingClient::connect(&socket) else {
        return;
    };
    let ctx = Context::new();
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[rng.below(keys.len() as u64) as usize];
        let result = match rng.below(10) {
            9 => {
                let name = format!("k{:016x}", rng.next());
                c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                })
                .map(|_| {
                    acked.lock().unwrap().versions.insert(name, 1);
                })
            }
            0 => c.rotate_key(key).map(|k| {
                if let Some(k) = k {
                    let mut a = acked.lock().unwrap();
                    let v = a.versions.entry(key.clone()).or_default();
                    *v = (*v).max(k.active_version);
                }
            }),
            1..=4 => {
                let dek = rng.next().to_le_bytes().repeat(4);
                c.wrap(key, &dek, &ctx)
                    .map(|blob| acked.lock().unwrap().blobs.push((blob, dek)))
            }
            5 => {
                let pick = { acked.lock().unwrap().blobs.last().cloned() };
                match pick {
                    Some((blob, dek)) => c
                        .re_encrypt(&blob, &ctx, None, None)
                        .map(|b| acked.lock().unwrap().blobs.push((b, dek))),
                    None => Ok(()),
                }
            }
            _ => {
                let pick = {
                    let a = acked.lock().unwrap();
                    (!a.blobs.is_empty()).then(|| a.blobs[rng.below(a.blobs.len() as u64) as usize].clone())
                };
                match pick {
                    Some((blob, dek)) => c
                        .unwrap(&blob, &ctx)
                        .map(|p| assert_eq!(&p[..], &dek[..], "wrong plaintext")),
                    None => Ok(()),
                }
            }
        };
        match result {
            Ok(()) => acked.lock().unwrap().ops += 1,
            Err(e) if e.code() == Some(ErrorCode::LimitExceeded) => {}
            Err(e) if e.is_connection_error() => return,
            Err(e) => panic!("kmsd refused an operation on acknowledged state: {e}"),
        }
    }
}

/// Appends fsynced records to `path` on the mount; a new file counts only
/// once its directory has been fsynced too.
pub(crate) fn file_worker(path: PathBuf, acked: Shared, stop: Arc<AtomicBool>, mut rng: Rng) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let known = acked.lock().unwrap().durable.get(&name).copied();
    let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) else {
        return;
    };
    // Drop a tail the cut may have left beyond the durable length (none
    // with this harness, but a real disk may keep some).
    let mut len = known.unwrap_or(0);
    if f.set_len(len).is_err() || f.sync_all().is_err() {
        return;
    }
    if known.is_none() {
        if File::open(path.parent().unwrap()).and_then(|d| d.sync_all()).is_err() {
            return;
        }
        acked.lock().unwrap().durable.insert(name.clone(), 0);
    }
    while !stop.load(Ordering::Relaxed) {
        let rec = record(&name, len, rng.below(6000) as usize);
        if f.write_all(&rec).is_err() || f.sync_all().is_err() {
            return;
        }
        len += rec.len() as u64;
        let mut a = acked.lock().unwrap();
        a.durable.insert(name.clone(), len);
        a.ops += 1;
    }
}

/// A record whose bytes depend only on the file and its offset.
pub(crate) fn record(name: &str, offset: u64, extra: usize) -> Vec<u8> {
    let mut r = format!("{name}@{offset:012}:").into_bytes();
    r.extend((0..extra + 1).map(|i| b'a' + ((offset as usize + i) % 26) as u8));
    r.push(b'\n');
    r
}

pub(crate) fn check_file(path: &Path, durable: u64) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e} ({durable} bytes were fsynced)", path.display()));
    assert!(
        data.len() as u64 >= durable,
        "{}: {} bytes, {durable} were fsynced",
        path.display(),
        data.len()
    );
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut at = 0usize;
    while (at as u64) < durable {
        let head = format!("{name}@{at:012}:");
        assert!(
            data[at..].starts_with(head.as_bytes()),
            "{}: record at {at} damaged",
            path.display()
        );
        let end = at + data[at..].iter().position(|&b| b == b'\n').expect("record end") + 1;
        let body = &data[at + head.len()..end - 1];
        assert!(
            body.iter().enumerate().all(|(i, &b)| b == b'a' + ((at + i) % 26) as u8),
            "record at {at} altered"
        );
        at = end;
    }
}

/// The first `len` bytes of `path` read, and every whole record in them
/// is intact.
fn check_prefix(path: &Path, len: u64) {
    use std::io::Read;
    let mut data = vec![0u8; usize::try_from(len).unwrap()];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut data))
        .unwrap_or_else(|e| panic!("{}: the {len} bytes before the torn block: {e}", path.display()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut at = 0usize;
    while let Some(nl) = data[at..].iter().position(|&b| b == b'\n') {
        let head = format!("{name}@{at:012}:");
        assert!(
            data[at..].starts_with(head.as_bytes()),
            "{}: record at {at} damaged",
            path.display()
        );
        let end = at + nl + 1;
        let body = &data[at + head.len()..end - 1];
        assert!(
            body.iter().enumerate().all(|(i, &b)| b == b'a' + ((at + i) % 26) as u8),
            "record at {at} altered"
        );
        at = end;
    }
}

/// What the checks allow of a file that was being appended to at the
/// crash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crash {
    /// A kill: nothing fsynced is lost, a torn final block included
    /// (fuse/FORMAT.md, "The undo journal").
    Kill,
    /// A power cut: the block being written may read as EIO (FORMAT.md,
    /// "What a power loss can still do"), with the fsynced bytes it held.
    Power,
}

pub(crate) fn verify(d: &TestDaemon, acked: &Acked, crash: Crash) {
    let mut c = d.client();
    for (key, v) in &acked.versions {
        let info = c
            .describe_key(key)
            .unwrap_or_else(|e| panic!("acknowledged key {key} is gone after the power cut: {e}"));
        assert!(
            info.active_version >= *v,
            "{key}: version {v} was acknowledged, the store has {}",
            info.active_version
        );
    }
    for (blob, dek) in &acked.blobs {
        let plain = c
            .unwrap(blob, &Context::new())
            .unwrap_or_else(|e| panic!("an acknowledged blob does not unwrap after the power cut: {e}"));
        assert_eq!(&plain[..], &dek[..]);
    }
    for (name, &len) in &acked.durable {
        let path = d.mnt().join(name);
        match fs::read(&path) {
            Ok(_) => check_file(&path, len),
            // fuse/FORMAT.md, "What a power loss can still do": the block
            // being written (an append re-seals the final block) may read
            // as EIO, with the fsynced bytes it held. Every block before it
            // must be intact.
            Err(e) if crash == Crash::Power && e.raw_os_error() == Some(libc::EIO) => {
                let before = len - len % 4096;
                eprintln!(
                    "{name}: the block at {before} reads EIO (torn by the power cut); checking the {before} bytes before it"
                );
                check_prefix(&path, before);
            }
            Err(e) => panic!("{name}: {e} ({len} bytes were fsynced); kmsd's log:\n{}", d.logs()),
        }
    }
    let probe = d.mnt().join("probe");
    fs::write(&probe, b"mount works").unwrap();
    assert_eq!(fs::read(&probe).unwrap(), b"mount works");
}

/// Starts `pairs` client workers and as many file writers (`log0`, `log1`,
/// ... on the mount), then returns once they have acknowledged something
/// in this cycle, so that every cycle checks something.
pub(crate) fn start_workers(
    d: &TestDaemon,
    pairs: usize,
    keys: &[String],
    acked: &Shared,
    stop: &Arc<AtomicBool>,
    rng: &mut Rng,
) -> Vec<JoinHandle<()>> {
    let before = acked.lock().unwrap().ops;
    let mut workers = Vec::new();
    for w in 0..pairs {
        let (s, k, a, st, r) = (
            d.socket.clone(),
            keys.to_vec(),
            acked.clone(),
            stop.clone(),
            Rng(rng.next() | 1),
        );
        workers.push(std::thread::spawn(move || client_worker(s, k, a, st, r)));
        let (p, a, st, r) = (
            d.mnt().join(format!("log{w}")),
            acked.clone(),
            stop.clone(),
            Rng(rng.next() | 1),
        );
        workers.push(std::thread::spawn(move || file_worker(p, a, st, r)));
    }
    let busy = kms_tests::wait_for(Duration::from_secs(30), || {
        (acked.lock().unwrap().ops > before).then_some(())
    });
    assert!(busy.is_some(), "no operation acknowledged in 30 s");
    workers
}

/// The seed in environment variable `var` (to replay a run), or one from
/// the clock.
pub(crate) fn seed_from(var: &str) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    })
}
