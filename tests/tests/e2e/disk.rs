//! Full disk: the key store and a mount's backing dir on small tmpfs
//! filesystems that fill up. Rotation fails with `unavailable` and the
//! store stays readable; writes through the mount get ENOSPC and earlier
//! data stays intact; both work again once space is freed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::{fuse_available, DaemonOptions, TestDaemon};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
pub(crate) struct Tmpfs(pub(crate) PathBuf);

impl Tmpfs {
    pub(crate) fn new(parent: &Path, name: &str, size: &str) -> Self {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).unwrap();
        let opts = format!("size={size},mode=0700");
        mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .expect("mount tmpfs (root)");
        Self(dir)
    }

    /// Writes a file until the filesystem is full (these are at most a few
    /// MiB; a filesystem that takes 1 GiB without filling fails the test);
    /// returns its path.
    pub(crate) fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        let full = (0..MAX_CHUNKS).any(|_| f.write_all(&chunk).is_err());
        assert!(full, "{} did not fill up within 1 GiB", self.0.display());
        let small = [0u8; 512];
        let full = (0..MAX_CHUNKS * 128).any(|_| f.write_all(&small).is_err());
        assert!(full, "{} took another 1 GiB in small writes", self.0.display());
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// Writes of 64 KiB that fill 1 GiB: far more than any filesystem these
/// tests make can take, so a loop that reaches it has a bug.
const MAX_CHUNKS: usize = 16 * 1024;

pub(crate) fn root_or_skip() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the full-disk tests need root, and CI is set"
        );
        eprintln!("skipping: needs root to mount tmpfs");
    }
    root
}

#[test]
fn a_full_state_dir_refuses_rotation_clearly_and_recovers() {
    if !root_or_skip() {
        return;
    }
    let holder = tempfile::tempdir().unwrap();
    let small = Tmpfs::new(holder.path(), "state", "256k");
    let opts = DaemonOptions {
        env: vec![("KMSD_STATE_DIR".into(), small.0.join("kmsd").to_str().unwrap().into())],
        ..Default::default()
    };
    let d = TestDaemon::start_with(opts);
    let mut c = d.client();
    c.create_key(CreateKey {
        name: Some("k".into()),
        ..Default::default()
    })
    .unwrap();
    let blob = c.wrap("k", &[5; 32], &Context::new()).unwrap();
    let filler = small.fill();

    let err = c.rotate_key("k").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert_eq!(
        err.to_string().matches("No space left on device").count(),
        1,
        "the message names the cause, once: {err}"
    );
    let err = c
        .create_key(CreateKey {
            name: Some("k2".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable));
    // Nothing changed, and everything still reads and unwraps.
    assert_eq!(c.describe_key("k").unwrap().active_version, 1);
    assert_eq!(&c.unwrap(&blob, &Context::new()).unwrap()[..], &[5; 32]);
    assert_eq!(c.wrap("k", &[6; 32], &Context::new()).map(|b| b.len()).unwrap(), 81);

    fs::remove_file(filler).unwrap();
    assert_eq!(c.rotate_key("k").unwrap().map(|k| k.active_version), Some(2));
    c.create_key(CreateKey {
        name: Some("k2".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(&c.unwrap(&blob, &Context::new()).unwrap()[..], &[5; 32]);
}

#[test]
fn a_full_backing_dir_gives_enospc_and_keeps_earlier_data() {
    if !root_or_skip() || !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with_mount();
    // Put the backing dir on a small tmpfs: stop, mount over data/, restart.
    let mut d = d;
    assert!(d.terminate().success());
    let small = Tmpfs::new(d.dir.path(), "data", "1m");
    d.restart();
    let mnt = d.mnt();
    let early: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(mnt.join("early"), &early).unwrap();

    let mut f = fs::File::create(mnt.join("big")).unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let err = (0..MAX_CHUNKS)
        .find_map(|_| f.write_all(&chunk).and_then(|()| f.sync_all()).err())
        .expect("a 1 MiB backing filesystem took 1 GiB through the mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(fs::read(mnt.join("early")).unwrap(), early, "earlier data intact");
    assert!(fs::write(mnt.join("more"), vec![2u8; 256 * 1024]).is_err());

    fs::remove_file(mnt.join("big")).unwrap();
    let _ = fs::remove_file(mnt.join("more"));
    // The space comes back when the mount closes its last descriptor of
    // `big`: at the unlink, or at the RELEASE of `f`, which the kernel
    // sends without waiting for it (a close through FUSE returns first).
    let free = || {
        let st = nix::sys::statvfs::statvfs(&small.0).unwrap();
        st.blocks_available() * st.fragment_size()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while free() < 512 * 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(free() >= 512 * 1024, "rm freed nothing: {} bytes free", free());
    fs::write(mnt.join("after"), vec![3u8; 256 * 1024]).unwrap();
    assert_eq!(fs::read(mnt.join("after")).unwrap(), vec![3u8; 256 * 1024]);
    assert_eq!(fs::read(mnt.join("early")).unwrap(), early);
    assert!(d.terminate().success());
    drop(small);
}
