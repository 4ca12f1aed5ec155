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
    EncryptedFile::open(file, path.to_path_buf(), keys).unwrap()
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
