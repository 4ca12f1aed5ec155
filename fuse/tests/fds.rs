//! The mount's descriptors stay bounded by its descriptor cache however many
//! files users create (issue 10, item 8). A real FUSE mount of a backing
//! tempdir with `MemoryKeySource`; needs root and /dev/fuse. Without them
//! the test prints why and passes, unless `CI` is set, where it fails.
//!
//! Its own test binary: it counts the descriptors of the whole process, so
//! no other mount may run beside it.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_fuse::{mount, MemoryKeySource, MountOptions};

const CACHE: usize = 64;
const THREADS: usize = 4;
const FILES_PER_THREAD: usize = 5_000;
/// Descriptors beyond the cache: /dev/fuse and its per-thread clones, the
/// root (`O_PATH` and `mount_fd`), requests in flight (four per thread with
/// encrypted names), the sampler's own read of /proc/self/fd. Files closed
/// by their user whose RELEASE (sent by the kernel without waiting) the
/// mount has not handled yet also hold descriptors; nothing bounds how many
/// the kernel queues, but here the mount handles them about as fast as the
/// users close, and the peak stays well inside this margin (85-91 of 106
/// in 11 runs).
const MARGIN: usize = 36;

fn fuse_unusable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/fuse: {e}")),
    }
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Counts this process's descriptors every few milliseconds until dropped;
/// the highest count seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(open_fds(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

fn file(top: &Path, t: usize, i: usize) -> PathBuf {
    top.join(format!("d{t}/sub/f{i}"))
}

fn contents(t: usize, i: usize) -> Vec<u8> {
    format!("file {t}/{i}").into_bytes()
}

/// Runs `f(t, i)` for every file, one thread per `t`.
fn each_file(f: impl Fn(usize, usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let f = &f;
            s.spawn(move || (0..FILES_PER_THREAD).for_each(|i| f(t, i)));
        }
    });
}

#[test]
fn twenty_thousand_files_hold_no_more_descriptors_than_the_cache() {
    if let Some(why) = fuse_unusable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but FUSE is unusable: {why}"
        );
        eprintln!("skipping mount test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let baseline = open_fds();
    let opts = MountOptions {
        threads: THREADS,
        fd_cache: CACHE,
        ..MountOptions::default()
    };
    let handle = mount(&backing, &mnt, Arc::new(MemoryKeySource::default()), &opts).unwrap();
    let bound = baseline + CACHE + MARGIN;
    let top = mnt.join("top");
    for t in 0..THREADS {
        fs::create_dir_all(top.join(format!("d{t}/sub"))).unwrap();
    }

    let sampler = Sampler::start();
    let start = Instant::now();
    each_file(|t, i| fs::write(file(&top, t, i), contents(t, i)).unwrap());
    let created = start.elapsed();
    let after_create = open_fds();
    let start = Instant::now();
    each_file(|t, i| {
        assert_eq!(
            fs::metadata(file(&top, t, i)).unwrap().len(),
            contents(t, i).len() as u64
        )
    });
    let stated = start.elapsed();
    let start = Instant::now();
    each_file(|t, i| assert_eq!(fs::read(file(&top, t, i)).unwrap(), contents(t, i)));
    let read = start.elapsed();
    let peak = sampler.peak();
    println!(
        "{} files: created in {created:?}, stated in {stated:?}, read back in {read:?}; \
         descriptors: {baseline} before mounting, {after_create} after creating, peak {peak}, bound {bound}",
        THREADS * FILES_PER_THREAD
    );
    assert!(after_create < bound, "{after_create} descriptors after creating");
    assert!(peak < bound, "peak of {peak} descriptors");

    // A hard link to an inode whose descriptor was long evicted.
    let first = file(&top, 0, 0);
    let link = top.join("link");
    fs::hard_link(&first, &link).unwrap();
    let (a, b) = (fs::metadata(&first).unwrap(), fs::metadata(&link).unwrap());
    assert_eq!((a.ino(), a.nlink(), b.nlink()), (b.ino(), 2, 2));
    assert_eq!(fs::read(&link).unwrap(), contents(0, 0));

    // Renaming the directories above known inodes: they reopen by handle.
    fs::rename(&top, mnt.join("moved")).unwrap();
    fs::rename(mnt.join("moved/d1/sub"), mnt.join("moved/d1/sub2")).unwrap();
    let moved = mnt.join("moved");
    for i in [0, 1, FILES_PER_THREAD - 1] {
        assert_eq!(fs::read(moved.join(format!("d1/sub2/f{i}"))).unwrap(), contents(1, i));
        assert_eq!(fs::read(file(&moved, 2, i)).unwrap(), contents(2, i));
    }
    let mut f = OpenOptions::new().append(true).open(moved.join("d1/sub2/f7")).unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    assert_eq!(
        fs::read(moved.join("d1/sub2/f7")).unwrap(),
        [contents(1, 7), b"+".to_vec()].concat()
    );

    // An unlinked open file keeps working after its inode's descriptor
    // would have left the cache many times over.
    let victim = file(&moved, 3, 3);
    let mut f = OpenOptions::new().read(true).write(true).open(&victim).unwrap();
    fs::remove_file(&victim).unwrap();
    each_file(|t, i| {
        if t != 3 || i != 3 {
            fs::metadata(file(&moved, t, i)).ok();
        }
    });
    // Past the attribute TTL (1 s), so fstat reaches the filesystem.
    std::thread::sleep(Duration::from_millis(1_100));
    f.write_all_at(b"!", 100).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!((meta.len(), meta.nlink()), (101, 0));
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(&back[..contents(3, 3).len()], contents(3, 3));
    assert_eq!(back[100], b'!');
    drop(f);
    assert!(open_fds() < bound);

    handle.unmount().unwrap();
    let after = open_fds();
    assert!(
        after <= baseline + 1,
        "{after} descriptors after unmounting, {baseline} before mounting"
    );
}
