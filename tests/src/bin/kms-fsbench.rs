//! `kms-fsbench`: kmsd's encrypted filesystem next to gocryptfs (Debian
//! package `gocryptfs`) and a plain directory on the same disk, measured in
//! one run. Needs root and /dev/fuse.
//!
//! Run: `cargo run --release -p kms-tests --bin kms-fsbench [-- --size-mb N --files N]`.
//! Prints one table; the last column is kmsd / gocryptfs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kms_tests::TestDaemon;

const CHUNK: usize = 1 << 20;
const RANDOM_READS: usize = 20_000;

struct Args {
    size_mb: u64,
    files: usize,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: u64| {
        a.iter()
            .position(|x| x == name)
            .and_then(|i| a.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    Args {
        size_mb: get("--size-mb", 1024),
        files: get("--files", 10_000) as usize,
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

/// One figure per row for one filesystem.
struct Figures {
    seq_write: f64,
    seq_read: f64,
    random_read: f64,
    create: f64,
    ls: f64,
}

fn measure(dir: &Path, a: &Args) -> Figures {
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
    let seq_write = bytes as f64 / t / 1e6;
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
    let seq_read = bytes as f64 / t / 1e6;
    drop_caches();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let t = secs(|| {
        let f = File::open(&big).expect("open");
        let mut buf = [0u8; 4096];
        for _ in 0..RANDOM_READS {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let off = (rng % (bytes / 4096)) * 4096;
            f.read_exact_at(&mut buf, off).expect("pread");
        }
    });
    let random_read = RANDOM_READS as f64 / t;
    fs::remove_file(&big).expect("remove big file");
    let tree = dir.join("tree");
    let small = vec![0x42u8; 4096];
    let t = secs(|| {
        for d in 0..(a.files / 100).max(1) {
            let sub = tree.join(format!("d{d:03}"));
            fs::create_dir_all(&sub).expect("mkdir");
            for i in 0..100.min(a.files) {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(sub.join(format!("f{i:03}")))
                    .expect("create");
                f.write_all(&small).expect("write small");
            }
        }
    });
    let create = a.files as f64 / t;
    drop_caches();
    let t = secs(|| {
        let out = Command::new("ls").arg("-lR").arg(&tree).output().expect("ls -lR");
        assert!(out.status.success());
    });
    let ls = a.files as f64 / t;
    Figures {
        seq_write,
        seq_read,
        random_read,
        create,
        ls,
    }
}

/// A table row: name, unit, and the figure it shows.
type Row = (&'static str, &'static str, fn(&Figures) -> f64);

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
    let a = args();
    let daemon = TestDaemon::start_with_mount();
    let root = daemon.dir.path().to_path_buf();
    let plain_dir = root.join("plain");
    fs::create_dir_all(&plain_dir).expect("mkdir plain");
    let gocryptfs = Gocryptfs::mount(&root);
    println!(
        "kms-fsbench: {} MiB sequential file, {RANDOM_READS} random 4 KiB reads, {} small files",
        a.size_mb, a.files
    );
    println!("measuring plain directory...");
    let plain = measure(&plain_dir, &a);
    println!("measuring gocryptfs...");
    let goc = measure(&gocryptfs.mnt, &a);
    println!("measuring kmsd...");
    let kmsd = measure(&daemon.mnt(), &a);
    let rows: [Row; 5] = [
        ("sequential write", "MB/s", |f| f.seq_write),
        ("sequential read (cold)", "MB/s", |f| f.seq_read),
        ("random 4 KiB read (cold)", "ops/s", |f| f.random_read),
        ("create+write+close 4 KiB files", "files/s", |f| f.create),
        ("ls -lR (cold)", "entries/s", |f| f.ls),
    ];
    println!();
    println!("| measurement | unit | plain | gocryptfs | kmsd | kmsd/gocryptfs |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, unit, get) in rows {
        let (p, g, k) = (get(&plain), get(&goc), get(&kmsd));
        println!("| {name} | {unit} | {p:.0} | {g:.0} | {k:.0} | {:.2} |", k / g);
    }
    println!(
        "\nkmsd peak RSS: {} KiB",
        kms_tests::peak_rss_kib(daemon.pid().as_raw()).unwrap_or(0)
    );
    drop(gocryptfs);
}
