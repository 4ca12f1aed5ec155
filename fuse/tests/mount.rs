//! Real-FUSE tests: mount a backing tempdir with `MemoryKeySource` and
//! drive it through the kernel. They need root and /dev/fuse; without them
//! they print why and pass, unless `CI` is set, where they fail.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kms_fuse::format::{DISK_BLOCK_SIZE, HEADER_LEN};
use kms_fuse::{admin, mount, MemoryKeySource, MountHandle, MountOptions, NameMode};

struct Fixture {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    keys: Arc<MemoryKeySource>,
    handle: Option<MountHandle>,
    opts: MountOptions,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn remount(&mut self) {
        self.handle.take().unwrap().unmount().unwrap();
        self.handle = Some(mount(&self.backing, &self.mnt, self.keys.clone(), &self.opts).unwrap());
    }
}

/// Plain names: the tests of file contents edit backing files by name.
fn opts() -> MountOptions {
    MountOptions {
        threads: 4,
        // Tiny, so that every test also exercises eviction and reopening
        // inodes by file handle.
        fd_cache: 2,
        names: NameMode::Plain,
        ..MountOptions::default()
    }
}

fn fuse_unusable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/fuse: {e}")),
    }
}

/// A mounted fixture, or `None` (test skipped) when FUSE cannot be used
/// and `CI` is unset.
fn fixture() -> Option<Fixture> {
    fixture_with(opts())
}

/// A mounted fixture with encrypted names.
fn fixture_names() -> Option<Fixture> {
    fixture_with(MountOptions {
        names: NameMode::Encrypted,
        ..opts()
    })
}

fn fixture_with(opts: MountOptions) -> Option<Fixture> {
    if let Some(why) = fuse_unusable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but FUSE is unusable: {why}"
        );
        eprintln!("skipping mount test: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let keys = Arc::new(MemoryKeySource::default());
    let handle = mount(&backing, &mnt, keys.clone(), &opts).unwrap();
    Some(Fixture {
        _dir: dir,
        backing,
        mnt,
        keys,
        handle: Some(handle),
        opts,
    })
}

fn eio<T>(r: &std::io::Result<T>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

/// Small deterministic generator (xorshift64*), so a printed seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Names of the differential test, in two directories ("d", "e") and the
/// root: short ones, 255-byte unicode ones (the long-name form) and one of
/// 176 bytes (the first long one). Any of them may become a directory.
fn names() -> Vec<String> {
    let long_a = "é".repeat(127) + "a"; // 255 bytes
    let long_b = "ü".repeat(127) + "b";
    let mid = "m".repeat(176);
    let mut v: Vec<String> = ["a", "b", "c", "d/x", "d/y", "d/z", "e/x"].map(String::from).to_vec();
    v.extend([
        long_a.clone(),
        format!("d/{long_b}"),
        format!("e/{mid}"),
        format!("e/{long_a}"),
    ]);
    v
}

/// One random operation applied identically under both roots.
fn step(rng: &mut Rng, roots: [&Path; 2]) -> String {
    let all = names();
    let name = all[rng.below(all.len() as u64) as usize].as_str();
    let other = all[rng.below(all.len() as u64) as usize].as_str();
    let op = rng.below(16);
    let off = rng.below(40_000);
    let len = rng.below(9_000) as usize;
    let data = rng.bytes(len);
    let mode = 0o600 | (rng.below(8) as u32) << 3;
    let size = rng.below(30_000);
    let desc = format!("op {op} {name} {other} off {off} len {len} mode {mode:o} size {size}");
    let mut outcomes = Vec::new();
    for root in roots {
        let (p, q) = (root.join(name), root.join(other));
        let outcome: std::io::Result<Vec<u8>> = match op {
            0..=2 => write_at(&p, off, &data).map(|()| Vec::new()),
            3 => OpenOptions::new()
                .append(true)
                .create(true)
                .open(&p)
                .and_then(|mut f| f.write_all(&data))
                .map(|()| Vec::new()),
            4 => OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(size))
                .map(|()| Vec::new()),
            5 => fs::rename(&p, &q).map(|()| Vec::new()),
            6 => fs::hard_link(&p, &q).map(|()| Vec::new()),
            7 => fs::remove_file(&p).map(|()| Vec::new()),
            8 => fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map(|()| Vec::new()),
            9 => OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.sync_all())
                .map(|()| Vec::new()),
            10 => File::create(&p).map(|_| Vec::new()),
            11 => reopen_rw(&p, off, &data),
            12 => fs::create_dir(&p).map(|()| Vec::new()),
            13 => fs::remove_dir(&p).map(|()| Vec::new()),
            14 => std::os::unix::fs::symlink(other, &p).map(|()| Vec::new()),
            _ => fs::read_dir(&p).map(|d| {
                let mut v: Vec<_> = d.map(|e| e.unwrap().file_name().into_encoded_bytes()).collect();
                v.sort();
                v.concat()
            }),
        };
        outcomes.push(outcome.map_err(|e| e.raw_os_error()));
    }
    assert_eq!(outcomes[0], outcomes[1], "mount vs plain directory: {desc}");
    desc
}

fn write_at(p: &Path, off: u64, data: &[u8]) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(p)?;
    f.write_all_at(data, off)
}

/// Open, write, close, open again read-write, read back a range: the
/// bytes read, for the caller to compare.
fn reopen_rw(p: &Path, off: u64, data: &[u8]) -> std::io::Result<Vec<u8>> {
    write_at(p, off, data)?;
    let mut f = OpenOptions::new().read(true).write(true).open(p)?;
    f.seek(SeekFrom::Start(off / 2))?;
    let mut buf = Vec::new();
    f.take(data.len() as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A file made before the rotation and only ever written, so the run always
/// has a version-1 file whose cached DEK keeps working after rotation.
const KEEP: &str = "keep";

fn sorted_listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    v.sort();
    v
}

fn compare(roots: [&Path; 2], ctx: &str) {
    for dir in ["", "d", "e"] {
        let (m, p) = (roots[0].join(dir), roots[1].join(dir));
        if p.is_dir() {
            assert_eq!(sorted_listing(&m), sorted_listing(&p), "listing of {dir:?} {ctx}");
        }
    }
    for name in names().iter().map(String::as_str).chain([KEEP]) {
        let (m, p) = (roots[0].join(name), roots[1].join(name));
        let (mm, pm) = (fs::symlink_metadata(&m), fs::symlink_metadata(&p));
        match (&mm, &pm) {
            (Ok(mm), Ok(pm)) => {
                assert_eq!(mm.mode(), pm.mode(), "mode of {name} {ctx}");
                assert_eq!(mm.nlink(), pm.nlink(), "nlink of {name} {ctx}");
                if pm.is_dir() {
                    assert_eq!(sorted_listing(&m), sorted_listing(&p), "listing of {name} {ctx}");
                    continue;
                }
                assert_eq!(mm.len(), pm.len(), "size of {name} {ctx}");
                if pm.file_type().is_symlink() {
                    assert_eq!(fs::read_link(&m).unwrap(), fs::read_link(&p).unwrap(), "{name} {ctx}");
                    continue;
                }
                let (a, b) = (fs::read(&m).unwrap(), fs::read(&p).unwrap());
                assert!(a == b, "contents of {name} differ {ctx}");
            }
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{name} {ctx}"),
            _ => panic!("{name}: mount {mm:?} vs plain {pm:?} {ctx}"),
        }
    }
}

#[test]
fn differential_random_ops_with_rotation_and_rewrap() {
    let Some(mut fx) = fixture_names() else { return };
    let seed = std::env::var("KMS_FUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    let ops: u64 = std::env::var("KMS_FUSE_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!("differential seed {seed} (replay with KMS_FUSE_SEED={seed}), {ops} ops");
    let plain_dir = tempfile::tempdir().unwrap();
    let mnt = fx.mnt.clone();
    let roots = [mnt.as_path(), plain_dir.path()];
    for root in roots {
        fs::create_dir(root.join("d")).unwrap();
        fs::create_dir(root.join("e")).unwrap();
    }
    let mut rng = Rng(seed | 1);
    let keep = [
        File::create(roots[0].join(KEEP)).unwrap(),
        File::create(roots[1].join(KEEP)).unwrap(),
    ];
    let start = Instant::now();
    for i in 0..ops {
        if i == ops / 2 {
            assert_eq!(fx.keys.rotate(), 2);
        }
        if i % 10 == 0 {
            let (off, data) = (rng.below(20_000), rng.bytes(500));
            keep.iter().for_each(|f| f.write_all_at(&data, off).unwrap());
        }
        let desc = step(&mut rng, roots);
        compare(roots, &format!("after step {i} ({desc}), seed {seed}"));
    }
    println!("{ops} ops in {:?}", start.elapsed());
    let v = admin::versions(&fx.backing, fx.keys.as_ref()).unwrap();
    println!("versions before rewrap: {:?}", v.counts);
    assert_eq!(v.unreadable, 0);
    assert!(v.counts.iter().any(|(ver, _)| *ver == 1), "{:?}", v.counts);
    drop(keep);
    let info = admin::rewrap(&fx.backing, fx.keys.as_ref(), |_, _| {}).unwrap();
    assert_eq!(info.failed, 0);
    let v = admin::versions(&fx.backing, fx.keys.as_ref()).unwrap();
    assert!(v.counts.iter().all(|(ver, _)| *ver == 2), "{:?}", v.counts);
    // The name key was re-wrapped too (same key: no name changes).
    let root_file = fs::read(fx.backing.join(kms_fuse::names::ROOT_FILE)).unwrap();
    let header = kms_fuse::format::Header::decode(&root_file).unwrap();
    let blob = &header.current().unwrap().1.blob;
    assert_eq!(kms_client::blob::BlobHeader::parse(blob).unwrap().version, 2);
    compare(roots, "after rewrap");
    fx.remount();
    compare(roots, "after rewrap and remount");
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn unlinked_open_file_stays_readable_until_closed() {
    let Some(fx) = fixture() else { return };
    let p = fx.path("f");
    fs::write(&p, vec![9u8; 10_000]).unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    f.write_all_at(b"more", 10_000).unwrap();
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 10_004);
    assert_eq!(&back[10_000..], b"more");
    assert_eq!(f.metadata().unwrap().len(), 10_004);
}

fn renameat2(from: &Path, to: &Path, flags: nix::fcntl::RenameFlags) -> nix::Result<()> {
    nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, from, nix::fcntl::AT_FDCWD, to, flags)
}

#[test]
fn rename_noreplace_and_exchange() {
    let Some(fx) = fixture() else { return };
    let (a, b) = (fx.path("a"), fx.path("b"));
    fs::write(&a, b"alpha").unwrap();
    fs::write(&b, b"beta").unwrap();
    let noreplace = nix::fcntl::RenameFlags::RENAME_NOREPLACE;
    assert_eq!(renameat2(&a, &b, noreplace), Err(nix::Error::EEXIST));
    renameat2(&a, &b, nix::fcntl::RenameFlags::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"beta");
    assert_eq!(fs::read(&b).unwrap(), b"alpha");
    renameat2(&a, &fx.path("c"), noreplace).unwrap();
    assert_eq!(fs::read(fx.path("c")).unwrap(), b"beta");
}

#[test]
fn concurrent_writers_of_different_files_and_one_file() {
    let Some(fx) = fixture() else { return };
    let shared = fx.path("shared");
    File::create(&shared).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let own = fx.path(&format!("own{t}"));
            let shared = shared.clone();
            std::thread::spawn(move || {
                let f = File::create(&own).unwrap();
                let s = OpenOptions::new().write(true).open(&shared).unwrap();
                for round in 0..50u64 {
                    let chunk = vec![t + 1; 3000];
                    f.write_all_at(&chunk, round * 3000).unwrap();
                    // Interleaved, unaligned 1000-byte stripes: neighbours
                    // share blocks, so lost updates would show.
                    s.write_all_at(&[t + 1; 1000], (round * 4 + u64::from(t)) * 1000)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4u8 {
        assert_eq!(fs::read(fx.path(&format!("own{t}"))).unwrap(), vec![t + 1; 150_000]);
    }
    let data = fs::read(&shared).unwrap();
    assert_eq!(data.len(), 200_000);
    for (i, stripe) in data.chunks(1000).enumerate() {
        assert!(stripe.iter().all(|&b| b == (i % 4) as u8 + 1), "stripe {i}");
    }
}

/// Writes a file through the mount, unmounts, lets `damage` edit the
/// backing file, remounts, and expects EIO on read.
fn expect_tamper(name: &str, data: &[u8], damage: impl FnOnce(&Fixture, &Path)) {
    let Some(mut fx) = fixture() else { return };
    fs::write(fx.path(name), data).unwrap();
    fs::write(fx.path("other"), data).unwrap();
    fx.handle.take().unwrap().unmount().unwrap();
    damage(&fx, &fx.backing.join(name));
    fx.handle = Some(mount(&fx.backing, &fx.mnt, fx.keys.clone(), &opts()).unwrap());
    let r = fs::read(fx.path(name));
    assert!(eio(&r), "{name}: expected EIO, got {r:?}");
    assert_eq!(fs::read(fx.path("other")).unwrap(), data, "untouched file");
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(path).unwrap();
    f(&mut bytes);
    fs::write(path, bytes).unwrap();
}

#[test]
fn tamper_flipped_byte_reads_eio() {
    expect_tamper("flip", &[5u8; 10_000], |_, p| {
        edit(p, |b| b[HEADER_LEN + DISK_BLOCK_SIZE + 100] ^= 1)
    });
}

#[test]
fn tamper_block_moved_within_file_reads_eio() {
    expect_tamper("swap", &[6u8; 3 * 4096 + 1], |_, p| {
        edit(p, |b| {
            let (x, y) = b[HEADER_LEN..].split_at_mut(DISK_BLOCK_SIZE);
            x.swap_with_slice(&mut y[..DISK_BLOCK_SIZE]);
        })
    });
}

#[test]
fn tamper_block_from_other_file_reads_eio() {
    expect_tamper("moved", &[7u8; 2 * 4096 + 1], |fx, p| {
        let other = fs::read(fx.backing.join("other")).unwrap();
        edit(p, |b| {
            let r = HEADER_LEN..HEADER_LEN + DISK_BLOCK_SIZE;
            b[r.clone()].copy_from_slice(&other[r]);
        })
    });
}

#[test]
fn tamper_header_copied_reads_eio() {
    expect_tamper("hdr", &[8u8; 5000], |fx, p| {
        let other = fs::read(fx.backing.join("other")).unwrap();
        edit(p, |b| b[..HEADER_LEN].copy_from_slice(&other[..HEADER_LEN]))
    });
}

#[test]
fn tamper_truncation_at_block_boundary_reads_eio() {
    expect_tamper("cut", &[9u8; 3 * 4096], |_, p| {
        edit(p, |b| b.truncate(HEADER_LEN + 2 * DISK_BLOCK_SIZE))
    });
}

#[test]
fn tamper_truncation_to_bare_header_reads_eio() {
    expect_tamper("bare", b"short", |_, p| edit(p, |b| b.truncate(HEADER_LEN)));
}

#[test]
fn rotation_old_files_readable_new_files_new_version() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.path("old"), b"v1 data").unwrap();
    fx.keys.rotate();
    fs::write(fx.path("new"), b"v2 data").unwrap();
    let v = admin::versions(&fx.backing, fx.keys.as_ref()).unwrap();
    assert_eq!(v.counts, vec![(1, 1), (2, 1)]);
    // Rewrap while a file is open: the open handle keeps working.
    let f = OpenOptions::new().read(true).write(true).open(fx.path("old")).unwrap();
    let info = admin::rewrap(&fx.backing, fx.keys.as_ref(), |_, _| {}).unwrap();
    assert_eq!((info.rewrapped, info.already_current), (1, 1));
    f.write_all_at(b"!", 7).unwrap();
    drop(f);
    assert_eq!(fs::read(fx.path("old")).unwrap(), b"v1 data!");
    assert_eq!(fs::read(fx.path("new")).unwrap(), b"v2 data");
}

#[test]
fn namespace_ops_symlink_fifo_xattr_statfs() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.path("dir")).unwrap();
    fs::write(fx.path("dir/f"), b"x").unwrap();
    std::os::unix::fs::symlink("dir/f", fx.path("ln")).unwrap();
    assert_eq!(fs::read_link(fx.path("ln")).unwrap(), Path::new("dir/f"));
    assert_eq!(fs::read(fx.path("ln")).unwrap(), b"x");
    nix::unistd::mkfifo(&fx.path("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    assert!(fs::symlink_metadata(fx.path("fifo"))
        .unwrap()
        .file_type()
        .is_fifo_like());
    let mut names: Vec<_> = fs::read_dir(&fx.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["dir", "fifo", "ln"]);
    assert_eq!(
        fs::remove_dir(fx.path("dir")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(fx.path("dir/f")).unwrap();
    fs::remove_dir(fx.path("dir")).unwrap();
    let stat = nix::sys::statvfs::statvfs(&fx.mnt).unwrap();
    assert!(stat.blocks() > 0);
    fs::write(fx.path("x"), b"").unwrap();
    // The backing directory is a tempdir on the CI machine's disk, which
    // has user xattrs: they must work through the mount.
    xattr_set(&fx.path("x"), "user.k", b"v").expect("user xattrs through the mount");
    assert_eq!(
        xattr_set(&fx.path("x"), "trusted.k", b"v").unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a pointer/length pair for `value`.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn modes_decide_access_for_other_users() {
    let Some(fx) = fixture() else { return };
    let private = fx.path("private");
    let public = fx.path("public");
    fs::write(&private, b"secret").unwrap();
    fs::write(&public, b"for all").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&fx.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    // A child that drops to uid 65534 (setpriv, util-linux, is required):
    // refused the 0600 root file by mode bits, and, as a positive control,
    // given the 0644 one.
    let cat_as_nobody = |p: &Path| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(p)
            .output()
            .expect("setpriv (util-linux) is needed to act as another user");
        (out.status.success(), out.stdout)
    };
    assert_eq!(cat_as_nobody(&public), (true, b"for all".to_vec()));
    assert!(!cat_as_nobody(&private).0, "uid 65534 read a 0600 root file");
}

#[test]
fn extension_is_sparse_and_a_one_byte_write_rewrites_one_block() {
    let Some(fx) = fixture() else { return };
    let p = fx.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    f.sync_all().unwrap();
    let backing = fx.backing.join("sparse");
    let meta = fs::metadata(&backing).unwrap();
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "64 MiB extension is sparse: {} blocks",
        meta.blocks()
    );
    let before = fs::read(&backing).unwrap();
    f.write_all_at(b"x", 0).unwrap();
    f.sync_all().unwrap();
    let after = fs::read(&backing).unwrap();
    assert_eq!(before.len(), after.len());
    let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
    let block0 = HEADER_LEN..HEADER_LEN + DISK_BLOCK_SIZE;
    assert!(
        !changed.is_empty() && changed.iter().all(|i| block0.contains(i)),
        "only block 0 changes"
    );
    let mut head = [0u8; 3];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"x\0\0");
    let mut tail = [0u8; 4];
    f.read_exact_at(&mut tail, (64 << 20) - 4).unwrap();
    assert_eq!(&tail, b"tail");

    // Any user with write access may ask for an absurd size: it is a
    // sparse file or EFBIG at once, and the file is unharmed.
    let huge = 999_999_999_999_999u64;
    match f.set_len(huge) {
        Ok(()) => assert_eq!(fs::metadata(&p).unwrap().len(), huge),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}"),
    }
    f.set_len(999_999_999_999).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 999_999_999_999);
    assert!(fs::metadata(&backing).unwrap().blocks() * 512 < 1 << 20);
    f.read_exact_at(&mut tail, (64 << 20) - 4).unwrap();
    assert_eq!(&tail, b"tail");
}

#[test]
fn files_of_format_version_1_stat_read_and_write_through_the_mount() {
    if fixture().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    for name in ["small", "multi", "holey"] {
        fs::copy(fixtures.join(name), backing.join(name)).unwrap();
    }
    let id = uuid::Uuid::from_u128(0x6b6d_7364_0000_4000_8000_0000_0000_0001);
    let keys = Arc::new(MemoryKeySource::from_versions(id, &[[0x11; 32], [0x22; 32]]));
    let handle = mount(&backing, &mnt, keys, &opts()).unwrap();
    assert_eq!(fs::metadata(mnt.join("small")).unwrap().len(), 8);
    assert_eq!(fs::metadata(mnt.join("multi")).unwrap().len(), 10_000);
    assert_eq!(fs::metadata(mnt.join("holey")).unwrap().len(), 20_012);
    assert_eq!(fs::read(mnt.join("small")).unwrap(), b"hello v1");
    write_at(&mnt.join("small"), 100_000, b"grown").unwrap();
    handle.unmount().unwrap();
    let keys = Arc::new(MemoryKeySource::from_versions(id, &[[0x11; 32], [0x22; 32]]));
    let handle = mount(&backing, &mnt, keys, &opts()).unwrap();
    let data = fs::read(mnt.join("small")).unwrap();
    assert_eq!(
        (data.len(), &data[..8], &data[100_000..]),
        (100_005, &b"hello v1"[..], &b"grown"[..])
    );
    handle.unmount().unwrap();
}

#[test]
fn fsync_of_a_directory_reaches_the_backing_directory() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.path("d")).unwrap();
    fs::write(fx.path("d/f"), b"x").unwrap();
    let fsyncs = || {
        let s = fx.handle.as_ref().unwrap().stats().snapshot();
        s.ops.iter().find(|(op, _)| *op == "fsync").map_or(0, |(_, n)| *n)
    };
    let before = fsyncs();
    for dir in [fx.mnt.clone(), fx.path("d")] {
        File::open(&dir).unwrap().sync_all().unwrap();
        File::open(&dir).unwrap().sync_data().unwrap();
    }
    // Each reached the filesystem (and so the backing directory's fsync);
    // what it makes durable is for a power-loss test to show.
    assert_eq!(fsyncs() - before, 4);
}

#[test]
fn a_mount_unmounted_from_outside_says_it_no_longer_serves() {
    let Some(mut fx) = fixture() else { return };
    fs::write(fx.path("f"), b"x").unwrap();
    assert!(fx.handle.as_ref().unwrap().is_serving());
    nix::mount::umount2(&fx.mnt, nix::mount::MntFlags::empty()).unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while fx.handle.as_ref().unwrap().is_serving() {
        assert!(Instant::now() < deadline, "still serving 10 s after umount");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Dropping the handle of a mount that is gone is quiet and harmless.
    fx.handle.take().unwrap().unmount().unwrap();
}
