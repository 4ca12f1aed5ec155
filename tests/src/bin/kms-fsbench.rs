//! `kms-fsbench`: kmsd's encrypted filesystem next to gocryptfs (Debian
//! package `gocryptfs`) and a plain directory on the same disk, measured in
//! one run. Needs root, /dev/fuse, `fusermount` (gocryptfs mounts with
//! it) and the `sqlite3` command-line shell: on Debian,
//! `apt-get install gocryptfs fuse3 sqlite3`.
//!
//! Run: `cargo run --release -p kms-tests --bin kms-fsbench [-- --quick --names-only --plain-names --size-mb N --files N --secs N]`.
//! kmsd's mount has encrypted names (the default for a new mount), as
//! gocryptfs has by default (`--plain-names` for plain names instead).
//! `--names-only` runs only the namespace rows, `--seq-only` only the sequential write and read. `--rounds N` (1) measures
//! gocryptfs and kmsd N times each, alternating which goes first, and shows
//! the median of each; then a last column gives the lowest and highest of
//! the N per-round ratios (the noise of the machine).
//! Prints one table; the ratio column is kmsd / gocryptfs, from the same run.
//! The "better" column says which way is better: for "higher" rows the
//! target is a ratio of at least 1, for "lower" rows (latencies, times) at
//! most 1.
//!
//! Every loop stops after its count or after `--secs` seconds (20; 5 with
//! `--quick`), whichever comes first, and is checked between operations, so
//! one slow operation can overrun by itself; the notes under the table say
//! which loops stopped early and how many operations they did. Rates are
//! operations done / time taken either way. The sparse-file row runs in its
//! own thread with a deadline; a filesystem that has not finished by then is
//! shown as "> N s (stopped)" (the thread is left blocked and ends when the
//! filesystem is unmounted at the end of the run).
//!
//! Rows (per filesystem, in this order; one file of `--size-mb` MiB, 1024
//! by default, serves the first ones):
//! - sequential 1 MiB writes with one fsync at the end, then a cold
//!   sequential read;
//! - random 4 KiB reads of the cold file;
//! - small random 4 KiB reads of that file (readahead off, each block
//!   dropped from the page cache after its read) for a few seconds alone,
//!   then while another thread streams 1 MiB writes to a second file: p50
//!   and p99 latency of the reads. Every read reaches the filesystem, but
//!   for the two FUSE ones the encrypted backing file may be in the page
//!   cache (caches are dropped only before each phase). Both threads are
//!   root, so per-user scheduling is not exercised;
//! - a 1-byte write + fsync at offset 0 of the file: median latency;
//! - random 4 KiB writes with an fsync every 32 writes, aligned, over the
//!   whole file (seeded PRNG, `pwrite`);
//! - creating `--files` 4 KiB files in folders of 100, then with cold
//!   caches `ls -lR`, `stat` of every file, `find`, and opening and reading
//!   every file;
//! - SQLite (the `sqlite3` shell fed a generated script): bulk load of a
//!   ≥ 256 MiB database (16 KiB blobs, one transaction), then single-row
//!   INSERT transactions (autocommit, 20,000 at most), then single-row
//!   UPDATE transactions on random blob rows spread over the whole file;
//!   once in the default rollback-journal mode, once after
//!   `PRAGMA journal_mode=WAL`. Transactions that committed are counted in
//!   the database afterwards, so a shell stopped at the deadline is fine;
//! - a file extended by `set_len` to a large size (64 GiB, or a quarter of
//!   the free space left after the other rows if smaller), then 1 byte
//!   written 4 KiB before its end and fsync: total time.
//!
//! Free space is checked at the start (statvfs) and the run stops if the
//! other rows would not fit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kms_tests::TestDaemon;

const CHUNK: usize = 1 << 20;
const GIB: u64 = 1 << 30;
const SPARSE_MAX: u64 = 64 * GIB;
const SQLITE_BLOB: u64 = 16 << 10;

struct Args {
    quick: bool,
    /// Only the namespace rows (create, ls -lR, stat, find, open).
    names_only: bool,
    /// Only the sequential write and read rows.
    seq_only: bool,
    /// kmsd's mount with plain names (for comparison).
    plain_names: bool,
    /// gocryptfs and kmsd are each measured this many times, alternating
    /// which goes first; the table shows medians.
    rounds: usize,
    size_mb: u64,
    files: usize,
    /// Time bound of each loop.
    secs: f64,
    random_reads: usize,
    random_writes: usize,
    latency_tries: usize,
    /// How long the streaming writer (and each small-read phase) runs.
    fair_secs: f64,
    /// The streaming writer's file wraps to zero length at this size.
    stream_mb: u64,
    sqlite_db_mb: u64,
    sqlite_txns: usize,
    /// Time bound of the SQLite bulk load.
    sqlite_load_secs: f64,
    /// Deadline of the sparse-file row.
    sparse_secs: f64,
    /// Size of the sparse file; set from the free space.
    sparse_bytes: u64,
    /// Scratch folder off the measured filesystems (SQL scripts).
    scratch: PathBuf,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: f64| {
        a.iter()
            .position(|x| x == name)
            .and_then(|i| a.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let quick = a.iter().any(|x| x == "--quick");
    let q = |full: f64, small: f64| if quick { small } else { full };
    Args {
        quick,
        names_only: a.iter().any(|x| x == "--names-only"),
        seq_only: a.iter().any(|x| x == "--seq-only"),
        plain_names: a.iter().any(|x| x == "--plain-names"),
        rounds: (get("--rounds", 1.0) as usize).max(1),
        size_mb: get("--size-mb", q(1024.0, 64.0)) as u64,
        files: get("--files", q(10_000.0, 1_000.0)) as usize,
        secs: get("--secs", q(20.0, 5.0)),
        random_reads: 20_000,
        random_writes: 20_000,
        latency_tries: 20,
        fair_secs: q(5.0, 2.0),
        stream_mb: q(1024.0, 256.0) as u64,
        sqlite_db_mb: q(256.0, 32.0) as u64,
        sqlite_txns: q(20_000.0, 2_000.0) as usize,
        sqlite_load_secs: q(120.0, 30.0),
        sparse_secs: q(30.0, 10.0),
        sparse_bytes: 0,
        scratch: PathBuf::new(),
    }
}

fn drop_caches() {
    // Write back dirty pages, then drop clean caches (needs root).
    nix::unistd::sync();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn secs(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// Runs `op(i)` for i = 0, 1, ... until `max` runs or `limit` seconds have
/// passed (checked before each run; the first always runs). Returns the
/// runs done and the seconds taken.
fn bounded(max: usize, limit: f64, mut op: impl FnMut(usize)) -> (usize, f64) {
    let start = Instant::now();
    let mut n = 0;
    while n < max && (n == 0 || start.elapsed().as_secs_f64() < limit) {
        op(n);
        n += 1;
    }
    (n, start.elapsed().as_secs_f64())
}

/// xorshift64: the same sequence on every filesystem.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A 4 KiB-aligned offset in a file of `bytes`.
    fn block(&mut self, bytes: u64) -> u64 {
        (self.next() % (bytes / 4096)) * 4096
    }
}

/// One figure of one row for one filesystem.
#[derive(Clone, Debug)]
enum Fig {
    Val(f64),
    /// Did not finish: the true value is above this.
    Above(f64),
    Failed,
}

/// Figures by row key, and remarks for the notes under the table.
#[derive(Default)]
struct Results {
    figs: HashMap<&'static str, Fig>,
    notes: Vec<String>,
}

impl Results {
    fn set(&mut self, key: &'static str, v: f64) {
        self.figs.insert(key, Fig::Val(v));
    }

    fn fail(&mut self, key: &'static str, why: String) {
        self.notes.push(format!("{key}: failed: {why}"));
        self.figs.insert(key, Fig::Failed);
    }

    /// Notes when a bounded loop stopped on time rather than count.
    fn bound(&mut self, what: &str, done: usize, max: usize, t: f64) {
        if done < max {
            self.notes
                .push(format!("{what}: stopped after {t:.1} s with {done} of {max} done"));
        }
    }
}

/// p-quantile (0..=1) of sorted `v`, nearest rank.
fn quantile(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (quantile(&ms, 0.5), quantile(&ms, 0.99))
}

/// Reads 4 KiB at random offsets of `f` (`bytes` long) until `stop` or
/// `max`; returns each read's latency in ms. Readahead is off and each
/// block read is dropped from the page cache afterwards (untimed), so every
/// read reaches the filesystem.
fn small_reads(f: &File, bytes: u64, max: usize, stop: impl Fn() -> bool) -> Vec<f64> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice as Advice};
    posix_fadvise(f, 0, 0, Advice::POSIX_FADV_RANDOM).expect("fadvise");
    let mut rng = Rng::new();
    let mut buf = [0u8; 4096];
    let mut ms = Vec::new();
    while ms.len() < max && !stop() {
        let off = rng.block(bytes);
        let t = Instant::now();
        f.read_exact_at(&mut buf, off).expect("pread");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        posix_fadvise(f, off as i64, 4096, Advice::POSIX_FADV_DONTNEED).expect("fadvise");
    }
    ms
}

fn measure(label: &str, dir: &Path, a: &Args) -> Results {
    let mut r = Results::default();
    if !a.names_only {
        data_rows(&mut r, dir, a);
    }
    if a.seq_only {
        return r;
    }
    namespace_rows(&mut r, dir, a);
    if !a.names_only {
        nix::unistd::sync();
        sqlite(&mut r, dir, a);
        nix::unistd::sync();
        sparse(&mut r, dir, a);
    }
    for n in &mut r.notes {
        *n = format!("{label}, {n}");
    }
    r
}

/// The rows on one big file.
fn data_rows(r: &mut Results, dir: &Path, a: &Args) {
    let big = dir.join("big");
    let bytes = a.size_mb << 20;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let t = secs(|| {
        let mut f = File::create(&big).expect("create big file");
        for _ in 0..a.size_mb {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("fsync");
    });
    r.set("seq_write", bytes as f64 / t / 1e6);
    drop_caches();
    let t = secs(|| {
        let mut f = File::open(&big).expect("open");
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, bytes);
    });
    r.set("seq_read", bytes as f64 / t / 1e6);
    if a.seq_only {
        fs::remove_file(&big).expect("remove big file");
        return;
    }
    drop_caches();
    {
        let f = File::open(&big).expect("open");
        let mut rng = Rng::new();
        let mut buf = [0u8; 4096];
        let (n, t) = bounded(a.random_reads, a.secs, |_| {
            f.read_exact_at(&mut buf, rng.block(bytes)).expect("pread");
        });
        r.bound("random 4 KiB reads", n, a.random_reads, t);
        r.set("random_read", n as f64 / t);
    }
    fairness(r, dir, &big, bytes, a);
    // Each timed row starts with no other row's dirty data left to write.
    nix::unistd::sync();
    {
        let f = OpenOptions::new().write(true).open(&big).expect("open for write");
        let mut ms = Vec::new();
        let (n, t) = bounded(a.latency_tries, a.secs, |i| {
            let t = Instant::now();
            f.write_all_at(&[i as u8], 0).expect("pwrite");
            f.sync_all().expect("fsync");
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        });
        r.bound("1-byte write + fsync at offset 0", n, a.latency_tries, t);
        r.set("write_latency", percentiles(ms).0);
    }
    nix::unistd::sync();
    {
        let f = OpenOptions::new().write(true).open(&big).expect("open for write");
        let mut rng = Rng::new();
        let mut buf = vec![0x5au8; 4096];
        let (n, t) = bounded(a.random_writes, a.secs, |i| {
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all_at(&buf, rng.block(bytes)).expect("pwrite");
            if (i + 1) % 32 == 0 {
                f.sync_all().expect("fsync");
            }
        });
        // The writes after the last fsync (if any) count once synced.
        let t = t + secs(|| f.sync_all().expect("fsync"));
        r.bound("random 4 KiB writes", n, a.random_writes, t);
        r.set("random_write", n as f64 / t);
    }
    fs::remove_file(&big).expect("remove big file");
}

/// Small files in folders of 100: create, `ls -lR`, `stat` of each,
/// `find`, open and read each (all but the first with cold caches).
fn namespace_rows(r: &mut Results, dir: &Path, a: &Args) {
    let tree = dir.join("tree");
    let small = vec![0x42u8; 4096];
    let (files, t) = bounded(a.files, a.secs, |i| {
        let sub = tree.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&sub).expect("mkdir");
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(sub.join(format!("f{:03}", i % 100)))
            .expect("create");
        f.write_all(&small).expect("write small");
    });
    r.bound("small-file creation", files, a.files, t);
    r.set("create", files as f64 / t);
    drop_caches();
    let t = secs(|| {
        let out = Command::new("ls").arg("-lR").arg(&tree).output().expect("ls -lR");
        assert!(out.status.success());
    });
    r.set("ls", files as f64 / t);
    drop_caches();
    let (statted, t) = bounded(files, a.secs, |i| {
        let p = tree.join(format!("d{:03}", i / 100)).join(format!("f{:03}", i % 100));
        let md = fs::symlink_metadata(&p).expect("stat");
        assert_eq!(md.len(), 4096);
    });
    r.bound("stat of every file", statted, files, t);
    r.set("stat", statted as f64 / t);
    drop_caches();
    let t = secs(|| {
        let out = Command::new("find").arg(&tree).output().expect("find");
        assert!(out.status.success());
        assert!(out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() > files);
    });
    r.set("find", files as f64 / t);
    // Opening existing files with cold caches: on kmsd each open unwraps
    // the file's data key, through the socket since the mount runs in its
    // own process.
    drop_caches();
    let mut buf = Vec::with_capacity(4096);
    let (opened, t) = bounded(files, a.secs, |i| {
        let p = tree.join(format!("d{:03}", i / 100)).join(format!("f{:03}", i % 100));
        buf.clear();
        File::open(&p)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .expect("open and read");
        assert_eq!(buf.len(), 4096);
    });
    r.bound("opening existing files", opened, files, t);
    r.set("open", opened as f64 / t);
    fs::remove_dir_all(&tree).expect("remove tree");
}

/// Small reads of `big` alone, then while another thread streams writes.
fn fairness(r: &mut Results, dir: &Path, big: &Path, bytes: u64, a: &Args) {
    let max = 1_000_000;
    let f = File::open(big).expect("open");
    drop_caches();
    let start = Instant::now();
    let alone = small_reads(&f, bytes, max, || start.elapsed().as_secs_f64() >= a.fair_secs);
    let n_alone = alone.len();
    let (p50, p99) = percentiles(alone);
    r.set("read_p50_alone", p50);
    r.set("read_p99_alone", p99);
    drop_caches();
    let stream = dir.join("stream");
    let done = AtomicBool::new(false);
    let started = AtomicBool::new(false);
    let chunk = vec![0x33u8; CHUNK];
    let (ms, written, wt) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut w = File::create(&stream).expect("create stream file");
            let start = Instant::now();
            let mut written = 0u64;
            let mut in_file = 0u64;
            while start.elapsed().as_secs_f64() < a.fair_secs {
                if in_file >= a.stream_mb << 20 {
                    w.set_len(0).expect("truncate stream file");
                    w.rewind().expect("seek");
                    in_file = 0;
                }
                w.write_all(&chunk).expect("stream write");
                started.store(true, Ordering::Release);
                written += CHUNK as u64;
                in_file += CHUNK as u64;
            }
            done.store(true, Ordering::Release);
            (written, start.elapsed().as_secs_f64())
        });
        while !started.load(Ordering::Acquire) && !done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let ms = small_reads(&f, bytes, max, || done.load(Ordering::Acquire));
        let (written, wt) = writer.join().expect("writer thread");
        (ms, written, wt)
    });
    r.notes.push(format!(
        "small reads: {n_alone} alone, {} beside a writer that wrote {:.0} MB/s",
        ms.len(),
        written as f64 / wt / 1e6
    ));
    if ms.is_empty() {
        r.fail("read_p50_writer", "no read finished while the writer ran".into());
        r.fail("read_p99_writer", "no read finished while the writer ran".into());
    } else {
        let (p50, p99) = percentiles(ms);
        r.set("read_p50_writer", p50);
        r.set("read_p99_writer", p99);
    }
    fs::remove_file(&stream).expect("remove stream file");
}

/// How a `sqlite3` run ended.
enum Shell {
    Done(f64),
    Stopped(f64),
    Failed(String),
}

/// Runs the `sqlite3` shell on `db` with `sql` as its input; kills it after
/// `limit` seconds.
fn sqlite3(db: &Path, sql: &str, limit: f64, a: &Args) -> Shell {
    let script = a.scratch.join("script.sql");
    let log = a.scratch.join("sqlite3.log");
    fs::write(&script, sql).expect("write SQL script");
    let start = Instant::now();
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(db)
        .stdin(File::open(&script).expect("open SQL script"))
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("create sqlite3 log"))
        .spawn()
        .expect("run sqlite3 (is the Debian package sqlite3 installed?)");
    loop {
        if let Some(status) = child.try_wait().expect("wait for sqlite3") {
            let t = start.elapsed().as_secs_f64();
            if status.success() {
                return Shell::Done(t);
            }
            let err = fs::read_to_string(&log).unwrap_or_default();
            return Shell::Failed(format!("sqlite3 {status}: {}", err.trim()));
        }
        let t = start.elapsed().as_secs_f64();
        if t >= limit {
            // A transaction cut short is rolled back when the database is
            // next opened; only committed ones are counted.
            let _ = child.kill();
            let _ = child.wait();
            return Shell::Stopped(t);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One number from a query.
fn sqlite3_number(db: &Path, sql: &str) -> Result<u64, String> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .map_err(|e| format!("sqlite3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("{sql}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    text.trim()
        .parse()
        .map_err(|_| format!("{sql}: unexpected output {text:?}"))
}

const SQLITE_KEYS: [&str; 5] = [
    "sqlite_load",
    "sqlite_insert_delete",
    "sqlite_update_delete",
    "sqlite_insert_wal",
    "sqlite_update_wal",
];

fn sqlite(r: &mut Results, dir: &Path, a: &Args) {
    let db = dir.join("bench.db");
    if let Err(why) = sqlite_rows(r, &db, a) {
        for key in SQLITE_KEYS {
            if !r.figs.contains_key(key) {
                r.fail(key, why.clone());
            }
        }
    }
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

fn sqlite_rows(r: &mut Results, db: &Path, a: &Args) -> Result<(), String> {
    let rows = (a.sqlite_db_mb << 20) / SQLITE_BLOB;
    // A page cache larger than the database, so the load is written once,
    // in page order, at commit.
    let load = format!(
        "PRAGMA cache_size = -{cache_kib};\n\
         CREATE TABLE blobs(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, b BLOB NOT NULL);\n\
         CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, v TEXT NOT NULL);\n\
         BEGIN;\n\
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})\n\
         INSERT INTO blobs(n, b) SELECT 1000, randomblob({SQLITE_BLOB}) FROM c;\n\
         COMMIT;\n",
        cache_kib = a.sqlite_db_mb * 2048,
    );
    match sqlite3(db, &load, a.sqlite_load_secs, a) {
        Shell::Done(t) => {
            let size = fs::metadata(db).map_err(|e| e.to_string())?.len();
            r.set("sqlite_load", size as f64 / t / 1e6);
            r.notes.push(format!("SQLite database: {} MiB", size >> 20));
        }
        Shell::Stopped(t) => return Err(format!("bulk load not done after {t:.0} s")),
        Shell::Failed(e) => return Err(e),
    }
    let n = a.sqlite_txns;
    for (mode, insert_key, update_key) in [
        ("rollback journal", "sqlite_insert_delete", "sqlite_update_delete"),
        ("WAL", "sqlite_insert_wal", "sqlite_update_wal"),
    ] {
        if mode == "WAL" {
            let out = Command::new("sqlite3")
                .arg(db)
                .arg("PRAGMA journal_mode = WAL;")
                .output()
                .map_err(|e| e.to_string())?;
            if String::from_utf8_lossy(&out.stdout).trim() != "wal" {
                return Err(format!(
                    "PRAGMA journal_mode = WAL: {}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        // Autocommit: each statement is its own transaction.
        let before = sqlite3_number(db, "SELECT count(*) FROM t;")?;
        let sql: String = (0..n)
            .map(|i| format!("INSERT INTO t(n, v) VALUES (1000, '{i:0100}');\n"))
            .collect();
        let t = match sqlite3(db, &sql, a.secs, a) {
            Shell::Done(t) | Shell::Stopped(t) => t,
            Shell::Failed(e) => return Err(e),
        };
        let done = (sqlite3_number(db, "SELECT count(*) FROM t;")? - before) as usize;
        r.bound(&format!("SQLite INSERTs ({mode})"), done, n, t);
        r.set(insert_key, done as f64 / t);
        // Same-size updates of random rows all over the file.
        let sum = "SELECT sum(n) FROM blobs;";
        let before = sqlite3_number(db, sum)?;
        let mut rng = Rng::new();
        let sql: String = (0..n)
            .map(|_| format!("UPDATE blobs SET n = n + 1 WHERE id = {};\n", rng.next() % rows + 1))
            .collect();
        let t = match sqlite3(db, &sql, a.secs, a) {
            Shell::Done(t) | Shell::Stopped(t) => t,
            Shell::Failed(e) => return Err(e),
        };
        let done = (sqlite3_number(db, sum)? - before) as usize;
        r.bound(&format!("SQLite UPDATEs ({mode})"), done, n, t);
        r.set(update_key, done as f64 / t);
    }
    Ok(())
}

/// `set_len` to a large size, then 1 byte near the end and fsync, in a
/// thread with a deadline.
fn sparse(r: &mut Results, dir: &Path, a: &Args) {
    let len = a.sparse_bytes;
    if len == 0 {
        r.fail("sparse", "not enough free space".into());
        return;
    }
    let path = dir.join("sparse");
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let thread = std::thread::spawn(move || {
        let start = Instant::now();
        let res = (|| {
            let f = File::create(&p)?;
            f.set_len(len)?;
            f.write_all_at(b"x", len - 4096)?;
            f.sync_all()
        })();
        let _ = tx.send(res.map(|()| start.elapsed().as_secs_f64()));
    });
    match rx.recv_timeout(Duration::from_secs_f64(a.sparse_secs)) {
        Ok(Ok(t)) => {
            r.set("sparse", t);
            thread.join().expect("sparse thread");
            fs::remove_file(&path).expect("remove sparse file");
        }
        Ok(Err(e)) => {
            r.fail("sparse", e.to_string());
            let _ = fs::remove_file(&path);
        }
        Err(_) => {
            r.figs.insert("sparse", Fig::Above(a.sparse_secs));
            r.notes.push(format!(
                "sparse file: not done after {} s; stopped waiting (the filesystem goes on until it is unmounted)",
                a.sparse_secs
            ));
        }
    }
}

/// A table row: key into [`Results::figs`], name, unit, and whether a
/// higher figure is better.
struct Row {
    key: &'static str,
    name: String,
    unit: &'static str,
    higher: bool,
}

fn rows(a: &Args) -> Vec<Row> {
    let (mb, db, gib) = (a.size_mb, a.sqlite_db_mb, a.sparse_bytes / GIB);
    let n = a.sqlite_txns;
    let row = |key, name: String, unit, higher| Row {
        key,
        name,
        unit,
        higher,
    };
    vec![
        row(
            "seq_write",
            format!("sequential write, 1 MiB writes, {mb} MiB + fsync"),
            "MB/s",
            true,
        ),
        row("seq_read", "sequential read (cold)".into(), "MB/s", true),
        row("random_read", "random 4 KiB read (cold)".into(), "ops/s", true),
        row(
            "random_write",
            format!("random 4 KiB write, fsync every 32, {mb} MiB file"),
            "IOPS",
            true,
        ),
        row(
            "write_latency",
            format!("1-byte write + fsync at offset 0 of a {mb} MiB file, median"),
            "ms",
            false,
        ),
        row(
            "read_p50_alone",
            "4 KiB random read (uncached), p50, alone".into(),
            "ms",
            false,
        ),
        row(
            "read_p99_alone",
            "4 KiB random read (uncached), p99, alone".into(),
            "ms",
            false,
        ),
        row(
            "read_p50_writer",
            "4 KiB random read (uncached), p50, while another thread streams writes".into(),
            "ms",
            false,
        ),
        row(
            "read_p99_writer",
            "4 KiB random read (uncached), p99, while another thread streams writes".into(),
            "ms",
            false,
        ),
        row("create", "create+write+close 4 KiB files".into(), "files/s", true),
        row("ls", "ls -lR (cold)".into(), "entries/s", true),
        row("stat", "stat of every file (cold)".into(), "files/s", true),
        row("find", "find (cold)".into(), "entries/s", true),
        row(
            "open",
            "open+read+close existing 4 KiB files (cold)".into(),
            "files/s",
            true,
        ),
        row(
            "sqlite_load",
            format!("SQLite bulk load, {db} MiB of 16 KiB blobs, 1 transaction"),
            "MB/s",
            true,
        ),
        row(
            "sqlite_insert_delete",
            format!("SQLite ≤ {n} 1-row INSERT transactions, rollback journal"),
            "txn/s",
            true,
        ),
        row(
            "sqlite_update_delete",
            format!("SQLite ≤ {n} 1-row UPDATEs of random rows, rollback journal"),
            "txn/s",
            true,
        ),
        row(
            "sqlite_insert_wal",
            format!("SQLite ≤ {n} 1-row INSERT transactions, WAL"),
            "txn/s",
            true,
        ),
        row(
            "sqlite_update_wal",
            format!("SQLite ≤ {n} 1-row UPDATEs of random rows, WAL"),
            "txn/s",
            true,
        ),
        row(
            "sparse",
            format!("set_len to {gib} GiB, 1-byte write near the end, fsync"),
            "s",
            false,
        ),
    ]
}

/// The median of one row over rounds: of the values when every round has
/// one, else the first round's figure (a bound or a failure).
fn median(rounds: &[Results], key: &str) -> Option<Fig> {
    let mut vals: Vec<f64> = rounds
        .iter()
        .filter_map(|r| match r.figs.get(key) {
            Some(Fig::Val(v)) => Some(*v),
            _ => None,
        })
        .collect();
    if vals.len() < rounds.len() || vals.is_empty() {
        return rounds.first().and_then(|r| r.figs.get(key).cloned());
    }
    vals.sort_by(f64::total_cmp);
    let n = vals.len();
    Some(Fig::Val(if n % 2 == 1 {
        vals[n / 2]
    } else {
        (vals[n / 2 - 1] + vals[n / 2]) / 2.0
    }))
}

/// A figure with about three significant digits.
fn num(v: f64) -> String {
    match v.abs() {
        x if !x.is_finite() => "n/a".into(),
        x if x >= 100.0 => format!("{v:.0}"),
        x if x >= 10.0 => format!("{v:.1}"),
        x if x >= 1.0 => format!("{v:.2}"),
        x if x >= 0.01 || x == 0.0 => format!("{v:.3}"),
        _ => format!("{v:.2e}"),
    }
}

fn cell(f: Option<&Fig>) -> String {
    match f {
        Some(Fig::Val(v)) => num(*v),
        Some(Fig::Above(v)) => format!("> {} (stopped)", num(*v)),
        Some(Fig::Failed) | None => "failed".into(),
    }
}

/// kmsd / gocryptfs, with the direction of a bound when one did not finish.
fn ratio(k: Option<&Fig>, g: Option<&Fig>) -> String {
    match (k, g) {
        (Some(Fig::Val(k)), Some(Fig::Val(g))) => num(k / g),
        (Some(Fig::Above(k)), Some(Fig::Val(g))) => format!("> {}", num(k / g)),
        (Some(Fig::Val(k)), Some(Fig::Above(g))) => format!("< {}", num(k / g)),
        _ => "n/a".into(),
    }
}

/// Free bytes for unprivileged use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Stops if the rows do not fit in the free space; sizes the sparse file
/// from what is left (the same size on every filesystem).
fn check_space(a: &mut Args, root: &Path) {
    let free = free_bytes(root);
    // Each filesystem's files are removed before the next is measured; add
    // 10% for encryption overhead and 1 GiB to spare.
    let mib = a.size_mb + a.stream_mb + 2 * a.sqlite_db_mb + ((a.files as u64 * 8) >> 10);
    let need = (mib << 20) / 10 * 11 + GIB;
    if free < need {
        eprintln!(
            "kms-fsbench: {} MiB free at {}, {} MiB needed; try --quick or a smaller --size-mb",
            free >> 20,
            root.display(),
            need >> 20
        );
        std::process::exit(1);
    }
    // kmsd may write every byte of the gap; leave three quarters of the
    // rest free for everyone else on this disk.
    let len = ((free - need) / 4).min(if a.quick { GIB } else { SPARSE_MAX });
    a.sparse_bytes = len / GIB * GIB;
    println!(
        "free space: {} GiB; sparse file: {} GiB",
        free / GIB,
        a.sparse_bytes / GIB
    );
}

/// A gocryptfs mount; unmounted on drop.
struct Gocryptfs {
    mnt: PathBuf,
}

impl Gocryptfs {
    fn mount(root: &Path) -> Self {
        let (cipher, mnt) = (root.join("gocryptfs.cipher"), root.join("gocryptfs.mnt"));
        fs::create_dir_all(&cipher).expect("mkdir");
        fs::create_dir_all(&mnt).expect("mkdir");
        let pass = root.join("gocryptfs.pass");
        fs::write(&pass, "benchmark-password\n").expect("write passfile");
        let pf = format!("-passfile={}", pass.display());
        run(Command::new("gocryptfs").args(["-init", "-quiet", &pf]).arg(&cipher));
        run(Command::new("gocryptfs").args(["-quiet", &pf]).arg(&cipher).arg(&mnt));
        Self { mnt }
    }
}

impl Drop for Gocryptfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run (is the Debian package gocryptfs installed?)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let mut a = args();
    let names = if a.plain_names { "plain" } else { "encrypted" };
    let daemon = TestDaemon::start_with_mount_names(kms_tests::DaemonOptions::default(), names);
    let root = daemon.dir.path().to_path_buf();
    check_space(&mut a, &root);
    a.scratch = root.join("scratch");
    fs::create_dir_all(&a.scratch).expect("mkdir scratch");
    let plain_dir = root.join("plain");
    fs::create_dir_all(&plain_dir).expect("mkdir plain");
    let gocryptfs = Gocryptfs::mount(&root);
    println!(
        "kms-fsbench: {} MiB file, {} small files, SQLite {} MiB; loops stop after {} s{}",
        a.size_mb,
        a.files,
        a.sqlite_db_mb,
        a.secs,
        if a.quick { " (--quick)" } else { "" }
    );
    println!("measuring plain directory...");
    let plain = measure("plain", &plain_dir, &a);
    let (mut gocs, mut kmsds) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let tag = if a.rounds > 1 {
            format!(" (round {} of {})", round + 1, a.rounds)
        } else {
            String::new()
        };
        // Alternate which goes first: a warmer or a busier machine then
        // favours neither.
        for first in [round % 2 == 0, round % 2 != 0] {
            if first {
                println!("measuring gocryptfs{tag}...");
                gocs.push(measure("gocryptfs", &gocryptfs.mnt, &a));
            } else {
                println!("measuring kmsd{tag}...");
                kmsds.push(measure("kmsd", &daemon.mnt(), &a));
            }
        }
    }
    println!();
    println!("kmsd with names {names} (encrypted is the default for a new mount), gocryptfs with its defaults (names encrypted).");
    let spread = a.rounds > 1;
    if spread {
        println!(
            "Medians of {} rounds; the last column is the lowest and highest kmsd/gocryptfs of single rounds.",
            a.rounds
        );
        println!("| measurement | unit | better | plain | gocryptfs | kmsd | kmsd/gocryptfs | per round |");
        println!("|---|---|---|---:|---:|---:|---:|---:|");
    } else {
        println!("| measurement | unit | better | plain | gocryptfs | kmsd | kmsd/gocryptfs |");
        println!("|---|---|---|---:|---:|---:|---:|");
    }
    let names_rows = ["create", "ls", "stat", "find", "open"];
    let seq_rows = ["seq_write", "seq_read"];
    for row in rows(&a)
        .into_iter()
        .filter(|r| !a.names_only || names_rows.contains(&r.key))
        .filter(|r| !a.seq_only || seq_rows.contains(&r.key))
    {
        let (g, k) = (median(&gocs, row.key), median(&kmsds, row.key));
        let p = plain.figs.get(row.key);
        let mut line = format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.unit,
            if row.higher { "higher" } else { "lower" },
            cell(p),
            cell(g.as_ref()),
            cell(k.as_ref()),
            ratio(k.as_ref(), g.as_ref())
        );
        if spread {
            let per: Vec<f64> = gocs
                .iter()
                .zip(&kmsds)
                .filter_map(|(g, k)| match (g.figs.get(row.key), k.figs.get(row.key)) {
                    (Some(Fig::Val(g)), Some(Fig::Val(k))) => Some(k / g),
                    _ => None,
                })
                .collect();
            let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = per.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            line.push_str(&if per.is_empty() {
                " n/a |".to_string()
            } else {
                format!(" {}–{} |", num(lo), num(hi))
            });
        }
        println!("{line}");
    }
    println!();
    for note in plain
        .notes
        .iter()
        .chain(gocs.iter().chain(&kmsds).flat_map(|r| &r.notes))
    {
        println!("- {note}");
    }
    println!(
        "\nkmsd peak RSS: {} KiB",
        kms_tests::peak_rss_kib(daemon.pid().as_raw()).unwrap_or(0)
    );
    drop(gocryptfs);
}
