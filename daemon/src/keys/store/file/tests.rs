//! The file store: its files, its checks at open, the migration of a
//! schema-1 store (the committed fixture) with a crash at every step, and
//! the conformance suite.

use std::os::unix::fs::PermissionsExt;

use kms_client::proto::KeyKind;

use super::*;
use crate::keys::model::RotationSchedule;
use crate::keys::store::conformance::Harness;
use crate::keys::store::schema::{self, v1, META_MAGIC};

fn root(b: u8) -> RootKey {
    RootKey::from_bytes(&[b; 32])
}

fn record() -> KeyRecord {
    KeyRecord::new(
        Uuid::new_v4(),
        KeyKind::Customer,
        "z",
        RotationSchedule::every(365, 0),
        0,
    )
}

fn open(dir: &Path) -> FileStore {
    FileStore::open(dir, root(1)).unwrap()
}

fn records(store: &FileStore) -> Vec<KeyRecord> {
    store.load().unwrap().into_iter().map(|s| s.record).collect()
}

#[test]
fn put_then_reopen_round_trips() {
    let dir = crate::testutil::private_dir().unwrap();
    let rec = record();
    {
        let store = open(dir.path());
        assert!(records(&store).is_empty());
        store.put(&rec, None).unwrap();
    }
    assert_eq!(records(&open(dir.path())), vec![rec]);
}

#[test]
fn wrong_root_key_is_refused_even_when_empty() {
    let dir = crate::testutil::private_dir().unwrap();
    drop(open(dir.path()));
    let err = FileStore::open(dir.path(), root(2)).unwrap_err();
    assert!(matches!(err, StoreError::WrongRootKey { .. }), "{err}");
}

#[test]
fn corrupt_key_file_is_named_at_open() {
    let dir = crate::testutil::private_dir().unwrap();
    let rec = record();
    open(dir.path()).put(&rec, None).unwrap();
    let path = dir.path().join("keys").join(format!("{}.key", rec.id));
    let mut data = fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 1;
    fs::write(&path, &data).unwrap();
    let err = FileStore::open(dir.path(), root(1)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path),
        "{err}"
    );
}

#[test]
fn key_file_renamed_to_another_id_is_corrupt() {
    let dir = crate::testutil::private_dir().unwrap();
    let rec = record();
    open(dir.path()).put(&rec, None).unwrap();
    let keys = dir.path().join("keys");
    fs::rename(
        keys.join(format!("{}.key", rec.id)),
        keys.join(format!("{}.key", Uuid::new_v4())),
    )
    .unwrap();
    assert!(matches!(
        FileStore::open(dir.path(), root(1)),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn missing_meta_with_keys_is_corrupt_not_empty() {
    let dir = crate::testutil::private_dir().unwrap();
    open(dir.path()).put(&record(), None).unwrap();
    fs::remove_file(dir.path().join("store.meta")).unwrap();
    assert!(matches!(
        FileStore::open(dir.path(), root(1)),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn leftover_tmp_files_are_removed() {
    let dir = crate::testutil::private_dir().unwrap();
    drop(open(dir.path()));
    let tmp = dir.path().join("keys").join(".x.key.tmp");
    fs::write(&tmp, b"partial").unwrap();
    drop(open(dir.path()));
    assert!(!tmp.exists());
}

#[test]
fn second_open_is_locked_out() {
    let dir = crate::testutil::private_dir().unwrap();
    let _first = open(dir.path());
    assert!(matches!(
        FileStore::open(dir.path(), root(1)),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn a_state_dir_or_key_open_to_others_is_refused_with_the_fix() {
    let dir = crate::testutil::private_dir().unwrap();
    let state = dir.path().join("state");
    drop(open(&state));
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
    let err = FileStore::open(&state, root(1)).unwrap_err().to_string();
    assert!(err.contains("mode 0755") && err.contains("chmod 700"), "{err}");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    drop(open(&state));
    let key = dir.path().join("root-key");
    RootKey::create(&key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = RootKey::load(&key).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let err = FileStore::open(&state, root(1)).unwrap_err().to_string();
    assert!(err.contains("owned by uid 65534") && err.contains("chown"), "{err}");
}

#[test]
fn files_have_tight_modes() {
    let dir = crate::testutil::private_dir().unwrap();
    let state = dir.path().join("state");
    let store = open(&state);
    let rec = record();
    store.put(&rec, None).unwrap();
    assert_eq!(super::super::mode_of(&state.join("keys")).unwrap(), 0o700);
    assert_eq!(super::super::mode_of(&store.key_path(rec.id)).unwrap(), 0o600);
}

#[test]
fn root_key_file_create_and_load() {
    use super::super::mode_of;
    let dir = crate::testutil::private_dir().unwrap();
    let path = dir.path().join("root-key");
    RootKey::create(&path).unwrap();
    assert_eq!(mode_of(&path).unwrap(), 0o600);
    assert_eq!(fs::read(&path).unwrap().len(), 32);
    RootKey::load(&path).unwrap();
    assert!(RootKey::create(&path).is_err(), "never overwrites a root key");
    let hex = dir.path().join("hex");
    fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
    fs::set_permissions(&hex, fs::Permissions::from_mode(0o600)).unwrap();
    RootKey::load(&hex).unwrap();
    fs::write(&hex, "short").unwrap();
    assert!(matches!(RootKey::load(&hex), Err(StoreError::BadRootKey { .. })));
}

#[test]
fn material_is_not_stored_in_clear() {
    let dir = crate::testutil::private_dir().unwrap();
    let rec = record();
    let store = open(dir.path());
    store.put(&rec, None).unwrap();
    let data = fs::read(store.key_path(rec.id)).unwrap();
    let m = rec.active().material.expose();
    assert!(!data.windows(32).any(|w| w == m));
}

// ---- schema and migration ---------------------------------------------------

/// The schema named by `dir/store.meta` (opened with the fixture's or the
/// tests' root key).
fn meta_schema(dir: &Path) -> u32 {
    let data = fs::read(dir.join("store.meta")).unwrap();
    if data.starts_with(v1::META_MAGIC) {
        return 1;
    }
    assert!(data.starts_with(META_MAGIC));
    // Only an open can read the number; a store that opened is current.
    CURRENT
}

fn key_file_schemas(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir(dir.join("keys"))
        .unwrap()
        .map(|e| schema::schema_of(&fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn a_new_store_is_at_the_current_schema() {
    let dir = crate::testutil::private_dir().unwrap();
    open(dir.path()).put(&record(), None).unwrap();
    assert_eq!(meta_schema(dir.path()), CURRENT);
    assert_eq!(key_file_schemas(dir.path()), vec![CURRENT]);
}

#[test]
fn a_store_of_a_newer_schema_is_refused_untouched() {
    let dir = crate::testutil::private_dir().unwrap();
    let rec = record();
    let store = open(dir.path());
    store.put(&rec, None).unwrap();
    let plain = [schema::META_CHECK, &(CURRENT + 1).to_be_bytes()].concat();
    let sealed = store.root.seal(META_MAGIC, b"", &plain);
    drop(store);
    fs::write(dir.path().join("store.meta"), &sealed).unwrap();
    let err = FileStore::open(dir.path(), root(1)).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported: CURRENT, .. } if found == CURRENT + 1),
        "{err}"
    );
    assert!(err.to_string().contains("run a newer kmsd"), "{err}");
    assert_eq!(fs::read(dir.path().join("store.meta")).unwrap(), sealed);
}

#[test]
fn a_record_of_another_schema_than_the_store_is_corrupt() {
    let (_work, state, root_key) = fixture_copy();
    let v1_file = fs::read_dir(state.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let v1_bytes = fs::read(&v1_file).unwrap();
    drop(FileStore::open(&state, RootKey::from_bytes(&root_key)).unwrap());
    fs::write(&v1_file, v1_bytes).unwrap();
    let err = FileStore::open(&state, RootKey::from_bytes(&root_key)).unwrap_err();
    assert!(
        err.to_string().contains("a schema 1 record in a schema 2 store"),
        "{err}"
    );
}

/// A private copy of the committed schema-1 store: (work dir, state dir,
/// root key).
fn fixture_copy() -> (tempfile::TempDir, PathBuf, [u8; 32]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let work = crate::testutil::private_dir().unwrap();
    let state = work.path().join("state");
    fs::create_dir_all(state.join("keys")).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(state.join("keys"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::copy(src.join("state/store.meta"), state.join("store.meta")).unwrap();
    for e in fs::read_dir(src.join("state/keys")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), state.join("keys").join(e.file_name())).unwrap();
    }
    let root_key: [u8; 32] = fs::read(src.join("root-key")).unwrap().try_into().unwrap();
    (work, state, root_key)
}

fn sorted(mut v: Vec<Stored>) -> Vec<Stored> {
    v.sort_by_key(|s| s.record.id);
    v
}

#[test]
fn the_schema_1_fixture_migrates_once_and_keeps_every_record() {
    let (_work, state, key) = fixture_copy();
    assert_eq!(meta_schema(&state), 1);
    let migrated = sorted(
        FileStore::open(&state, RootKey::from_bytes(&key))
            .unwrap()
            .load()
            .unwrap(),
    );
    assert_eq!(migrated.len(), 9);
    assert!(migrated.iter().all(|s| s.revision == Revision::new(1)));
    assert_eq!(meta_schema(&state), CURRENT);
    assert_eq!(key_file_schemas(&state), vec![CURRENT; 9]);
    assert!(!state.join(format!("keys.schema{CURRENT}")).exists());
    let meta = fs::read(state.join("store.meta")).unwrap();
    let again = sorted(
        FileStore::open(&state, RootKey::from_bytes(&key))
            .unwrap()
            .load()
            .unwrap(),
    );
    assert_eq!(again, migrated, "a second open reads the same records");
    assert_eq!(
        fs::read(state.join("store.meta")).unwrap(),
        meta,
        "and migrates nothing"
    );
}

#[test]
fn a_migration_cut_off_at_any_step_ends_at_the_same_store() {
    let (_work, state, key) = fixture_copy();
    let want = sorted(
        FileStore::open(&state, RootKey::from_bytes(&key))
            .unwrap()
            .load()
            .unwrap(),
    );
    for point in [
        CrashPoint::MigrationStaged,
        CrashPoint::MigrationBeforeCommit,
        CrashPoint::MigrationCommitted,
        CrashPoint::MigrationMoved,
    ] {
        let (_work, state, key) = fixture_copy();
        let before: Vec<Vec<u8>> = key_files(&state);
        FileStore::open_crashing(&state, RootKey::from_bytes(&key), point).unwrap_err();
        let committed = matches!(point, CrashPoint::MigrationCommitted | CrashPoint::MigrationMoved);
        assert_eq!(meta_schema(&state), if committed { CURRENT } else { 1 }, "{point:?}");
        if !committed {
            assert_eq!(
                key_files(&state),
                before,
                "{point:?}: keys/ untouched before the commit"
            );
        }
        let got = sorted(
            FileStore::open(&state, RootKey::from_bytes(&key))
                .unwrap()
                .load()
                .unwrap(),
        );
        assert_eq!(got, want, "{point:?}");
        assert_eq!(key_file_schemas(&state), vec![CURRENT; 9], "{point:?}");
        assert!(!state.join(format!("keys.schema{CURRENT}")).exists(), "{point:?}");
    }
}

#[test]
fn a_staged_file_left_under_both_names_by_a_power_cut_is_finished() {
    // A cut after `keys/` was synced but before the staging directory's
    // removal was durable can leave a moved file under both names.
    let (_work, state, key) = fixture_copy();
    let want = sorted(
        FileStore::open(&state, RootKey::from_bytes(&key))
            .unwrap()
            .load()
            .unwrap(),
    );
    let (_work, state, key) = fixture_copy();
    FileStore::open_crashing(&state, RootKey::from_bytes(&key), CrashPoint::MigrationCommitted).unwrap_err();
    let staging = state.join(format!("keys.schema{CURRENT}"));
    for e in fs::read_dir(&staging).unwrap() {
        let from = e.unwrap().path();
        let to = state.join("keys").join(from.file_name().unwrap());
        fs::rename(&from, &to).unwrap();
        fs::hard_link(&to, &from).unwrap();
    }
    let got = sorted(
        FileStore::open(&state, RootKey::from_bytes(&key))
            .unwrap()
            .load()
            .unwrap(),
    );
    assert_eq!(got, want);
    assert!(!staging.exists());
}

fn key_files(state: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = fs::read_dir(state.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.iter().map(|p| fs::read(p).unwrap()).collect()
}

#[test]
fn a_corrupt_schema_1_record_stops_the_migration_before_anything_is_written() {
    let (_work, state, key) = fixture_copy();
    let victim = fs::read_dir(state.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut data = fs::read(&victim).unwrap();
    let last = data.len() - 1;
    data[last] ^= 1;
    fs::write(&victim, &data).unwrap();
    let before = key_files(&state);
    let err = FileStore::open(&state, RootKey::from_bytes(&key)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { path, .. } if *path == victim),
        "{err}"
    );
    assert_eq!(meta_schema(&state), 1);
    assert_eq!(key_files(&state), before);
    assert!(!state.join(format!("keys.schema{CURRENT}")).exists());
}

// ---- conformance ------------------------------------------------------------

/// The file store on a private temporary directory.
struct FileHarness {
    dir: tempfile::TempDir,
}

impl FileHarness {
    fn new() -> Self {
        Self {
            dir: crate::testutil::private_dir().unwrap(),
        }
    }
}

impl Harness for FileHarness {
    type Store = FileStore;
    type Crash = CrashPoint;

    fn open(&mut self) -> FileStore {
        open(self.dir.path())
    }

    fn crash_points(&self) -> Vec<CrashPoint> {
        vec![
            CrashPoint::TornTemp,
            CrashPoint::BeforeRename,
            CrashPoint::BeforeDirSync,
        ]
    }

    fn arm_crash(&self, store: &FileStore, point: CrashPoint) {
        store.crash_at(point);
    }

    fn second_writer(&mut self, first: &FileStore) -> Option<FileStore> {
        let second = FileStore::open(self.dir.path(), root(1));
        assert!(
            matches!(second, Err(StoreError::Locked { .. })),
            "the lock keeps a second writer out of {}",
            first.dir().display()
        );
        None
    }
}

crate::key_store_conformance!(FileHarness::new());

#[test]
fn each_crash_point_of_a_write_leaves_what_rename_promises() {
    for (point, new_wins) in [
        (CrashPoint::TornTemp, false),
        (CrashPoint::BeforeRename, false),
        (CrashPoint::BeforeDirSync, true),
    ] {
        let dir = crate::testutil::private_dir().unwrap();
        let store = open(dir.path());
        let old = record();
        let r = store.put(&old, None).unwrap();
        let new = crate::keys::store::conformance::changed(&old);
        store.crash_at(point);
        store.put(&new, Some(r)).unwrap_err();
        let tmp_left = fs::read_dir(dir.path().join("keys"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert_eq!(
            tmp_left, !new_wins,
            "{point:?}: the dying write leaves its temporary file"
        );
        drop(store);
        let got = records(&open(dir.path()));
        assert_eq!(got, vec![if new_wins { new } else { old }], "{point:?}");
    }
}
