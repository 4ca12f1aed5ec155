//! A growing write that fails part way (ENOSPC, EDQUOT, EFBIG from the
//! backing filesystem). Simulated with `RLIMIT_FSIZE`, which is
//! process-wide: keep this the only test in this binary.

use std::fs::OpenOptions;

use kms_fuse::file::EncryptedFile;
use kms_fuse::format::BLOCK_SIZE;
use kms_fuse::MemoryKeySource;

/// FINDING: `EncryptedFile::settle` cuts the backing file back to its old
/// length after a failed growth, on the premise (its doc comment, and
/// FORMAT.md "A failed growth ... the old blocks were not touched") that
/// the old final block is only re-sealed last. When the write itself
/// covers the old final block (it starts at or before the old end), that
/// block was already re-sealed as a full inner block in the first
/// `pwrite`; the cut leaves a prefix of it in the final position, which
/// fails its tag. Result: an ordinary EFBIG/ENOSPC (no crash) makes the
/// bytes of the old final block read EIO for good, and no later growth of
/// the file works (each reads the final block first). Fails today.
#[test]
fn a_growing_write_that_fails_part_way_keeps_the_old_final_block() {
    // SAFETY: ignoring SIGXFSZ so the over-limit pwrite returns EFBIG.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let keys = MemoryKeySource::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let f = EncryptedFile::create(backing, &keys).unwrap();
    f.write(0, b"fsynced bytes").unwrap();
    f.sync(true).unwrap();

    // The backing filesystem has room for block 0 and 100 bytes more.
    let limit = f.layout().block_offset(1) + 100;
    let mut saved = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut saved), 0);
        let lowered = libc::rlimit {
            rlim_cur: limit,
            rlim_max: saved.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lowered), 0);
    }
    // Starts inside the old final block (block 0) and grows to block 3.
    let result = f.write(5, &vec![b'x'; 3 * BLOCK_SIZE]);
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &saved), 0) };
    assert_eq!(
        result.as_ref().map_err(kms_fuse::Error::errno).err(),
        Some(libc::EFBIG),
        "{result:?}"
    );

    assert_eq!(f.size(), 13, "a failed write leaves the size");
    let live = f.read(0, 64);
    let reopened = EncryptedFile::open(OpenOptions::new().read(true).write(true).open(&path).unwrap(), &keys).unwrap();
    let after = reopened.read(0, 64);
    let grow = reopened.truncate(10_000);
    assert!(
        matches!(&live, Ok(b) if b == b"fsynced bytes") && matches!(&after, Ok(b) if b == b"fsynced bytes"),
        "old final block after a failed growth: live {live:?}, reopened {after:?}, later growth {grow:?}"
    );
}
