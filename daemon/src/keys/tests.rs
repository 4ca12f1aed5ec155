//! Service-level tests: the rules through the public API, crypto across
//! rotations, the scheduler with a moved clock, durability across reopen,
//! and a property test over random operation sequences.

use std::path::Path;
use std::sync::Arc;

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, CreateKey, ErrorCode, KeyKind, KeyState, Origin, DEFAULT_KEY_NAME};

use super::*;

const T0: u64 = 1_750_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    svc: KeyService,
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> KeyService {
    KeyService::open(dir, RootKey::from_bytes(&[42; 32]), "zone-a", clock.clone()).unwrap()
}

fn fixture() -> Fixture {
    let dir = crate::testutil::private_dir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let svc = open(dir.path(), &clock);
    Fixture { dir, clock, svc }
}

impl Fixture {
    fn reopen(&mut self) {
        // Drop first: the store is locked while open.
        let placeholder = crate::testutil::private_dir().unwrap();
        let old = std::mem::replace(&mut self.svc, open(placeholder.path(), &self.clock));
        drop(old);
        self.svc = open(self.dir.path(), &self.clock);
    }
}

fn alice() -> Caller {
    Caller::process(1000, 1000, Some(1))
}

fn bob() -> Caller {
    Caller::process(2000, 2000, Some(2))
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn create(svc: &KeyService, name: &str) -> String {
    let req = CreateKey {
        name: Some(name.into()),
        ..CreateKey::default()
    };
    svc.create_key(&alice(), &req).unwrap().id.to_string()
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> ErrorCode {
    r.unwrap_err().code()
}

#[test]
fn default_key_exists_from_first_open_and_is_platform_managed() {
    let f = fixture();
    let info = f.svc.describe(&alice(), DEFAULT_KEY_NAME).unwrap();
    assert_eq!(info.kind, KeyKind::DefaultOrganization);
    assert!(info.rotation.enabled);
    assert_eq!(info.rotation.period_days, Some(365));
    let a = alice();
    let admin = Caller::internal();
    assert_eq!(code(f.svc.rotate(&admin, DEFAULT_KEY_NAME)), ErrorCode::Forbidden);
    assert_eq!(
        code(f.svc.disable_rotation(&admin, DEFAULT_KEY_NAME)),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(f.svc.enable_rotation(&admin, DEFAULT_KEY_NAME, Some(30))),
        ErrorCode::Forbidden
    );
    assert_eq!(code(f.svc.disable_key(&admin, DEFAULT_KEY_NAME)), ErrorCode::Forbidden);
    assert_eq!(
        code(f.svc.schedule_deletion(&admin, DEFAULT_KEY_NAME, None)),
        ErrorCode::Forbidden
    );
    // Anyone who reaches the socket may use it.
    let blob = f.svc.wrap(&a, DEFAULT_KEY_NAME, &[1; 32], &Context::new()).unwrap();
    assert_eq!(&f.svc.unwrap(&bob(), &blob, &Context::new()).unwrap()[..], &[1; 32]);
    // But nobody but an admin administers it.
    assert_eq!(code(f.svc.rotate(&a, DEFAULT_KEY_NAME)), ErrorCode::PermissionDenied);
}

#[test]
fn default_key_is_created_once() {
    let mut f = fixture();
    let id = f.svc.describe(&alice(), DEFAULT_KEY_NAME).unwrap().id;
    f.reopen();
    assert_eq!(f.svc.describe(&alice(), DEFAULT_KEY_NAME).unwrap().id, id);
    assert_eq!(f.svc.key_count(), 1);
}

#[test]
fn created_key_defaults() {
    let f = fixture();
    let info = f
        .svc
        .create_key(
            &alice(),
            &CreateKey {
                name: Some("app".into()),
                ..CreateKey::default()
            },
        )
        .unwrap();
    assert_eq!(info.kind, KeyKind::Customer);
    assert_eq!(info.state, KeyState::Enabled);
    assert_eq!(info.active_version, 1);
    assert!(info.rotation.enabled);
    assert_eq!(info.rotation.period_days, Some(365));
    assert_eq!(info.rotation.next_rotation_at, Some(T0 + 365 * DAY));
    assert_eq!((info.rotation.manual_used, info.rotation.manual_limit), (0, 10));
    let off = CreateKey {
        rotation: Some(None),
        ..CreateKey::default()
    };
    assert!(!f.svc.create_key(&alice(), &off).unwrap().rotation.enabled);
    let p90 = CreateKey {
        rotation: Some(Some(90)),
        ..CreateKey::default()
    };
    assert_eq!(f.svc.create_key(&alice(), &p90).unwrap().rotation.period_days, Some(90));
    assert_eq!(
        code(f.svc.create_key(
            &alice(),
            &CreateKey {
                name: Some("app".into()),
                ..CreateKey::default()
            }
        )),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn eleventh_manual_rotation_is_refused_through_the_service() {
    let f = fixture();
    let k = create(&f.svc, "k");
    for _ in 0..10 {
        f.svc.rotate(&alice(), &k).unwrap();
    }
    assert_eq!(code(f.svc.rotate(&alice(), &k)), ErrorCode::LimitExceeded);
    let info = f.svc.describe(&alice(), &k).unwrap();
    assert_eq!(info.active_version, 11);
    assert_eq!(info.rotation.manual_used, 10);
}

#[test]
fn period_change_while_enabled_is_refused_through_the_service() {
    let f = fixture();
    let k = create(&f.svc, "k");
    assert_eq!(
        code(f.svc.enable_rotation(&alice(), &k, Some(30))),
        ErrorCode::RotationEnabled
    );
    f.svc.disable_rotation(&alice(), &k).unwrap();
    let info = f.svc.enable_rotation(&alice(), &k, Some(30)).unwrap();
    assert_eq!(info.rotation.period_days, Some(30));
}

#[test]
fn old_versions_decrypt_only_and_new_blobs_use_the_new_version() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let c = ctx(&[("file", "1")]);
    let old = f.svc.wrap(&alice(), &k, &[7; 32], &c).unwrap();
    assert_eq!(BlobHeader::parse(&old).unwrap().version, 1);
    for _ in 0..5 {
        f.svc.rotate(&alice(), &k).unwrap();
    }
    let new = f.svc.wrap(&alice(), &k, &[8; 32], &c).unwrap();
    assert_eq!(BlobHeader::parse(&new).unwrap().version, 6);
    assert_eq!(&f.svc.unwrap(&alice(), &old, &c).unwrap()[..], &[7; 32]);
    assert_eq!(&f.svc.unwrap(&alice(), &new, &c).unwrap()[..], &[8; 32]);
    // Re-encrypt moves an old blob to the active version.
    let moved = f.svc.re_encrypt(&alice(), &old, &c, None, None).unwrap();
    assert_eq!(BlobHeader::parse(&moved).unwrap().version, 6);
    assert_eq!(&f.svc.unwrap(&alice(), &moved, &c).unwrap()[..], &[7; 32]);
}

#[test]
fn decrypt_failures_are_decrypt_failed() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let other = create(&f.svc, "other");
    let c = ctx(&[("a", "b")]);
    let blob = f.svc.encrypt(&alice(), &k, b"hello", &c).unwrap();
    assert_eq!(&f.svc.decrypt(&alice(), &blob, &c).unwrap()[..], b"hello");
    // Wrong context.
    assert_eq!(
        code(f.svc.decrypt(&alice(), &blob, &ctx(&[("a", "c")]))),
        ErrorCode::DecryptFailed
    );
    assert_eq!(
        code(f.svc.decrypt(&alice(), &blob, &Context::new())),
        ErrorCode::DecryptFailed
    );
    // A flipped bit anywhere.
    for i in [0, 5, 20, 30, 40, blob.len() - 1] {
        let mut bad = blob.to_vec();
        bad[i] ^= 0x10;
        assert_eq!(
            code(f.svc.decrypt(&alice(), &bad, &c)),
            ErrorCode::DecryptFailed,
            "byte {i}"
        );
    }
    // A version that does not exist.
    let mut bad = blob.to_vec();
    bad[17..21].copy_from_slice(&9u32.to_be_bytes());
    let err = f.svc.decrypt(&alice(), &bad, &c).unwrap_err();
    assert_eq!(err.code(), ErrorCode::DecryptFailed);
    assert!(err.to_string().contains("version"), "{err}");
    // Another key's blob: relabelled with the other key's id.
    let mut bad = blob.to_vec();
    bad[1..17].copy_from_slice(uuid::Uuid::parse_str(&other).unwrap().as_bytes());
    assert_eq!(code(f.svc.decrypt(&alice(), &bad, &c)), ErrorCode::DecryptFailed);
    // A blob expected to belong to one key but made by another.
    let theirs = f.svc.wrap(&alice(), &other, &[1; 32], &c).unwrap();
    let kid = uuid::Uuid::parse_str(&k).unwrap();
    assert_eq!(
        code(f.svc.unwrap_for_key(&alice(), kid, &theirs, &c)),
        ErrorCode::DecryptFailed
    );
    // Garbage and truncation.
    assert_eq!(code(f.svc.decrypt(&alice(), b"garbage", &c)), ErrorCode::DecryptFailed);
    assert_eq!(
        code(f.svc.decrypt(&alice(), &blob[..blob.len() - 1], &c)),
        ErrorCode::DecryptFailed
    );
}

#[test]
fn disabled_and_pending_deletion_keys_serve_nothing() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let blob = f.svc.wrap(&alice(), &k, &[1; 16], &Context::new()).unwrap();
    f.svc.disable_key(&alice(), &k).unwrap();
    assert_eq!(
        code(f.svc.wrap(&alice(), &k, &[1; 16], &Context::new())),
        ErrorCode::Disabled
    );
    assert_eq!(
        code(f.svc.unwrap(&alice(), &blob, &Context::new())),
        ErrorCode::Disabled
    );
    assert_eq!(
        code(f.svc.generate_data_key(&alice(), &k, &Context::new())),
        ErrorCode::Disabled
    );
    assert_eq!(code(f.svc.rotate(&alice(), &k)), ErrorCode::Disabled);
    f.svc.enable_key(&alice(), &k).unwrap();
    f.svc.schedule_deletion(&alice(), &k, Some(7)).unwrap();
    assert_eq!(
        code(f.svc.unwrap(&alice(), &blob, &Context::new())),
        ErrorCode::Disabled
    );
    assert_eq!(
        code(f.svc.encrypt(&alice(), &k, b"x", &Context::new())),
        ErrorCode::Disabled
    );
    f.svc.cancel_deletion(&alice(), &k).unwrap();
    f.svc.enable_key(&alice(), &k).unwrap();
    assert_eq!(&f.svc.unwrap(&alice(), &blob, &Context::new()).unwrap()[..], &[1; 16]);
}

#[test]
fn deletion_happens_when_due_and_not_before() {
    let f = fixture();
    let k = create(&f.svc, "k");
    f.svc.schedule_deletion(&alice(), &k, Some(7)).unwrap();
    assert_eq!(f.svc.next_due(), Some(T0 + 7 * DAY));
    f.clock.advance_days(6);
    assert!(f.svc.run_due(f.clock.now()).deleted.is_empty());
    f.clock.advance_days(1);
    let report = f.svc.run_due(f.clock.now());
    assert_eq!(report.deleted.len(), 1);
    assert_eq!(code(f.svc.describe(&alice(), &k)), ErrorCode::NotFound);
    assert_eq!(code(f.svc.describe(&alice(), "k")), ErrorCode::NotFound);
    // The name is free again.
    create(&f.svc, "k");
}

#[test]
fn scheduler_catch_up_rotates_once_with_a_moved_clock() {
    let mut f = fixture();
    let k = create(&f.svc, "k");
    let p30 = CreateKey {
        name: Some("monthly".into()),
        rotation: Some(Some(30)),
        ..CreateKey::default()
    };
    f.svc.create_key(&alice(), &p30).unwrap();
    assert_eq!(f.svc.next_due(), Some(T0 + 30 * DAY));
    f.clock.advance_days(29);
    assert!(f.svc.run_due(f.clock.now()).rotated.is_empty());
    // The daemon was down for three years.
    f.clock.advance_days(3 * 365);
    f.reopen();
    let report = f.svc.run_due(f.clock.now());
    assert_eq!(
        report.rotated.len(),
        3,
        "k, monthly and the default key each rotate once"
    );
    assert!(f.svc.run_due(f.clock.now()).rotated.is_empty());
    let info = f.svc.describe(&alice(), &k).unwrap();
    assert_eq!(info.active_version, 2);
    assert_eq!(info.versions[1].origin, Origin::Automatic);
    assert_eq!(info.rotation.next_rotation_at, Some(f.clock.now() + 365 * DAY));
    assert_eq!(
        info.rotation.manual_used, 0,
        "automatic rotations do not count against the limit"
    );
    let rot = f.svc.rotations(&alice(), &k).unwrap();
    assert_eq!(
        rot.iter().map(|r| r.origin).collect::<Vec<_>>(),
        vec![Origin::Initial, Origin::Automatic]
    );
}

#[test]
fn disabled_key_rotation_waits_until_enabled() {
    let f = fixture();
    let k = create(&f.svc, "k");
    f.svc.disable_key(&alice(), &k).unwrap();
    f.clock.advance_days(400);
    let default_only = f.svc.run_due(f.clock.now());
    assert_eq!(default_only.rotated.len(), 1);
    assert_eq!(f.svc.describe(&alice(), &k).unwrap().active_version, 1);
    f.svc.enable_key(&alice(), &k).unwrap();
    assert_eq!(f.svc.next_due(), Some(T0 + 365 * DAY));
    assert_eq!(f.svc.run_due(f.clock.now()).rotated.len(), 1);
    assert_eq!(f.svc.describe(&alice(), &k).unwrap().active_version, 2);
}

#[test]
fn reopen_after_every_kind_of_write_round_trips() {
    let mut f = fixture();
    let k = create(&f.svc, "k");
    let blob = f.svc.wrap(&alice(), &k, &[3; 32], &Context::new()).unwrap();
    f.svc.rotate(&alice(), &k).unwrap();
    f.svc.disable_rotation(&alice(), &k).unwrap();
    f.svc.enable_rotation(&alice(), &k, Some(90)).unwrap();
    f.svc.disable_key(&alice(), &k).unwrap();
    let before = f.svc.describe(&alice(), &k).unwrap();
    f.reopen();
    assert_eq!(f.svc.describe(&alice(), &k).unwrap(), before);
    f.svc.enable_key(&alice(), &k).unwrap();
    assert_eq!(&f.svc.unwrap(&alice(), &blob, &Context::new()).unwrap()[..], &[3; 32]);
}

#[test]
fn wrong_root_key_refused_at_open() {
    let f = fixture();
    create(&f.svc, "k");
    let dir = f.dir.path().to_path_buf();
    drop(f.svc);
    let err = KeyService::open(
        &dir,
        RootKey::from_bytes(&[1; 32]),
        "zone-a",
        Arc::new(ManualClock::at(T0)),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::WrongRootKey { .. }), "{err}");
}

#[test]
fn policy_is_enforced_on_every_kind_of_operation() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let blob = f.svc.wrap(&alice(), &k, &[1; 32], &Context::new()).unwrap();
    let b = bob();
    assert_eq!(
        code(f.svc.wrap(&b, &k, &[1; 32], &Context::new())),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(f.svc.unwrap(&b, &blob, &Context::new())),
        ErrorCode::PermissionDenied
    );
    assert_eq!(code(f.svc.describe(&b, &k)), ErrorCode::PermissionDenied);
    assert_eq!(code(f.svc.rotate(&b, &k)), ErrorCode::PermissionDenied);
    assert_eq!(code(f.svc.disable_key(&b, &k)), ErrorCode::PermissionDenied);
    assert!(f.svc.list(&b).iter().all(|i| i.id.to_string() != k));
    f.svc.set_admins(vec![kms_client::proto::Principal::Uid(2000)]);
    f.svc.rotate(&b, &k).unwrap();
    assert_eq!(
        code(f.svc.unwrap(&b, &blob, &Context::new())),
        ErrorCode::PermissionDenied
    );
}

#[test]
fn sizes_are_checked() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let c = Context::new();
    assert!(f.svc.encrypt(&alice(), &k, &vec![0; 64 * 1024], &c).is_ok());
    assert_eq!(
        code(f.svc.encrypt(&alice(), &k, &vec![0; 64 * 1024 + 1], &c)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(f.svc.wrap(&alice(), &k, &[], &c)), ErrorCode::InvalidArgument);
    assert_eq!(
        code(f.svc.wrap_batch(&alice(), &k, &[], &c)),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn batches_and_data_keys() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let c = ctx(&[("x", "y")]);
    let deks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 32]).collect();
    let blobs = f.svc.wrap_batch(&alice(), &k, &deks, &c).unwrap();
    let mut mixed: Vec<Vec<u8>> = blobs.iter().map(|s| s.to_vec()).collect();
    mixed.push(b"junk".to_vec());
    let out = f.svc.unwrap_batch(&alice(), &mixed, &c).unwrap();
    for (i, r) in out.iter().take(10).enumerate() {
        assert_eq!(&r.as_ref().unwrap()[..], &deks[i][..]);
    }
    assert_eq!(out[10].as_ref().unwrap_err().code(), ErrorCode::DecryptFailed);
    let (dek, blob) = f.svc.generate_data_key(&alice(), &k, &c).unwrap();
    assert_eq!(dek.len(), 32);
    assert_eq!(f.svc.unwrap(&alice(), &blob, &c).unwrap(), dek);
    let many = f.svc.generate_data_key_batch(&alice(), &k, 5, &c).unwrap();
    assert_eq!(many.len(), 5);
    assert_ne!(many[0].0, many[1].0);
    // One key per context, each bound to its own.
    let ctxs: Vec<Context> = (0..3).map(|i| ctx(&[("file", &i.to_string())])).collect();
    let each = f.svc.generate_data_keys(&alice(), &k, &ctxs).unwrap();
    assert_eq!(each.len(), 3);
    for (i, (dek, blob)) in each.iter().enumerate() {
        assert_eq!(f.svc.unwrap(&alice(), blob, &ctxs[i]).unwrap(), *dek);
        let other = &ctxs[(i + 1) % 3];
        assert_eq!(
            f.svc.unwrap(&alice(), blob, other).unwrap_err().code(),
            ErrorCode::DecryptFailed
        );
    }
    assert_ne!(each[0].0, each[1].0);
    for bad in [Vec::new(), vec![c.clone(); kms_client::proto::MAX_BATCH + 1]] {
        let e = f.svc.generate_data_keys(&alice(), &k, &bad).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
    }
    let e = f.svc.generate_data_keys(&bob(), &k, &ctxs).unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied);
}

#[test]
fn re_encrypt_to_another_key_and_context() {
    let f = fixture();
    let a = create(&f.svc, "a");
    let b = create(&f.svc, "b");
    let blob = f.svc.encrypt(&alice(), &a, b"data", &ctx(&[("v", "1")])).unwrap();
    let moved = f
        .svc
        .re_encrypt(
            &alice(),
            &blob,
            &ctx(&[("v", "1")]),
            Some(&b),
            Some(&ctx(&[("v", "2")])),
        )
        .unwrap();
    assert_eq!(BlobHeader::parse(&moved).unwrap().key_id.to_string(), b);
    assert_eq!(
        &f.svc.decrypt(&alice(), &moved, &ctx(&[("v", "2")])).unwrap()[..],
        b"data"
    );
    assert_eq!(
        code(f.svc.decrypt(&alice(), &moved, &ctx(&[("v", "1")]))),
        ErrorCode::DecryptFailed
    );
}

#[test]
fn readers_are_not_blocked_by_a_writer() {
    // A reader must complete while a writer holds the write lock: the
    // write path never holds anything readers take.
    let f = fixture();
    let k = create(&f.svc, "k");
    let blob = f.svc.wrap(&alice(), &k, &[1; 32], &Context::new()).unwrap();
    let _writer = f.svc.writer_lock_for_test();
    assert!(f.svc.unwrap(&alice(), &blob, &Context::new()).is_ok());
    assert!(f.svc.wrap(&alice(), &k, &[1; 32], &Context::new()).is_ok());
}

#[test]
fn failed_persist_changes_nothing_in_memory() {
    let f = fixture();
    let k = create(&f.svc, "k");
    let keys_dir = f.dir.path().join("keys");
    // Make the store unwritable: replace the keys dir by a file.
    let moved = f.dir.path().join("keys.bak");
    std::fs::rename(&keys_dir, &moved).unwrap();
    std::fs::write(&keys_dir, b"not a dir").unwrap();
    assert_eq!(code(f.svc.rotate(&alice(), &k)), ErrorCode::Unavailable);
    assert_eq!(f.svc.describe(&alice(), &k).unwrap().active_version, 1);
    std::fs::remove_file(&keys_dir).unwrap();
    std::fs::rename(&moved, &keys_dir).unwrap();
    assert_eq!(f.svc.rotate(&alice(), &k).unwrap().active_version, 2);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Create,
        Wrap(usize),
        Rotate(usize),
        Advance(u16),
        Disable(usize),
        Enable(usize),
        ToggleRotation(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Create),
            4 => any::<usize>().prop_map(Op::Wrap),
            3 => any::<usize>().prop_map(Op::Rotate),
            2 => (1u16..800).prop_map(Op::Advance),
            1 => any::<usize>().prop_map(Op::Disable),
            2 => any::<usize>().prop_map(Op::Enable),
            1 => any::<usize>().prop_map(Op::ToggleRotation),
            1 => Just(Op::Reopen),
        ]
    }

    struct Model {
        keys: Vec<String>,
        /// (key, dek, blob) for every blob ever handed out.
        blobs: Vec<(String, Vec<u8>, Vec<u8>)>,
        /// Material fingerprints per key: versions never change or vanish.
        versions: std::collections::HashMap<String, Vec<(u32, u64)>>,
    }

    fn pick(keys: &[String], i: usize) -> Option<&String> {
        (!keys.is_empty()).then(|| &keys[i % keys.len()])
    }

    fn apply(f: &mut Fixture, m: &mut Model, op: Op) {
        let a = alice();
        match op {
            Op::Create => m
                .keys
                .push(f.svc.create_key(&a, &CreateKey::default()).unwrap().id.to_string()),
            Op::Wrap(i) => {
                if let Some(k) = pick(&m.keys, i) {
                    let dek = (i as u64).to_le_bytes().to_vec();
                    if let Ok(blob) = f.svc.wrap(&a, k, &dek, &Context::new()) {
                        m.blobs.push((k.clone(), dek, blob.blob));
                    }
                }
            }
            Op::Rotate(i) => {
                if let Some(k) = pick(&m.keys, i) {
                    let _ = f.svc.rotate(&a, k);
                }
            }
            Op::Advance(days) => {
                f.clock.advance_days(u64::from(days));
                f.svc.run_due(f.clock.now());
            }
            Op::Disable(i) => {
                if let Some(k) = pick(&m.keys, i) {
                    f.svc.disable_key(&a, k).unwrap();
                }
            }
            Op::Enable(i) => {
                if let Some(k) = pick(&m.keys, i) {
                    f.svc.enable_key(&a, k).unwrap();
                }
            }
            Op::ToggleRotation(i) => {
                if let Some(k) = pick(&m.keys, i) {
                    if f.svc.describe(&a, k).unwrap().rotation.enabled {
                        f.svc.disable_rotation(&a, k).unwrap();
                    } else {
                        f.svc.enable_rotation(&a, k, Some(1 + (i % 400) as u32)).unwrap();
                    }
                }
            }
            Op::Reopen => f.reopen(),
        }
    }

    fn fingerprint(f: &Fixture, k: &str) -> Vec<(u32, u64)> {
        let e = f.svc.entry(k).unwrap();
        e.record
            .versions
            .iter()
            .map(|v| {
                (
                    v.version,
                    u64::from_le_bytes(v.material.expose()[..8].try_into().unwrap()),
                )
            })
            .collect()
    }

    fn check(f: &Fixture, m: &mut Model) {
        let a = alice();
        for k in &m.keys {
            let info = f.svc.describe(&a, k).unwrap();
            let newest = info.versions.iter().map(|v| v.version).max().unwrap();
            assert_eq!(info.active_version, newest, "active = newest");
            let fp = fingerprint(f, k);
            let before = m.versions.entry(k.clone()).or_default();
            assert!(
                fp.len() >= before.len() && fp[..before.len()] == before[..],
                "versions never change or vanish"
            );
            *before = fp;
        }
        for (k, dek, blob) in &m.blobs {
            let info = f.svc.describe(&a, k).unwrap();
            let r = f.svc.unwrap(&a, blob, &Context::new());
            if info.state == KeyState::Enabled {
                assert_eq!(&r.unwrap()[..], &dek[..], "every blob ever returned still unwraps");
            } else {
                assert_eq!(r.unwrap_err().code(), ErrorCode::Disabled);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_keep_invariants(ops in proptest::collection::vec(op(), 1..60)) {
            let mut f = fixture();
            let mut m = Model { keys: Vec::new(), blobs: Vec::new(), versions: Default::default() };
            for op in ops {
                apply(&mut f, &mut m, op);
                check(&f, &mut m);
            }
        }
    }
}

// ---- multi-zone ---------------------------------------------------------

fn zone_b(clock: &Arc<ManualClock>) -> (tempfile::TempDir, KeyService) {
    let dir = crate::testutil::private_dir().unwrap();
    let svc = KeyService::open(dir.path(), RootKey::from_bytes(&[7; 32]), "zone-b", clock.clone()).unwrap();
    (dir, svc)
}

#[test]
fn replica_takes_versions_from_its_primary_durably() {
    let mut f = fixture();
    let (b_dir, b) = zone_b(&f.clock);
    let id = create(&f.svc, "app");
    let uuid: uuid::Uuid = id.parse().unwrap();
    assert_eq!(
        f.svc.begin_replica(&bob(), &id, "zone-b").unwrap_err().code(),
        ErrorCode::PermissionDenied
    );
    let (export, added) = f.svc.begin_replica(&alice(), &id, "zone-b").unwrap();
    assert!(added);
    assert_eq!(b.accept_replica(&export, "zone-a").unwrap().active, 1);
    f.svc.record_confirmed(uuid, "zone-b", 1).unwrap();
    assert!(f.svc.replicas_behind().is_empty());

    let blob = f.svc.wrap(&alice(), "app", b"dek", &ctx(&[])).unwrap();
    assert_eq!(&b.unwrap(&alice(), &blob, &ctx(&[])).unwrap()[..], b"dek");

    f.clock.advance(10);
    f.svc.rotate(&alice(), "app").unwrap();
    assert_eq!(f.svc.replicas_behind(), vec![(uuid, "zone-b".to_string(), Some(1))]);
    let export = f.svc.export_for_replica(uuid, "zone-b").unwrap();
    assert!(f.svc.export_for_replica(uuid, "zone-c").is_err());
    assert_eq!(b.accept_replica(&export, "zone-a").unwrap().active, 2);
    assert_eq!(b.accept_replica(&export, "zone-a").unwrap().active, 2);
    assert!(b.accept_replica(&export, "zone-c").is_err());
    assert_eq!(b.replicas_held(), vec![(uuid, "zone-a".to_string(), 2)]);
    assert_eq!(b.rotate(&alice(), "app").unwrap_err().code(), ErrorCode::NotPrimary);

    // Durable on both sides.
    drop(b);
    let b = KeyService::open(b_dir.path(), RootKey::from_bytes(&[7; 32]), "zone-b", f.clock.clone()).unwrap();
    assert_eq!(
        b.rotations(&alice(), "app").unwrap(),
        f.svc.rotations(&alice(), "app").unwrap()
    );
    f.svc.record_confirmed(uuid, "zone-b", 2).unwrap();
    f.reopen();
    let info = f.svc.describe(&alice(), "app").unwrap();
    assert_eq!(info.role, kms_client::proto::KeyRole::Primary);
    assert_eq!(info.replicas[0].confirmed_version, Some(2));
    // A replica never rotates on its own schedule.
    let due = b.run_due(T0 + 3650 * DAY);
    assert!(due.rotated.iter().all(|(k, _)| *k != uuid), "{due:?}");
}

#[test]
fn a_name_taken_in_the_target_zone_refuses_the_replica() {
    let f = fixture();
    let (_b_dir, b) = zone_b(&f.clock);
    create(&f.svc, "app");
    create(&b, "app");
    let (export, _) = f.svc.begin_replica(&alice(), "app", "zone-b").unwrap();
    assert_eq!(
        b.accept_replica(&export, "zone-a").unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    f.svc.cancel_replica(export.id, "zone-b").unwrap();
    let info = f.svc.describe(&alice(), "app").unwrap();
    assert_eq!(info.role, kms_client::proto::KeyRole::SingleZone);
    assert!(info.replicas.is_empty());
}

mod through_the_store_trait {
    use super::*;
    use crate::keys::store::memory::MemoryBackend;
    use crate::keys::store::Change;

    fn service(backend: &MemoryBackend) -> KeyService {
        let clock = Arc::new(ManualClock::at(T0));
        KeyService::with_store(Arc::new(backend.store()), "zone-a", clock).unwrap()
    }

    fn held(store: &dyn KeyStore, key: &str) -> crate::keys::store::Stored {
        let id: uuid::Uuid = key.parse().unwrap();
        store.get(id).unwrap().expect("the store holds the key")
    }

    #[test]
    fn a_write_that_lost_a_race_reloads_the_key_and_runs_again() {
        let backend = MemoryBackend::new();
        let svc = service(&backend);
        let k = create(&svc, "k");
        let other = backend.store();
        let before = held(&other, &k);
        let mut theirs = before.record.clone();
        theirs.description = "changed by another writer".into();
        other.put(&theirs, Some(before.revision)).unwrap();

        let info = svc.rotate(&alice(), &k).unwrap();
        assert_eq!(info.active_version, 2);
        assert_eq!(
            info.description, "changed by another writer",
            "run on the reloaded record"
        );
        let now = held(&other, &k);
        assert_eq!(
            now.record.description, theirs.description,
            "the other writer's change stands"
        );
        assert_eq!(now.record.versions.len(), 2);
    }

    #[test]
    fn the_manual_rotation_limit_holds_across_writers() {
        let backend = MemoryBackend::new();
        let (a, b) = (service(&backend), service(&backend));
        let k = create(&a, "k");
        b.reload(k.parse().unwrap()).unwrap();
        let mut versions = Vec::new();
        for i in 0..kms_client::proto::MANUAL_ROTATION_LIMIT {
            // Neither follows the other: each write after the other's
            // conflicts first, then runs on the reloaded record.
            let svc = if i % 2 == 0 { &a } else { &b };
            versions.push(svc.rotate(&alice(), &k).unwrap().active_version);
        }
        assert_eq!(versions, (2..=11).collect::<Vec<_>>(), "contiguous, none twice");
        assert_eq!(code(a.rotate(&alice(), &k)), ErrorCode::LimitExceeded);
        assert_eq!(code(b.rotate(&alice(), &k)), ErrorCode::LimitExceeded);
        assert_eq!(held(&backend.store(), &k).record.versions.len(), 11);
    }

    /// Two daemons that both believe they lead (a partition, a lease
    /// about to lapse) run the same due rotation: it happens once.
    #[test]
    fn a_due_rotation_run_by_two_writers_happens_once() {
        let backend = MemoryBackend::new();
        let (a, b) = (service(&backend), service(&backend));
        let req = CreateKey {
            name: Some("daily".into()),
            rotation: Some(Some(1)),
            ..CreateKey::default()
        };
        let k = a.create_key(&alice(), &req).unwrap().id;
        b.reload(k).unwrap();
        let later = T0 + 2 * DAY;
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.run_due(later));
            let tb = s.spawn(|| b.run_due(later));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let ours = |r: &DueReport| r.rotated.iter().filter(|(id, _)| *id == k).count();
        assert_eq!(ours(&ra) + ours(&rb), 1, "{ra:?} {rb:?}");
        assert!(ra.failed.is_empty() && rb.failed.is_empty());
        let held = held(&backend.store(), &k.to_string());
        assert_eq!(held.record.versions.len(), 2);
        // And again, each on a stale keyring: nothing more is due.
        assert!(a.run_due(later).rotated.is_empty() && b.run_due(later).rotated.is_empty());
    }

    #[test]
    fn a_name_another_writer_took_is_an_invalid_argument() {
        let backend = MemoryBackend::new();
        let (a, b) = (service(&backend), service(&backend));
        create(&a, "shared");
        let req = CreateKey {
            name: Some("shared".into()),
            ..CreateKey::default()
        };
        let err = b.create_key(&alice(), &req).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    /// A store whose every write loses to another writer.
    #[derive(Debug)]
    struct AlwaysBeaten(crate::keys::store::memory::MemoryStore, std::sync::atomic::AtomicUsize);

    impl KeyStore for AlwaysBeaten {
        fn load(&self) -> Result<Vec<crate::keys::store::Stored>, StoreError> {
            self.0.load()
        }
        fn get(&self, id: uuid::Uuid) -> Result<Option<crate::keys::store::Stored>, StoreError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.get(id)
        }
        fn put(
            &self,
            record: &crate::keys::model::KeyRecord,
            expected: Option<crate::keys::store::Revision>,
        ) -> Result<crate::keys::store::Revision, StoreError> {
            match expected {
                None => self.0.put(record, None),
                Some(_) => Err(StoreError::Conflict {
                    id: record.id,
                    expected,
                    found: None,
                }),
            }
        }
        fn delete(&self, id: uuid::Uuid, expected: crate::keys::store::Revision) -> Result<(), StoreError> {
            self.0.delete(id, expected)
        }
        fn changes(&self) -> crate::keys::store::ChangeStream {
            self.0.changes()
        }
    }

    #[test]
    fn retries_are_bounded_then_unavailable() {
        let backend = MemoryBackend::new();
        let store = Arc::new(AlwaysBeaten(backend.store(), Default::default()));
        let clock = Arc::new(ManualClock::at(T0));
        let svc = KeyService::with_store(store.clone(), "zone-a", clock).unwrap();
        let k = create(&svc, "k");
        let err = svc.rotate(&alice(), &k).unwrap_err();
        assert!(matches!(err, Error::Unavailable(StoreError::Conflict { .. })), "{err}");
        let reloads = store.1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            reloads,
            super::super::service::MAX_ATTEMPTS - 1,
            "one reload before each new attempt"
        );
        assert_eq!(svc.describe(&alice(), &k).unwrap().active_version, 1);
    }

    #[test]
    fn the_changes_of_other_writers_reach_the_keyring() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let backend = MemoryBackend::new();
        let a = Arc::new(service(&backend));
        let b = service(&backend);
        let stop = tokio_util::sync::CancellationToken::new();
        let follower = rt.spawn(a.clone().follow(stop.clone()));
        let eventually = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !f() {
                assert!(std::time::Instant::now() < deadline, "{what} within 10 s");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let k = create(&b, "k");
        eventually("the new key", &|| a.describe(&alice(), "k").is_ok());
        let blob = b.wrap(&alice(), &k, &[7; 32], &Context::new()).unwrap();
        assert_eq!(&a.unwrap(&alice(), &blob, &Context::new()).unwrap()[..], &[7; 32]);
        b.rotate(&alice(), &k).unwrap();
        eventually("the rotation", &|| {
            a.describe(&alice(), &k).unwrap().active_version == 2
        });
        b.disable_key(&alice(), &k).unwrap();
        b.schedule_deletion(&alice(), &k, Some(7)).unwrap();
        assert_eq!(b.run_due(T0 + 7 * DAY).deleted.len(), 1);
        eventually("the deletion", &|| a.describe(&alice(), &k).is_err());
        stop.cancel();
        rt.block_on(follower).unwrap();
    }

    #[test]
    fn a_change_older_than_the_keyring_is_dropped() {
        let backend = MemoryBackend::new();
        let svc = service(&backend);
        let k = create(&svc, "k");
        let old = held(&backend.store(), &k);
        svc.rotate(&alice(), &k).unwrap();
        svc.apply_change(Change::Put(Box::new(old.clone())));
        assert_eq!(svc.describe(&alice(), &k).unwrap().active_version, 2, "no step back");
        svc.apply_change(Change::Deleted {
            id: old.record.id,
            revision: old.revision,
        });
        assert!(
            svc.describe(&alice(), &k).is_ok(),
            "a delete of an older revision is stale"
        );
    }

    #[test]
    fn a_reload_replaces_what_the_snapshot_knows_and_keeps_what_is_newer() {
        let backend = MemoryBackend::new();
        let svc = service(&backend);
        let gone = create(&svc, "gone");
        let kept = create(&svc, "kept");
        let snapshot = backend.store().load().unwrap();
        let at = snapshot.iter().map(|s| s.revision).max().unwrap();
        let newer = create(&svc, "newer");
        let snapshot: Vec<_> = snapshot
            .into_iter()
            .filter(|s| s.record.id.to_string() != gone)
            .collect();
        svc.apply_change(Change::Reloaded { at, records: snapshot });
        assert!(
            svc.describe(&alice(), &gone).is_err(),
            "absent from the snapshot: deleted"
        );
        assert!(svc.describe(&alice(), &kept).is_ok());
        assert!(
            svc.describe(&alice(), &newer).is_ok(),
            "written after the snapshot: kept"
        );
    }

    #[test]
    fn every_write_is_a_compare_and_swap_on_the_revision_read() {
        let backend = MemoryBackend::new();
        let svc = service(&backend);
        let k = create(&svc, "k");
        for _ in 0..3 {
            svc.rotate(&alice(), &k).unwrap();
        }
        svc.disable_key(&alice(), &k).unwrap();
        svc.schedule_deletion(&alice(), &k, Some(7)).unwrap();
        assert_eq!(svc.run_due(T0 + 7 * DAY).deleted.len(), 1);
        let left: Vec<_> = backend.store().load().unwrap();
        assert_eq!(left.len(), 1, "only the default key is left");
        drop(svc);
        assert_eq!(service(&backend).key_count(), 1, "the default key is not made twice");
    }
}
