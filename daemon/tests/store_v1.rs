//! The key store written by the release whose store had no schema of its
//! own ("schema 1": postcard of the record with the wire types in it),
//! committed in `tests/fixtures/store-v1/`, opens with this code (which
//! migrates it to the current schema): every field of every key, every
//! blob and every file written through a mount.
//!
//! `generate_store_v1_fixture` made the fixture (see the README there); it
//! is ignored so that an ordinary test run never rewrites it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, CreateKey, ErrorCode, KeyKind, KeyRole, KeyState, Principal};
use kmsd::keys::model::KeyRecord;
use kmsd::keys::{Caller, Clock, KeyService, ManualClock, RootKey, DAY};
use kmsd::mounts::ServiceKeys;
use serde::{Deserialize, Serialize};

/// Where the fixture lives.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1")
}

/// The fixture's clock starts here (2025-06-15T15:06:40Z).
const T0: u64 = 1_750_000_000;
/// The fixture's zone.
const ZONE: &str = "a";

// ---- what the fixture holds ----------------------------------------------

/// Everything the generator recorded, as plain data independent of the
/// store's encoding.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// How and from what the fixture was made.
    made_by: String,
    zone: String,
    /// The clock when the generator stopped; nothing is due before
    /// `now + 20 days`.
    now: u64,
    keys: Vec<KeyExpect>,
    blobs: Vec<BlobExpect>,
    /// The key of the mount that wrote `data/`.
    mount_key: String,
    files: Vec<FileExpect>,
    /// `(version, files)` of `fs versions` over `data/`.
    file_versions: Vec<(u32, u64)>,
}

/// Every field of a key record but the material (which the blobs check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyExpect {
    id: String,
    name: Option<String>,
    description: String,
    kind: String,
    zone: String,
    role: String,
    primary_zone: Option<String>,
    state: String,
    delete_at: Option<u64>,
    created_at: u64,
    users: Vec<String>,
    admins: Vec<String>,
    public_use: bool,
    rotation_enabled: bool,
    period_days: u32,
    next_rotation_at: Option<u64>,
    manual_rotations: u32,
    /// `(version, created_at, origin)`, the rotation history.
    versions: Vec<(u32, u64, String)>,
    /// `(zone, confirmed version)`.
    replicas: Vec<(String, Option<u32>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlobExpect {
    /// The key's name, or its id.
    key: String,
    version: u32,
    /// `encrypt`, `wrap` or `generate-data-key`.
    op: String,
    context: Context,
    blob: String,
    plaintext: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileExpect {
    /// Relative to the mount.
    path: String,
    content: String,
}

fn principal(p: &Principal) -> String {
    p.to_string()
}

/// The record as plain data, field by field.
fn expect_of(r: &KeyRecord) -> KeyExpect {
    let (role, primary_zone) = match &r.role {
        KeyRole::SingleZone => ("single-zone", None),
        KeyRole::Primary => ("primary", None),
        KeyRole::Replica { primary_zone } => ("replica", Some(primary_zone.clone())),
    };
    let (state, delete_at) = match r.state {
        KeyState::Enabled => ("enabled", None),
        KeyState::Disabled => ("disabled", None),
        KeyState::PendingDeletion { delete_at } => ("pending-deletion", Some(delete_at)),
    };
    let kind = match r.kind {
        KeyKind::Customer => "customer",
        KeyKind::DefaultOrganization => "default-organization",
    };
    KeyExpect {
        id: r.id.to_string(),
        name: r.name.clone(),
        description: r.description.clone(),
        kind: kind.into(),
        zone: r.zone.clone(),
        role: role.into(),
        primary_zone,
        state: state.into(),
        delete_at,
        created_at: r.created_at,
        users: r.policy.users.iter().map(principal).collect(),
        admins: r.policy.admins.iter().map(principal).collect(),
        public_use: r.policy.public_use,
        rotation_enabled: r.rotation.enabled,
        period_days: r.rotation.period_days,
        next_rotation_at: r.rotation.next_at,
        manual_rotations: r.manual_rotations,
        versions: r
            .versions
            .iter()
            .map(|v| (v.version, v.created_at, v.origin.to_string()))
            .collect(),
        replicas: r
            .replicas
            .iter()
            .map(|x| (x.zone.clone(), x.confirmed_version))
            .collect(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn alice() -> Caller {
    Caller::process(1000, 1000, Some(1))
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8 ^ seed).collect()
}

/// A directory only its owner may enter, as the store requires.
fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir()
        .unwrap()
}

/// Why FUSE cannot be used here, if it cannot (then mount checks are
/// skipped, unless `CI` is set).
fn fuse_unusable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    match fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/fuse: {e}")),
    }
}

/// The filesystem mounted in this process over the key service (kmsd
/// itself leaves mounting to its mount processes).
fn mount(svc: &Arc<KeyService>, data: &Path, mnt: &Path, key: &str) -> kms_fuse::MountHandle {
    let keys = Arc::new(ServiceKeys::new(svc.clone(), svc.entry(key).unwrap().record.id));
    kmsd::mount::mount_fs(data, mnt, &format!("kmsd:{key}"), keys, Default::default()).expect("mount")
}

// ---- the generator --------------------------------------------------------

/// Records blobs of the key's active version: an encryption, a wrapped DEK
/// under a context and a generated data key.
struct Recorder<'a> {
    svc: &'a KeyService,
    blobs: Vec<BlobExpect>,
}

impl Recorder<'_> {
    fn record(&mut self, caller: &Caller, key: &str) {
        let version = self.svc.describe(&Caller::internal(), key).unwrap().active_version;
        let text = format!("{key} version {version}: plaintext from schema 1");
        let blob = self.svc.encrypt(caller, key, text.as_bytes(), &Context::new()).unwrap();
        self.push(key, "encrypt", Context::new(), &blob, text.as_bytes());
        let dek = pattern(32, version as u8);
        let c = ctx(&[("tenant", "7"), ("purpose", "fixture")]);
        let blob = self.svc.wrap(caller, key, &dek, &c).unwrap();
        self.push(key, "wrap", c, &blob, &dek);
        let c = ctx(&[("file", key)]);
        let (dek, blob) = self.svc.generate_data_key(caller, key, &c).unwrap();
        self.push(key, "generate-data-key", c, &blob, &dek);
    }

    fn push(&mut self, key: &str, op: &str, context: Context, blob: &[u8], plaintext: &[u8]) {
        self.blobs.push(BlobExpect {
            key: key.into(),
            version: BlobHeader::parse(blob).unwrap().version,
            op: op.into(),
            context,
            blob: hex(blob),
            plaintext: hex(plaintext),
        });
    }
}

fn create(svc: &KeyService, name: Option<&str>, description: &str, rotation: Option<Option<u32>>) -> String {
    let req = CreateKey {
        name: name.map(Into::into),
        description: description.into(),
        rotation,
    };
    svc.create_key(&alice(), &req).unwrap().id.to_string()
}

/// Writes the fixture from scratch with this build's store. Run with
/// `KMSD_WRITE_STORE_FIXTURE=1 cargo test -p kmsd --test store_v1 -- --ignored
/// generate_store_v1_fixture` (root and FUSE needed for the mount).
#[test]
#[ignore = "writes the committed fixture; run by hand, see tests/fixtures/store-v1/README.md"]
fn generate_store_v1_fixture() {
    assert!(
        std::env::var_os("KMSD_WRITE_STORE_FIXTURE").is_some(),
        "set KMSD_WRITE_STORE_FIXTURE=1 to overwrite {}",
        fixture_dir().display()
    );
    assert!(
        fuse_unusable().is_none(),
        "the fixture needs a FUSE mount (root, /dev/fuse)"
    );
    let work = private_dir();
    let state = work.path().join("state");
    let root_path = work.path().join("root-key");
    let data = work.path().join("data");
    let mnt = work.path().join("mnt");
    let clock = Arc::new(ManualClock::at(T0));
    let svc = Arc::new(KeyService::open(&state, RootKey::create(&root_path).unwrap(), ZONE, clock.clone()).unwrap());
    let mut rec = Recorder {
        svc: &svc,
        blobs: Vec::new(),
    };

    // Day 0: one key of each shape, blobs of version 1, files under fs v1.
    create(&svc, Some("app"), "rotates every 30 days", Some(Some(30)));
    create(&svc, Some("retired"), "disabled at the end", None);
    create(&svc, Some("manual-only"), "automatic rotation off", Some(None));
    create(&svc, Some("shared"), "multi-zone primary", Some(Some(90)));
    let unnamed = create(&svc, None, "clé sans nom: a key with no name", None);
    create(&svc, Some("doomed"), "pending deletion at the end", None);
    create(&svc, Some("fs"), "the mount's key", None);
    let names = [
        "app",
        "retired",
        "manual-only",
        "shared",
        unnamed.as_str(),
        "doomed",
        "fs",
    ];
    for k in names {
        rec.record(&alice(), k);
    }
    rec.record(&alice(), "default");
    let mounts = mount(&svc, &data, &mnt, "fs");
    let mut files = Vec::new();
    let mut write = |path: &str, content: Vec<u8>| {
        fs::create_dir_all(mnt.join(path).parent().unwrap()).unwrap();
        fs::write(mnt.join(path), &content).unwrap();
        files.push(FileExpect {
            path: path.into(),
            content: hex(&content),
        });
    };
    write("hello.txt", b"hello from schema 1\n".to_vec());
    write("empty", Vec::new());
    write("dir/multi.bin", pattern(10_000, 0));
    write("dir/sub/exact.bin", pattern(8192, 1));

    // Day 1-2: manual rotations; a file under fs v2.
    clock.advance_days(1);
    for k in ["app", "retired", "manual-only", "fs"] {
        svc.rotate(&alice(), k).unwrap();
        rec.record(&alice(), k);
    }
    write("after-rotation.txt", b"written under fs version 2".to_vec());
    clock.advance_days(1);
    svc.rotate(&alice(), "manual-only").unwrap();
    rec.record(&alice(), "manual-only");

    // Day 3: "shared" gets replicas in zones b (confirmed) and d (never
    // confirmed); zone c's key "from-c" is replicated here.
    clock.advance_days(1);
    let shared = svc.describe(&alice(), "shared").unwrap().id;
    svc.begin_replica(&alice(), "shared", "b").unwrap();
    svc.record_confirmed(shared, "b", 1).unwrap();
    svc.rotate(&alice(), "shared").unwrap();
    svc.record_confirmed(shared, "b", 2).unwrap();
    svc.begin_replica(&alice(), "shared", "d").unwrap();
    rec.record(&alice(), "shared");
    let zone_c_dir = private_dir();
    let clock_c = Arc::new(ManualClock::at(T0 + DAY));
    let zone_c = KeyService::open(zone_c_dir.path(), RootKey::from_bytes(&[7; 32]), "c", clock_c.clone()).unwrap();
    create(&zone_c, Some("from-c"), "replica of zone c's key", Some(Some(60)));
    let mut rec_c = Recorder {
        svc: &zone_c,
        blobs: Vec::new(),
    };
    rec_c.record(&alice(), "from-c");
    clock_c.advance_days(1);
    zone_c.rotate(&alice(), "from-c").unwrap();
    rec.blobs.append(&mut rec_c.blobs);
    let (export, _) = zone_c.begin_replica(&alice(), "from-c", ZONE).unwrap();
    svc.accept_replica(&export, "c").unwrap();
    rec.record(&alice(), "from-c");

    // Day 31: app's first automatic rotation. Day 366: every key that owns
    // an enabled schedule rotates once, the default key included.
    clock.set(T0 + 31 * DAY);
    assert_eq!(svc.run_due(clock.now()).rotated.len(), 1);
    rec.record(&alice(), "app");
    clock.set(T0 + 366 * DAY);
    let report = svc.run_due(clock.now());
    assert!(report.failed.is_empty() && report.rotated.len() == 7, "{report:?}");
    for k in names.iter().chain(&["default"]) {
        if *k != "manual-only" {
            rec.record(&alice(), k);
        }
    }
    write("late.txt", b"written under fs version 3".to_vec());

    // Day 370: the end states.
    clock.set(T0 + 370 * DAY);
    svc.disable_key(&alice(), "retired").unwrap();
    svc.schedule_deletion(&alice(), "doomed", Some(30)).unwrap();
    assert!(svc.next_due().unwrap() >= clock.now() + 20 * DAY);
    let fs_keys = ServiceKeys::new(svc.clone(), svc.describe(&alice(), "fs").unwrap().id);
    let file_versions = kms_fuse::admin::versions(&data, &fs_keys).unwrap().counts;
    let mut keys: Vec<KeyExpect> = svc
        .list(&Caller::internal())
        .iter()
        .map(|k| expect_of(&svc.entry(&k.id.to_string()).unwrap().record))
        .collect();
    keys.sort_by(|a, b| a.id.cmp(&b.id));
    let manifest = Manifest {
        made_by: "kmsd 0.1.0 (store schema 1), by generate_store_v1_fixture in daemon/tests/store_v1.rs".into(),
        zone: ZONE.into(),
        now: clock.now(),
        keys,
        blobs: rec.blobs,
        mount_key: "fs".into(),
        files,
        file_versions,
    };
    drop(fs_keys);
    mounts.unmount().unwrap();
    drop(svc);
    drop(zone_c);
    write_fixture(work.path(), &manifest);
}

/// Replaces the fixture's state, root key, data and manifest (the README
/// stays).
fn write_fixture(work: &Path, manifest: &Manifest) {
    let out = fixture_dir();
    for sub in ["state", "data"] {
        let _ = fs::remove_dir_all(out.join(sub));
    }
    fs::create_dir_all(&out).unwrap();
    copy_tree(&work.join("state"), &out.join("state"), &["lock"]);
    copy_tree(&work.join("data"), &out.join("data"), &[]);
    fs::copy(work.join("root-key"), out.join("root-key")).unwrap();
    let json = serde_json::to_string_pretty(manifest).unwrap();
    fs::write(out.join("expected.json"), json + "\n").unwrap();
}

/// Copies a tree of directories and regular files, skipping names in
/// `skip`; modes are not copied (git keeps only 644 and 755).
fn copy_tree(from: &Path, to: &Path, skip: &[&str]) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst, skip);
        } else {
            fs::write(&dst, fs::read(&src).unwrap()).unwrap();
        }
    }
}

// ---- the check --------------------------------------------------------------

/// A private, writable copy of the fixture: `root-key`, `state/`, `data/`
/// with the modes kmsd requires (git does not keep them).
fn fixture_copy() -> (tempfile::TempDir, Manifest) {
    let work = private_dir();
    let src = fixture_dir();
    copy_tree(&src.join("state"), &work.path().join("state"), &[]);
    copy_tree(&src.join("data"), &work.path().join("data"), &[]);
    fs::copy(src.join("root-key"), work.path().join("root-key")).unwrap();
    chmod_private(&work.path().join("state"));
    fs::set_permissions(work.path().join("root-key"), fs::Permissions::from_mode(0o600)).unwrap();
    let manifest = serde_json::from_slice(&fs::read(src.join("expected.json")).unwrap()).unwrap();
    (work, manifest)
}

fn chmod_private(path: &Path) {
    let mode = if path.is_dir() { 0o700 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            chmod_private(&e.unwrap().path());
        }
    }
}

fn open(work: &Path, m: &Manifest) -> Arc<KeyService> {
    let root = RootKey::load(&work.join("root-key")).unwrap();
    let clock = Arc::new(ManualClock::at(m.now));
    Arc::new(KeyService::open(&work.join("state"), root, &m.zone, clock).unwrap())
}

fn check_fields(svc: &KeyService, m: &Manifest) {
    let mut held: Vec<String> = svc.list(&Caller::internal()).iter().map(|k| k.id.to_string()).collect();
    held.sort();
    let want: Vec<String> = m.keys.iter().map(|k| k.id.clone()).collect();
    assert_eq!(held, want, "the same keys, no more (no second default key)");
    for k in &m.keys {
        let got = expect_of(&svc.entry(&k.id).unwrap().record);
        assert_eq!(&got, k, "every field of key {:?} survives", k.name);
    }
}

fn check_blobs(svc: &KeyService, m: &Manifest) {
    for b in &m.blobs {
        let plain = svc
            .decrypt(&alice(), &unhex(&b.blob), &b.context)
            .unwrap_or_else(|e| panic!("{} blob of {} v{}: {e}", b.op, b.key, b.version));
        assert_eq!(
            &plain[..],
            &unhex(&b.plaintext)[..],
            "{} v{} {}",
            b.key,
            b.version,
            b.op
        );
    }
}

/// The first 8 bytes of `store.meta` and of every key file.
fn magics(state: &Path) -> (String, Vec<String>) {
    let magic = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap()[..8]).into_owned();
    let keys = fs::read_dir(state.join("keys"))
        .unwrap()
        .map(|e| magic(&e.unwrap().path()))
        .collect();
    (magic(&state.join("store.meta")), keys)
}

#[test]
fn store_v1_fixture_opens_with_every_field_blob_and_file() {
    let (work, m) = fixture_copy();
    let state = work.path().join("state");
    assert_eq!(magics(&state), ("KMSDMET1".into(), vec!["KMSDKEY1".into(); 9]));
    let svc = open(work.path(), &m);
    assert_eq!(
        magics(&state),
        ("KMSDMETA".into(), vec!["KMSDKEY2".into(); 9]),
        "migrated to schema 2 at open"
    );
    check_fields(&svc, &m);
    assert!(
        svc.next_due().unwrap() > m.now,
        "nothing was due when the fixture was made"
    );

    // The disabled and the pending-deletion key serve nothing until enabled.
    for key in ["retired", "doomed"] {
        let b = m.blobs.iter().find(|b| b.key == key).unwrap();
        let err = svc.decrypt(&alice(), &unhex(&b.blob), &b.context).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Disabled, "{key}");
    }
    svc.cancel_deletion(&alice(), "doomed").unwrap();
    for key in ["retired", "doomed"] {
        svc.enable_key(&alice(), key).unwrap();
    }
    check_blobs(&svc, &m);
    for key in ["retired", "doomed"] {
        svc.disable_key(&alice(), key).unwrap();
    }
    svc.schedule_deletion(&alice(), "doomed", Some(30)).unwrap();

    // Written and reopened, the store holds the same records (the deletion
    // was scheduled again at the fixture's "now", for the same date).
    drop(svc);
    let svc = open(work.path(), &m);
    check_fields(&svc, &m);
    check_files(&svc, work.path(), &m);
}

fn check_files(svc: &Arc<KeyService>, work: &Path, m: &Manifest) {
    if let Some(why) = fuse_unusable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but FUSE is unusable: {why}"
        );
        eprintln!("skipping the fixture's files: {why}");
        return;
    }
    let (data, mnt) = (work.join("data"), work.join("mnt"));
    let id = svc.describe(&alice(), &m.mount_key).unwrap().id;
    let counts = kms_fuse::admin::versions(&data, &ServiceKeys::new(svc.clone(), id))
        .unwrap()
        .counts;
    assert_eq!(counts, m.file_versions, "file headers per key version");
    let mounts = mount(svc, &data, &mnt, &m.mount_key);
    for f in &m.files {
        let got = fs::read(mnt.join(&f.path)).unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(got, unhex(&f.content), "{} reads through the mount", f.path);
    }
    fs::write(mnt.join("hello.txt"), b"rewritten").unwrap();
    assert_eq!(fs::read(mnt.join("hello.txt")).unwrap(), b"rewritten");
    mounts.unmount().unwrap();
}

#[test]
fn fixture_blobs_cover_every_version_of_every_key() {
    let m: Manifest = serde_json::from_slice(&fs::read(fixture_dir().join("expected.json")).unwrap()).unwrap();
    for k in &m.keys {
        let label = k.name.clone().unwrap_or_else(|| k.id.clone());
        for (v, _, _) in &k.versions {
            let covered = m.blobs.iter().any(|b| b.key == label && b.version == *v);
            assert!(covered, "no blob of {label} v{v}");
        }
    }
    let mut map: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &m.keys {
        *map.entry(k.role.as_str()).or_default() += 1;
    }
    assert!(map.contains_key("primary") && map.contains_key("replica"), "{map:?}");
}
