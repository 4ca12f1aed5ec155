//! Files written by the release before format version 2 (`tests/fixtures/v1`,
//! made with fixed key material) keep reading and writing.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use kms_fuse::file::EncryptedFile;
use kms_fuse::MemoryKeySource;

fn keys() -> MemoryKeySource {
    let id = uuid::Uuid::from_u128(0x6b6d_7364_0000_4000_8000_0000_0000_0001);
    MemoryKeySource::from_versions(id, &[[0x11; 32], [0x22; 32]])
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn expected(name: &str) -> Vec<u8> {
    match name {
        "empty" => Vec::new(),
        "small" => b"hello v1".to_vec(),
        "multi" => pattern(10_000),
        "exact" => pattern(8192),
        "holey" => {
            let mut v = vec![0u8; 20_000];
            v.extend_from_slice(b"after a hole");
            v
        }
        other => panic!("unknown fixture {other}"),
    }
}

const NAMES: [&str; 5] = ["empty", "small", "multi", "exact", "holey"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

/// A writable copy of one fixture.
fn copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::copy(fixture_dir().join(name), &path).unwrap();
    (dir, path)
}

fn open(path: &Path, keys: &MemoryKeySource) -> EncryptedFile {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    EncryptedFile::open(file, keys).unwrap()
}

#[test]
fn v1_fixtures_read_as_written() {
    let keys = keys();
    for name in NAMES {
        let (_d, path) = copy(name);
        let f = open(&path, &keys);
        assert_eq!(f.size(), expected(name).len() as u64, "{name}");
        assert_eq!(f.read(0, u32::MAX).unwrap(), expected(name), "{name}");
    }
}

#[test]
fn v1_fixtures_take_writes_truncates_and_reopen() {
    let keys = keys();
    for name in NAMES {
        let (_d, path) = copy(name);
        let mut model = expected(name);
        {
            let f = open(&path, &keys);
            f.write(3, b"xyz").unwrap();
            if model.len() < 6 {
                model.resize(6, 0);
            }
            model[3..6].copy_from_slice(b"xyz");
            f.write(30_000, b"tail").unwrap();
            model.resize(30_000, 0);
            model.extend_from_slice(b"tail");
            f.truncate(25_000).unwrap();
            model.truncate(25_000);
            f.sync(false).unwrap();
            assert_eq!(f.read(0, u32::MAX).unwrap(), model, "{name}");
        }
        assert_eq!(open(&path, &keys).read(0, u32::MAX).unwrap(), model, "{name} reopened");
    }
}

/// Issue rule "nonce budget" for version 1 files (12-byte random nonces):
/// seals are counted in the header, reserved ahead of use, and past the
/// limit (lowered here from 2^31) a write is refused with EIO and changes
/// nothing; the count survives a reopen, so a restart does not reset it.
/// Version 2 files (24-byte nonces) are not counted.
#[test]
fn a_v1_file_counts_its_seals_and_stops_at_its_limit() {
    let keys = keys();
    let (_d, path) = copy("multi");
    let limit = 40;
    let f = open(&path, &keys).with_seal_limit(limit);
    assert_eq!(f.seals_made(), 0, "a fixture of an earlier release starts at 0");
    let mut last = expected("multi");
    let mut writes = 0;
    let refused = loop {
        let block = vec![writes as u8; 4096];
        match f.write(0, &block) {
            Ok(()) => {
                last[..4096].copy_from_slice(&block);
                writes += 1;
            }
            Err(e) => break e,
        }
        assert!(writes < 100, "never refused");
    };
    assert_eq!(refused.errno(), libc::EIO, "{refused}");
    assert!(matches!(refused, kms_fuse::Error::SealBudget { .. }), "{refused:?}");
    assert!(f.seals_made() <= limit, "{} seals made, limit {limit}", f.seals_made());
    assert!(writes >= 15, "only {writes} writes before the limit");
    assert_eq!(f.read(0, u32::MAX).unwrap(), last, "the refused write changed nothing");
    let made = f.seals_made();
    drop(f);
    // The header holds at least the seals made.
    let header = std::fs::read(&path).unwrap();
    let mut on_disk = [0u8; 8];
    on_disk[2..].copy_from_slice(&header[26..32]);
    assert!(u64::from_be_bytes(on_disk) >= made);
    let f = open(&path, &keys).with_seal_limit(limit);
    assert!(f.seals_made() >= made, "the count survives a reopen");
    assert!(f.write(0, b"x").is_err(), "still refused after a reopen");
    assert_eq!(f.read(0, u32::MAX).unwrap(), last);
    // A truncate seals too, and is refused as well.
    assert!(f.truncate(5).is_err());
    assert_eq!(f.size(), last.len() as u64);
}

/// Version 2 files are not counted: their nonces leave no practical bound.
#[test]
fn v2_files_have_no_seal_limit() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let f = EncryptedFile::create(file, &keys).unwrap().with_seal_limit(1);
    for i in 0..20u8 {
        f.write(0, &[i; 4096]).unwrap();
    }
    assert_eq!(f.seals_made(), 0);
}

/// Issue rule "nonce budget": a version 1 file of an earlier release moves
/// to a fresh DEK in place (threshold lowered to 4 seals), in steps taken
/// by its writes. A reopen in the middle continues the change, `fs rewrap`
/// refuses the file meanwhile (its older slot holds the previous DEK) and
/// re-wraps it afterwards, holes stay sparse, and at the end the file
/// reads whole under the new DEK alone.
#[test]
fn a_v1_fixture_moves_to_a_fresh_dek_across_a_reopen_and_rewrap_waits() {
    use std::os::unix::fs::MetadataExt;
    let keys = std::sync::Arc::new(keys());
    let (dir, path) = copy("holey");
    let mut model = expected("holey");
    // Key changes rewrite blocks in place: only with the undo journal.
    let root = nix::fcntl::openat(
        nix::fcntl::AT_FDCWD,
        dir.path(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let open = || {
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let journal = kms_fuse::journal::Journal::open(&root, dir.path()).unwrap().unwrap();
        EncryptedFile::open_journaled(file, keys.as_ref(), Some(std::sync::Arc::new(journal)))
            .unwrap()
            .with_key_changes(keys.clone())
            .with_rekey_at(4)
    };
    let f = open();
    let tail = pattern(60 * 4096);
    f.write(1 << 20, &tail).unwrap();
    model.resize(1 << 20, 0);
    model.extend_from_slice(&tail);
    assert!(f.key_change_in_progress(), "62 seals: past the threshold");
    let active = kms_fuse::KeySource::active_version(keys.as_ref()).unwrap();
    let rewrap = || {
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        kms_fuse::admin::rewrap_file(&file, &path, keys.as_ref(), active)
    };
    let refused = rewrap().unwrap_err();
    assert_eq!(refused.errno(), libc::EBUSY, "{refused}");
    drop(f);
    let f = open();
    assert!(f.key_change_in_progress(), "the change goes on after a reopen");
    assert_eq!(f.read(0, u32::MAX).unwrap(), model);
    let mut writes = 0;
    while f.key_change_in_progress() {
        f.write(5, b"v").unwrap();
        model[5] = b'v';
        writes += 1;
        assert!(writes < 40, "the change never ends");
    }
    assert_eq!(f.read(0, u32::MAX).unwrap(), model);
    drop(f);
    assert!(
        std::fs::metadata(&path).unwrap().blocks() * 512 < 512 * 1024,
        "the 1 MiB hole stayed sparse"
    );
    rewrap().unwrap();
    let file = OpenOptions::new().read(true).open(&path).unwrap();
    let alone = EncryptedFile::open(file, keys.as_ref()).unwrap();
    assert!(!alone.key_change_in_progress());
    assert_eq!(alone.read(0, u32::MAX).unwrap(), model, "every block under the new DEK");
}
