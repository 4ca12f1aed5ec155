//! Crash loop: cycles of start kmsd (with a mount), concurrent clients doing
//! wrap/unwrap/rotate/re-encrypt and fsynced file appends, SIGKILL at a
//! random moment, restart, and check that nothing acknowledged was lost:
//! every blob a client was handed unwraps to its DEK, every version a
//! client was told about exists, every fsynced byte is there, and the mount
//! works.
//!
//! `KMS_CRASH_CYCLES` (default 3) sets the number of cycles and
//! `KMS_CRASH_SEED` replays a run; the seed is printed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::{fuse_available, TestDaemon};

/// A small deterministic generator (xorshift64*), so a seed replays a run.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Everything clients were told, shared by the workers.
#[derive(Default)]
struct Acked {
    /// (blob, dek) for every blob handed out.
    blobs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Highest version each key was reported at.
    versions: HashMap<String, u32>,
    /// Durable length of each log file.
    durable: HashMap<String, u64>,
    ops: u64,
}

type Shared = Arc<Mutex<Acked>>;

fn client_worker(socket: std::path::PathBuf, keys: Vec<String>, acked: Shared, stop: Arc<AtomicBool>, mut rng: Rng) {
    let Ok(mut c) = BlockingClient::connect(&socket) else {
        return;
    };
    let ctx = Context::new();
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[rng.below(keys.len() as u64) as usize];
        let result = match rng.below(10) {
            0 => c.rotate_key(key).map(|k| {
                if let Some(k) = k {
                    acked.lock().unwrap().versions.insert(key.clone(), k.active_version);
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
            // The daemon died: this cycle is over.
            Err(e) if e.is_connection_error() => return,
            // Any answer but success (decrypt-failed on an acknowledged
            // blob above all) is a bug, not the end of a cycle.
            Err(e) => panic!("kmsd refused an operation on acknowledged state: {e}"),
        }
    }
}

fn file_worker(path: std::path::PathBuf, acked: Shared, stop: Arc<AtomicBool>, mut rng: Rng) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    // Like an application recovering its log: drop the unacknowledged tail
    // a crash may have left (it was never fsynced), then append.
    let mut len = acked.lock().unwrap().durable.get(&name).copied().unwrap_or(0);
    let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) else {
        return;
    };
    if f.set_len(len).is_err() {
        return;
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

/// A record whose bytes depend only on the file and its offset, so the
/// expected content of any prefix can be recomputed.
fn record(name: &str, offset: u64, extra: usize) -> Vec<u8> {
    let mut r = format!("{name}@{offset:012}:").into_bytes();
    r.extend((0..extra + 1).map(|i| b'a' + ((offset as usize + i) % 26) as u8));
    r.push(b'\n');
    r
}

fn check_file(path: &std::path::Path, durable: u64) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        data.len() as u64 >= durable,
        "{}: {} bytes, {durable} were fsynced",
        path.display(),
        data.len()
    );
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    // Walk the records: each starts with "name@offset:" at that offset.
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

fn verify(d: &TestDaemon, acked: &Acked) {
    let mut c = d.client();
    for (blob, dek) in &acked.blobs {
        assert_eq!(
            &c.unwrap(blob, &Context::new()).expect("an acknowledged blob unwraps")[..],
            &dek[..]
        );
    }
    for (key, v) in &acked.versions {
        let info = c.describe_key(key).unwrap();
        assert!(
            info.active_version >= *v,
            "{key}: version {v} was reported, store has {}",
            info.active_version
        );
    }
    for (name, &len) in &acked.durable {
        check_file(&d.mnt().join(name), len);
    }
    let probe = d.mnt().join("probe");
    fs::write(&probe, b"mount works").unwrap();
    assert_eq!(fs::read(&probe).unwrap(), b"mount works");
}

#[test]
fn crash_loop_loses_nothing_acknowledged() {
    if !fuse_available() {
        return;
    }
    let cycles: u64 = std::env::var("KMS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("KMS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash loop: {cycles} cycles, seed {seed} (replay with KMS_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start_with_mount();
    let mut keys = Vec::new();
    let acked: Shared = Arc::default();
    for cycle in 0..cycles {
        // Fresh keys now and then, since each allows only 10 manual rotations.
        if cycle % 4 == 0 {
            let mut c = d.client();
            for i in 0..3 {
                let name = format!("crash-{cycle}-{i}");
                c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                })
                .unwrap();
                keys.push(name);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (s, k, a, st, r) = (
                d.socket.clone(),
                keys.clone(),
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
        // Kill only once this cycle has acknowledged something, so every
        // cycle checks something.
        let before = acked.lock().unwrap().ops;
        let busy = kms_tests::wait_for(Duration::from_secs(30), || {
            (acked.lock().unwrap().ops > before).then_some(())
        });
        assert!(busy.is_some(), "cycle {cycle}: no operation acknowledged in 30 s");
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("a worker saw wrong data");
        }
        d.restart();
        verify(&d, &acked.lock().unwrap());
    }
    let a = acked.lock().unwrap();
    assert!(
        !a.blobs.is_empty() && !a.durable.is_empty(),
        "the loop acknowledged no blob or no fsynced write"
    );
    println!(
        "crash loop: {cycles} cycles, {} acknowledged operations, {} blobs and {} files verified, 0 lost",
        a.ops,
        a.blobs.len(),
        a.durable.len()
    );
    let _ = File::open(d.mnt());
}
