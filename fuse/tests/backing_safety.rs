//! Root-safe access to the backing directory (issue 10, item 7): whoever
//! can write into the backing directory can plant symlinks and FIFOs and
//! swap names, and the admin walks and the namespace operations, which run
//! as root, must neither follow nor open them, and must give only what
//! they created to the caller.
//!
//! Real files, symlinks, FIFOs and renames; opens of the outside targets
//! are watched with inotify (`IN_OPEN`). Opening with `O_PATH` does not
//! generate `IN_OPEN`; any other open does.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kms_fuse::admin;
use kms_fuse::file::EncryptedFile;
use kms_fuse::fs::{Caller, EncryptedFs};
use kms_fuse::inode::ROOT;
use kms_fuse::MemoryKeySource;
use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};
use nix::sys::stat::Mode;

/// An inotify instance (nix's `inotify` feature is not enabled here).
struct Inotify(OwnedFd);

impl Inotify {
    fn new() -> Self {
        // SAFETY: inotify_init1 takes only flags and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", Errno::last());
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn watch(&self, path: &Path, mask: u32) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated string that outlives the call, and
        // the descriptor is an inotify instance.
        let wd = unsafe { libc::inotify_add_watch(self.0.as_raw_fd(), c.as_ptr(), mask) };
        assert!(wd >= 0, "inotify_add_watch {}: {}", path.display(), Errno::last());
    }

    /// `(mask, name)` of every event queued so far.
    fn events(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match nix::unistd::read(&self.0, &mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return out,
                Err(e) => panic!("read inotify: {e}"),
            };
            let mut at = 0;
            while at + 16 <= n {
                let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
                let (mask, len) = (word(4), word(12) as usize);
                let name = &buf[at + 16..at + 16 + len];
                let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
                out.push((mask, name));
                at += 16 + len;
            }
        }
    }
}

fn make(path: &Path, keys: &MemoryKeySource, data: &[u8]) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    EncryptedFile::create(file, keys).unwrap().write(0, data).unwrap();
}

/// A root-only (0700) directory outside the backing directory holding
/// `n` encrypted files of the current key version.
fn outside_dir(keys: &MemoryKeySource, n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    for i in 0..n {
        make(&dir.path().join(format!("secret{i}")), keys, b"outside");
    }
    dir
}

/// Every file's bytes under `dir` (one level).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.symlink_metadata().unwrap().is_file())
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Runs `f` on another thread and fails (instead of hanging, e.g. on a
/// FIFO opened for reading) if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("walk blocked (opened a FIFO?)")
}

fn opens(events: &[(u32, String)]) -> Vec<&(u32, String)> {
    events.iter().filter(|(m, _)| m & libc::IN_OPEN != 0).collect()
}

#[test]
fn symlink_to_root_only_dir_is_neither_counted_nor_opened() {
    let keys = Arc::new(MemoryKeySource::default());
    let outside = outside_dir(&keys, 5);
    let backing = tempfile::tempdir().unwrap();
    make(&backing.path().join("a"), &keys, b"inside");
    symlink(outside.path(), backing.path().join("link")).unwrap();
    symlink(outside.path().join("secret0"), backing.path().join("file-link")).unwrap();
    fs::create_dir(backing.path().join("sub")).unwrap();
    symlink(outside.path(), backing.path().join("sub/deeper-link")).unwrap();
    keys.rotate();
    let before = snapshot(outside.path());
    let watch = Inotify::new();
    watch.watch(outside.path(), libc::IN_OPEN | libc::IN_ACCESS | libc::IN_MODIFY);

    let v = admin::versions(backing.path(), keys.as_ref()).unwrap();
    assert_eq!((v.counts.clone(), v.unreadable), (vec![(1, 1)], 0), "{v:?}");
    let info = admin::rewrap(backing.path(), keys.as_ref(), |_, _| {}).unwrap();
    assert_eq!((info.rewrapped, info.already_current, info.failed), (1, 0, 0));
    let v = admin::versions(backing.path(), keys.as_ref()).unwrap();
    assert_eq!((v.counts, v.unreadable), (vec![(2, 1)], 0));

    assert_eq!(watch.events(), vec![], "the outside directory was opened or read");
    assert_eq!(snapshot(outside.path()), before, "outside files were modified");
}

#[test]
fn fifos_are_neither_counted_nor_opened() {
    let keys = Arc::new(MemoryKeySource::default());
    let outside = tempfile::tempdir().unwrap();
    let outside_fifo = outside.path().join("fifo");
    nix::unistd::mkfifo(&outside_fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let backing = tempfile::tempdir().unwrap();
    make(&backing.path().join("a"), &keys, b"inside");
    let inside_fifo = backing.path().join("fifo");
    nix::unistd::mkfifo(&inside_fifo, Mode::from_bits_truncate(0o666)).unwrap();
    symlink(&outside_fifo, backing.path().join("fifo-link")).unwrap();
    keys.rotate();
    let watch = Inotify::new();
    watch.watch(&outside_fifo, libc::IN_OPEN);
    watch.watch(&inside_fifo, libc::IN_OPEN);

    let (root, k) = (backing.path().to_path_buf(), keys.clone());
    let (v, info) = within(60, move || {
        let v = admin::versions(&root, k.as_ref()).unwrap();
        let info = admin::rewrap(&root, k.as_ref(), |_, _| {}).unwrap();
        (v, info)
    });
    assert_eq!((v.counts, v.unreadable), (vec![(1, 1)], 0));
    assert_eq!((info.rewrapped, info.already_current, info.failed), (1, 0, 0));
    assert_eq!(
        opens(&watch.events()),
        Vec::<&(u32, String)>::new(),
        "a FIFO was opened"
    );
}

#[test]
fn directory_swapped_for_a_symlink_during_walks_is_not_followed() {
    let keys = Arc::new(MemoryKeySource::default());
    let outside = outside_dir(&keys, 8);
    let backing = tempfile::tempdir().unwrap();
    make(&backing.path().join("a"), &keys, b"top");
    fs::create_dir(backing.path().join("sub")).unwrap();
    make(&backing.path().join("sub/b"), &keys, b"below");
    symlink(outside.path(), backing.path().join("alt")).unwrap();
    keys.rotate();
    let before = snapshot(outside.path());
    let watch = Inotify::new();
    watch.watch(outside.path(), libc::IN_OPEN | libc::IN_MODIFY);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, dir) = (stop.clone(), swaps.clone(), backing.path().to_path_buf());
        std::thread::spawn(move || {
            let dir = File::open(dir).unwrap();
            while !stop.load(Ordering::Relaxed) {
                // Fails only once the test has failed and removed the dir.
                if renameat2(&dir, "sub", &dir, "alt", RenameFlags::RENAME_EXCHANGE).is_err() {
                    break;
                }
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let start = Instant::now();
    let (mut runs, mut missed_b) = (0, 0);
    while runs < 200 && start.elapsed() < Duration::from_secs(10) {
        runs += 1;
        let v = admin::versions(backing.path(), keys.as_ref()).unwrap();
        let counted: u64 = v.counts.iter().map(|(_, n)| n).sum::<u64>() + v.unreadable;
        assert!(counted <= 2, "run {runs}: counted files outside the backing dir: {v:?}");
        missed_b += u64::from(counted < 2);
        let info = admin::rewrap(backing.path(), keys.as_ref(), |_, _| {}).unwrap();
        let touched = info.rewrapped + info.already_current + info.failed;
        assert!(
            touched <= 2,
            "run {runs}: rewrap went outside the backing dir: {info:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    println!(
        "{runs} runs, {} swaps, {missed_b} walks missed sub/b (saw only the symlink)",
        swaps.load(Ordering::Relaxed)
    );
    assert!(swaps.load(Ordering::Relaxed) > 0);
    assert_eq!(
        opens(&watch.events()),
        Vec::<&(u32, String)>::new(),
        "outside dir opened"
    );
    assert_eq!(snapshot(outside.path()), before, "outside files were modified");
}

const USER: Caller = Caller { uid: 1234, gid: 1234 };

fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    let m = path.symlink_metadata().unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn created_nodes_belong_to_a_non_root_caller_with_exact_modes() {
    let backing = tempfile::tempdir().unwrap();
    let keys = Arc::new(MemoryKeySource::default());
    let fs = EncryptedFs::new(backing.path(), keys).unwrap();
    let p = |name: &str| backing.path().join(name);

    let (attr, fh) = fs.create(USER, ROOT, OsStr::new("f"), 0o4751).unwrap();
    fs.release(fh);
    assert_eq!((attr.uid, attr.gid, attr.perm), (1234, 1234, 0o4751));
    assert_eq!(owner_and_mode(&p("f")), (1234, 1234, 0o4751));

    let attr = fs.mkdir(USER, ROOT, OsStr::new("d"), 0o750).unwrap();
    assert_eq!((attr.uid, attr.gid, attr.perm), (1234, 1234, 0o750));
    assert_eq!(owner_and_mode(&p("d")), (1234, 1234, 0o750));

    let attr = fs.mknod(USER, ROOT, OsStr::new("p"), libc::S_IFIFO | 0o620, 0).unwrap();
    assert_eq!((attr.uid, attr.gid, attr.perm), (1234, 1234, 0o620));
    assert!(p("p").symlink_metadata().unwrap().file_type().is_fifo());

    let attr = fs
        .mknod(USER, ROOT, OsStr::new("s"), libc::S_IFSOCK | 0o640, 0)
        .unwrap();
    assert_eq!(owner_and_mode(&p("s")), (1234, 1234, 0o640));
    assert_eq!(attr.uid, 1234);

    let attr = fs.mknod(USER, ROOT, OsStr::new("r"), libc::S_IFREG | 0o604, 0).unwrap();
    assert_eq!(owner_and_mode(&p("r")), (1234, 1234, 0o604));
    assert_eq!(attr.perm, 0o604);

    let attr = fs.symlink(USER, ROOT, OsStr::new("l"), Path::new("f")).unwrap();
    assert_eq!((attr.uid, attr.gid), (1234, 1234));
    let m = p("l").symlink_metadata().unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 1234));
    assert_eq!(fs::read_link(p("l")).unwrap(), Path::new("f"));

    // Under a set-group-ID directory the group is inherited, and a new
    // directory keeps the set-group-ID bit.
    fs::create_dir(p("shared")).unwrap();
    nix::unistd::chown(&p("shared"), None, Some(nix::unistd::Gid::from_raw(4321))).unwrap();
    fs::set_permissions(p("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    let shared = fs.lookup(ROOT, OsStr::new("shared")).unwrap().ino.0;
    let (_, fh) = fs.create(USER, shared, OsStr::new("f"), 0o640).unwrap();
    fs.release(fh);
    assert_eq!(owner_and_mode(&p("shared/f")), (1234, 4321, 0o640));
    fs.mkdir(USER, shared, OsStr::new("d"), 0o770).unwrap();
    assert_eq!(owner_and_mode(&p("shared/d")), (1234, 4321, 0o2770));
}

/// What one race round creates, and the root-owned node planted to be
/// swapped in for it.
#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Mkdir,
    Mknod,
    Symlink,
}

fn plant(dir: &Path, op: Op) -> PathBuf {
    let bait = dir.join("bait");
    match op {
        // A plain root-owned file: create gives away only the descriptor it
        // created, whatever the name then holds.
        Op::Create => fs::write(&bait, b"root's").unwrap(),
        Op::Mkdir => {
            fs::create_dir(&bait).unwrap();
            fs::write(bait.join("inside"), b"root's").unwrap();
            fs::set_permissions(&bait, fs::Permissions::from_mode(0o700)).unwrap();
        }
        Op::Mknod => {
            nix::unistd::mkfifo(&bait, Mode::from_bits_truncate(0o600)).unwrap();
            fs::hard_link(&bait, dir.join("bait-link")).unwrap();
        }
        Op::Symlink => symlink("/etc/shadow", &bait).unwrap(),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    bait
}

/// While one thread keeps exchanging the new name with a root-owned node
/// planted next to it, create/mkdir/mknod/symlink for uid 1234 either
/// give 1234 what they made or fail; the planted node stays root's.
#[test]
fn a_node_swapped_in_after_creation_is_never_given_away() {
    let start = Instant::now();
    for op in [Op::Create, Op::Mkdir, Op::Mknod, Op::Symlink] {
        let backing = tempfile::tempdir().unwrap();
        let dir = backing.path();
        let bait = plant(dir, op);
        let bait_meta = bait.symlink_metadata().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::new(dir, keys).unwrap();
        let (mut rounds, mut refused, mut swapped) = (0, 0, 0);
        while rounds < 300 && start.elapsed() < Duration::from_secs(20) {
            rounds += 1;
            let (stop, ready) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            let swapper = {
                let (stop, ready, dir) = (stop.clone(), ready.clone(), dir.to_path_buf());
                std::thread::spawn(move || {
                    let dir = File::open(dir).unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += u64::from(renameat2(&dir, "new", &dir, "bait", RenameFlags::RENAME_EXCHANGE).is_ok());
                        ready.store(true, Ordering::Relaxed);
                    }
                    n
                })
            };
            // Start creating only once the swapper is running.
            while !ready.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
            let name = OsStr::new("new");
            let result = match op {
                Op::Create => fs.create(USER, ROOT, name, 0o644).map(|(a, fh)| {
                    fs.release(fh);
                    a
                }),
                Op::Mkdir => fs.mkdir(USER, ROOT, name, 0o755),
                Op::Mknod => fs.mknod(USER, ROOT, name, libc::S_IFIFO | 0o644, 0),
                Op::Symlink => fs.symlink(USER, ROOT, name, Path::new("target")),
            };
            stop.store(true, Ordering::Relaxed);
            swapped += swapper.join().unwrap();
            match &result {
                Ok(attr) => assert_eq!((attr.uid, attr.gid), (1234, 1234)),
                Err(e) => {
                    assert_eq!(e.errno(), libc::EIO, "{op:?}: {e}");
                    refused += 1;
                }
            }
            // Put the bait back under its name and remove what was made.
            let (b, n) = (dir.join("bait"), dir.join("new"));
            if n.symlink_metadata().is_ok_and(|m| m.ino() == bait_meta.ino()) {
                fs::rename(&n, &b).unwrap_or_else(|_| panic!("{op:?}"));
            }
            let bm = b.symlink_metadata().unwrap();
            assert_eq!(bm.ino(), bait_meta.ino());
            assert_eq!(
                (bm.uid(), bm.gid(), bm.mode()),
                (0, 0, bait_meta.mode()),
                "{op:?} round {rounds}: the planted node was given away"
            );
            match n.symlink_metadata() {
                Ok(m) if m.is_dir() => fs::remove_dir(&n).unwrap(),
                Ok(_) => fs::remove_file(&n).unwrap(),
                Err(_) => {}
            }
            if let Ok(attr) = result {
                fs.forget(attr.ino.0, 1);
            }
        }
        println!("{op:?}: {rounds} rounds, {swapped} swaps, {refused} refused as swapped");
    }
}
