//! Power loss: kmsd's state dir and a mount's backing dir on the LazyFS-style
//! harness of `kms_tests::lazyfs`, which drops everything not made durable
//! by fsync, fdatasync or a directory fsync when the power is cut.
//!
//! First the harness itself (each durability rule, both ways), then kmsd:
//! cycles of clients creating, rotating and wrapping with keys and appending
//! fsynced records through the mount, SIGKILL at a random moment, power
//! cut, restart, and check that every acknowledged key, version and blob and
//! every fsynced byte and name is there. Then the same across two zones,
//! each with its state dir on its own harness (a primary rotating and
//! creating multi-zone keys while it pushes to its replica; every version
//! either zone acknowledged survives, and the replica catches up with
//! identical material), and a power cut in the middle of an `fs rewrap`
//! (every file reads as before, every file the rewrap reported done stays
//! re-wrapped, and a second rewrap finishes the job). Last, the migration
//! of a schema-1 store (the committed fixture): the power goes once it is
//! done, then at random moments of the start, and every key must be there
//! after.
//!
//! Each of these was removed by hand (not committed) and caught: the
//! file fsync in the store's `write_atomic` (store.meta left empty: kmsd
//! refuses to start), its directory fsync (the acknowledged key `fs` is
//! gone; in the replication loop "zone b acknowledged storing key
//! z0de3d0166318f11c (version 1) and lost it in the power cut"),
//! `EncryptedFile::sync` in kms-fuse (fsynced log records gone: EIO), the
//! `fdatasync` of `admin::rewrap_file` (headers back at the old version;
//! in the mid-rewrap loop "the rewrap reported 1 files done before the
//! power cut; after it only 0 are at version 2"), and the backing-directory
//! fsync of kms-fuse's `fsyncdir` (fsynced files lose their names), the
//! fsync of `keys/` after the
//! migration's moves (the store is left at schema 2 with schema-1 files:
//! kmsd refuses to start) and that of the migration's staging directory
//! (the same, when the power goes between the commit and the moves: caught
//! with `KMS_POWER_CYCLES=40`).
//!
//! Removed on one zone's path alone: the directory fsync of the replica's
//! saves (`accept_replica`): "zone b acknowledged storing key
//! z12ce46d62f1713d5 (version 4) and lost it in the power cut"; the file
//! fsync there: zone b refuses to start (its key file "does not
//! authenticate"); the directory fsync of the primary's record of a
//! replica's confirmation (`record_confirmed`): "zone a showed zone b's
//! confirmation of version 3 of z137414ed66b1e0a6; after the power cut it
//! has Some(2)". The last was caught only once each zone that lost power
//! was checked with its peer stopped: before that, the restarted primary's
//! pushes recorded the confirmation again before the check.
//!
//! `KMS_POWER_CYCLES` (default 3) sets the number of cycles of each loop
//! and `KMS_POWER_SEED` replays a run; the seed is printed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::blob::BlobHeader;
use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, ErrorCode, KeyInfo, KeyRole};
use kms_client::ClientError;
use kms_tests::lazyfs::LazyFs;
use kms_tests::{fuse_available, wait_for, DaemonOptions, TestDaemon, CALL_DEADLINE};
use nix::sys::signal::{kill, Signal};
use uuid::Uuid;

use crate::upgrade;
use crate::workload::{seed_from, start_workers, verify, Crash, Rng, Shared};
use crate::zones::{Site, CONVERGE};

/// Cycles of each power-cut loop: `KMS_POWER_CYCLES`, default 3.
fn power_cycles() -> u64 {
    std::env::var("KMS_POWER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn harness() -> Option<LazyFs> {
    fuse_available().then(|| LazyFs::in_temp().expect("mount the power-loss harness"))
}

/// `fsync` of a directory (FUSE `FSYNCDIR` when it is on a FUSE mount).
fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn write_synced(path: &Path, data: &[u8]) -> File {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    f
}

#[test]
fn harness_keeps_fsynced_bytes_and_drops_unsynced_ones() {
    let Some(mut h) = harness() else { return };
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(h.path()),
        mode(h.backing()),
        "the root shows the backing root's mode"
    );
    let a = h.path().join("a");
    let mut f = write_synced(&a, b"durable");
    fsync_dir(h.path());
    f.write_all(b" and lost").unwrap();
    drop(f);
    assert_eq!(fs::read(&a).unwrap(), b"durable and lost", "reads see unsynced writes");
    h.power_cut().unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"durable");
    // fdatasync counts as well.
    let mut f = OpenOptions::new().append(true).open(&a).unwrap();
    f.write_all(b"+more").unwrap();
    f.sync_data().unwrap();
    drop(f);
    h.power_cut().unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"durable+more");
}

#[test]
fn harness_drops_a_name_whose_directory_was_not_fsynced() {
    let Some(mut h) = harness() else { return };
    let root = h.path().to_path_buf();
    write_synced(&root.join("named"), b"x");
    fs::create_dir(root.join("sub")).unwrap();
    fsync_dir(&root);
    // Directory fsynced, file not: the name is, the bytes are not.
    fs::write(root.join("sub/empty"), b"never fsynced").unwrap();
    fsync_dir(&root.join("sub"));
    // File fsynced, directory not (since): the name is not durable.
    write_synced(&root.join("unnamed"), b"y");
    write_synced(&root.join("sub/unnamed"), b"z");
    h.power_cut().unwrap();
    assert_eq!(fs::read(root.join("named")).unwrap(), b"x");
    assert!(!root.join("unnamed").exists(), "name kept without a directory fsync");
    assert!(
        !root.join("sub/unnamed").exists(),
        "name kept without a directory fsync"
    );
    assert_eq!(fs::read(root.join("sub/empty")).unwrap(), b"", "unsynced bytes kept");
}

#[test]
fn harness_undoes_renames_and_unlinks_without_directory_fsync() {
    let Some(mut h) = harness() else { return };
    let root = h.path().to_path_buf();
    write_synced(&root.join("x"), b"old");
    write_synced(&root.join("y"), b"doomed");
    fsync_dir(&root);
    // The atomic-replace pattern, minus its directory fsync.
    write_synced(&root.join("x.tmp"), b"new");
    fs::rename(root.join("x.tmp"), root.join("x")).unwrap();
    fs::remove_file(root.join("y")).unwrap();
    assert_eq!(fs::read(root.join("x")).unwrap(), b"new");
    h.power_cut().unwrap();
    assert_eq!(
        fs::read(root.join("x")).unwrap(),
        b"old",
        "rename survived without a directory fsync"
    );
    assert!(!root.join("x.tmp").exists());
    assert_eq!(
        fs::read(root.join("y")).unwrap(),
        b"doomed",
        "unlink survived without a directory fsync"
    );
    // With the directory fsync both stick.
    write_synced(&root.join("x.tmp"), b"new");
    fs::rename(root.join("x.tmp"), root.join("x")).unwrap();
    fs::remove_file(root.join("y")).unwrap();
    fsync_dir(&root);
    h.power_cut().unwrap();
    assert_eq!(fs::read(root.join("x")).unwrap(), b"new");
    assert!(!root.join("x.tmp").exists() && !root.join("y").exists());
    // A rename across directories needs the target's fsync for the new
    // name and the source's for the old one to go.
    fs::create_dir(root.join("d")).unwrap();
    fsync_dir(&root);
    fs::rename(root.join("x"), root.join("d/x")).unwrap();
    fsync_dir(&root.join("d"));
    h.power_cut().unwrap();
    assert_eq!(fs::read(root.join("d/x")).unwrap(), b"new");
    assert!(
        root.join("x").exists(),
        "the source was not fsynced: the old name stays"
    );
}

#[test]
fn harness_undoes_a_truncate_without_fsync() {
    let Some(mut h) = harness() else { return };
    let p = h.path().join("t");
    let f = write_synced(&p, b"0123456789");
    fsync_dir(h.path());
    f.set_len(3).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"012");
    drop(f);
    h.power_cut().unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"0123456789", "truncate survived without fsync");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(3).unwrap();
    f.sync_all().unwrap();
    f.set_len(20).unwrap();
    drop(f);
    h.power_cut().unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"012");
}

/// SIGKILL kmsd, detach its dead mount, then cut the power of each harness.
fn kill_and_cut(d: &mut TestDaemon, harnesses: &mut [&mut LazyFs]) {
    d.kill9();
    if kms_tests::is_mounted(&d.mnt()) {
        nix::mount::umount2(&d.mnt(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    for h in harnesses {
        h.power_cut().expect("power cut");
    }
}

#[test]
fn power_cut_loses_nothing_acknowledged() {
    let (Some(mut state), Some(mut data)) = (harness(), harness()) else {
        return;
    };
    let cycles = power_cycles();
    let seed = seed_from("KMS_POWER_SEED");
    println!("power loop: {cycles} cycles, seed {seed} (replay with KMS_POWER_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start_with_mount_opts(DaemonOptions {
        state_dir: Some(state.path().to_path_buf()),
        data_dir: Some(data.path().to_path_buf()),
        ..DaemonOptions::default()
    });
    let acked: Shared = Arc::default();
    let mut keys = Vec::new();
    for cycle in 0..cycles {
        // New keys every cycle (creation is under test too; each key also
        // allows only 10 manual rotations).
        {
            let mut c = d.client();
            for i in 0..2 {
                let name = format!("power-{cycle}-{i}");
                c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                })
                .unwrap();
                acked.lock().unwrap().versions.insert(name.clone(), 1);
                keys.push(name);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let workers = start_workers(&d, 2, &keys, &acked, &stop, &mut rng);
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        stop.store(true, Ordering::Relaxed);
        kill_and_cut(&mut d, &mut [&mut state, &mut data]);
        for w in workers {
            w.join().expect("a worker saw wrong data");
        }
        d.restart();
        verify(&d, &acked.lock().unwrap(), Crash::Power);
    }
    let a = acked.lock().unwrap();
    let (s, b) = (state.stats(), data.stats());
    assert!(s.fsyncs > 0 && s.fsyncdirs > 0, "kmsd never fsynced its state: {s:?}");
    assert!(
        b.fsyncs > 0 && b.fsyncdirs > 0,
        "the mount never fsynced its backing dir: {b:?}"
    );
    assert!(!a.blobs.is_empty() && !a.durable.is_empty(), "nothing acknowledged");
    println!(
        "power loop: {cycles} cycles in {:?}, {} acknowledged operations, {} keys, {} blobs, {} files verified; \
         state harness {s:?}, data harness {b:?}",
        started.elapsed(),
        a.ops,
        a.versions.len(),
        a.blobs.len(),
        a.durable.len()
    );
}

#[test]
fn power_cut_keeps_what_the_mount_fsynced_and_fsyncdir_names() {
    let Some(mut data) = harness() else { return };
    let mut d = TestDaemon::start_with_mount_opts(DaemonOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..DaemonOptions::default()
    });
    let mnt = d.mnt();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    // Bytes: a file with a durable name, fsynced, then more not fsynced.
    let mut f = write_synced(&mnt.join("kept"), &big);
    fsync_dir(&mnt);
    f.write_all(b"tail never fsynced").unwrap();
    drop(f);
    // Names: in a subdirectory, made durable by fsyncdir through the mount.
    fs::create_dir(mnt.join("sub")).unwrap();
    fsync_dir(&mnt);
    write_synced(&mnt.join("sub/named"), b"named and fsynced");
    fsync_dir(&mnt.join("sub"));
    // Control: fsynced, but its directory never was.
    write_synced(&mnt.join("sub/unnamed"), b"fsynced, directory not");
    kill_and_cut(&mut d, &mut [&mut data]);
    d.restart();
    assert_eq!(
        fs::read(mnt.join("kept")).unwrap(),
        big,
        "fsynced bytes lost or unsynced ones kept"
    );
    assert_eq!(fs::read(mnt.join("sub/named")).unwrap(), b"named and fsynced");
    assert!(
        !mnt.join("sub/unnamed").exists(),
        "a name survived without a directory fsync: the harness is not in the way"
    );
    assert!(data.stats().fsyncdirs >= 3, "{:?}", data.stats());
}

#[test]
fn power_cut_right_after_a_mount_starts_keeps_its_name_key_file() {
    let Some(mut data) = harness() else { return };
    let mut d = TestDaemon::start_with_mount_opts(DaemonOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..DaemonOptions::default()
    });
    // The mount made kmsd.names in the empty backing directory; nothing
    // else fsyncs that directory before the power goes.
    let root_file = data.path().join(kms_fuse::names::ROOT_FILE);
    let made = fs::read(&root_file).expect("kmsd.names made");
    let before = data.stats();
    kill_and_cut(&mut d, &mut [&mut data]);
    assert_eq!(
        fs::read(&root_file).ok(),
        Some(made),
        "the name key file did not survive the power cut ({before:?})"
    );
    d.restart();
    fs::write(d.mnt().join("after"), b"a").unwrap();
    assert_eq!(fs::read(d.mnt().join("after")).unwrap(), b"a");
    assert_eq!(crate::only_encrypted_file(&d.data()).parent(), Some(d.data().as_path()));
}

#[test]
fn power_cut_keeps_an_acknowledged_rewrap() {
    let Some(mut data) = harness() else { return };
    let mut d = TestDaemon::start_with_mount_opts(DaemonOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..DaemonOptions::default()
    });
    let mnt = d.mnt();
    let target = mnt.to_str().unwrap().to_string();
    let files: Vec<(PathBuf, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                mnt.join(format!("f{i}")),
                format!("file {i} ").repeat(1000).into_bytes(),
            )
        })
        .collect();
    for (p, body) in &files {
        write_synced(p, body);
    }
    fsync_dir(&mnt);
    let mut c = d.client();
    let v = c.rotate_key("fs").unwrap().expect("rotated").active_version;
    let r = c.fs_rewrap(&target).unwrap();
    assert_eq!((r.rewrapped, r.failed), (5, 0), "{r:?}");
    assert_eq!(c.fs_versions(&target).unwrap().counts, vec![(v, 5)]);
    drop(c);
    kill_and_cut(&mut d, &mut [&mut data]);
    d.restart();
    let info = d.client().fs_versions(&target).unwrap();
    assert_eq!(
        info.counts,
        vec![(v, 5)],
        "a rewrap kmsd acknowledged was undone by the power cut"
    );
    for (p, body) in &files {
        assert_eq!(&fs::read(p).unwrap(), body);
    }
}

// ---- A power cut during replication -----------------------------------------

/// What the clients of the replication loop were told: by the primary
/// (zone a) and, relayed by it, by the replica (zone b).
#[derive(Default)]
struct ZoneAcked {
    /// Highest version the primary reported for each key (1 at creation).
    versions: BTreeMap<String, u32>,
    /// Highest version of each key that zone b acknowledged as stored: 1
    /// once `key replicate` answered (the first push was acknowledged),
    /// then the `confirmed_version` of zone b that `key describe` on the
    /// primary showed (recorded from b's acknowledgement of a push, which
    /// b sends once the version is in its store).
    replica: BTreeMap<String, u32>,
    /// (blob, dek) of every wrap the primary answered.
    blobs: Vec<(Vec<u8>, Vec<u8>)>,
    ops: u64,
}

type ZoneShared = Arc<Mutex<ZoneAcked>>;

fn connect(socket: &Path) -> Option<BlockingClient> {
    let c = BlockingClient::connect(socket).ok()?;
    c.set_read_timeout(Some(CALL_DEADLINE)).ok()?;
    Some(c)
}

fn wrap_one(c: &mut BlockingClient, key: &str, acked: &ZoneShared, rng: &mut Rng) -> Result<(), ClientError> {
    let dek = rng.next().to_le_bytes().repeat(4);
    let blob = c.wrap(key, &dek, &Context::new())?;
    acked.lock().unwrap().blobs.push((blob, dek));
    Ok(())
}

/// A client of the primary: rotates the keys in `mine` (no other thread
/// rotates them, and each rotation is followed by a wrap under the new
/// version, so every version of every key gets a blob), wraps with any key,
/// and creates keys and replicates them to zone b.
fn zone_worker(
    socket: PathBuf,
    mut mine: Vec<String>,
    mut all: Vec<String>,
    acked: ZoneShared,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) {
    let Some(mut c) = connect(&socket) else { return };
    while !stop.load(Ordering::Relaxed) {
        let result = match rng.below(10) {
            0..=2 if !mine.is_empty() => {
                let key = mine[rng.below(mine.len() as u64) as usize].clone();
                c.rotate_key(&key).and_then(|k| {
                    if let Some(k) = k {
                        let mut a = acked.lock().unwrap();
                        let v = a.versions.entry(key.clone()).or_default();
                        *v = (*v).max(k.active_version);
                    }
                    wrap_one(&mut c, &key, &acked, &mut rng)
                })
            }
            3 => {
                let name = format!("z{:016x}", rng.next());
                let create = c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                });
                create.and_then(|_| {
                    acked.lock().unwrap().versions.insert(name.clone(), 1);
                    wrap_one(&mut c, &name, &acked, &mut rng)?;
                    match c.replicate_key(&name, "b") {
                        Ok(_) => {
                            acked.lock().unwrap().replica.entry(name.clone()).or_insert(1);
                            mine.push(name.clone());
                            all.push(name);
                            Ok(())
                        }
                        // Zone b is down (its daemon alone was killed):
                        // nothing acknowledged, the key stays single-zone.
                        Err(e) if e.code() == Some(ErrorCode::Unavailable) => Ok(()),
                        Err(e) => Err(e),
                    }
                })
            }
            _ => {
                let key = all[rng.below(all.len() as u64) as usize].clone();
                wrap_one(&mut c, &key, &acked, &mut rng)
            }
        };
        match result {
            Ok(()) => acked.lock().unwrap().ops += 1,
            Err(e) if e.code() == Some(ErrorCode::LimitExceeded) => {}
            Err(e) if e.is_connection_error() => return,
            Err(e) => panic!("the primary refused an operation on acknowledged state: {e}"),
        }
    }
}

/// Records, from `key describe` on the primary, the highest version zone b
/// has confirmed of each key.
fn confirmation_watcher(socket: PathBuf, acked: ZoneShared, stop: Arc<AtomicBool>) {
    let Some(mut c) = connect(&socket) else { return };
    while !stop.load(Ordering::Relaxed) {
        let keys: Vec<String> = acked.lock().unwrap().versions.keys().cloned().collect();
        for key in keys {
            let info = match c.describe_key(&key) {
                Ok(info) => info,
                Err(e) if e.is_connection_error() => return,
                Err(e) => panic!("the primary cannot describe acknowledged key {key}: {e}"),
            };
            let confirmed = info
                .replicas
                .iter()
                .find(|r| r.zone == "b")
                .and_then(|r| r.confirmed_version);
            if let Some(v) = confirmed {
                let mut a = acked.lock().unwrap();
                let held = a.replica.entry(key).or_default();
                *held = (*held).max(v);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn expect_dek(c: &mut BlockingClient, blob: &[u8], dek: &[u8], zone: &str) {
    let h = BlobHeader::parse(blob).unwrap();
    let plain = c.unwrap(blob, &Context::new()).unwrap_or_else(|e| {
        panic!(
            "zone {zone}: a blob of version {} of key {} does not unwrap after the power cut: {e}",
            h.version, h.key_id
        )
    });
    assert_eq!(
        &plain[..],
        dek,
        "zone {zone}: version {} of key {} has other material",
        h.version,
        h.key_id
    );
}

/// Zone b, before its primary can push to it or answer its pulls: every
/// key and version it acknowledged as stored is there, and every blob of
/// those versions unwraps.
fn check_replica(b: &TestDaemon, acked: &ZoneAcked) {
    let mut c = b.client();
    let mut held = HashMap::new();
    for (key, &v) in &acked.replica {
        let info = c.describe_key(key).unwrap_or_else(|e| {
            panic!("zone b acknowledged storing key {key} (version {v}) and lost it in the power cut: {e}")
        });
        assert_eq!(
            info.role,
            KeyRole::Replica {
                primary_zone: "a".into()
            },
            "{key}"
        );
        assert!(
            info.active_version >= v,
            "zone b acknowledged storing version {v} of key {key}; after the power cut it has {}",
            info.active_version
        );
        held.insert(info.id, v);
    }
    for (blob, dek) in &acked.blobs {
        let h = BlobHeader::parse(blob).unwrap();
        if held.get(&h.key_id).is_some_and(|&v| h.version <= v) {
            expect_dek(&mut c, blob, dek, "b");
        }
    }
}

/// Zone a: every key and version it acknowledged, every blob it wrapped,
/// and every confirmation of zone b it showed.
fn check_primary(a: &TestDaemon, acked: &ZoneAcked) {
    let mut c = a.client();
    for (key, &v) in &acked.versions {
        let info = c
            .describe_key(key)
            .unwrap_or_else(|e| panic!("zone a acknowledged key {key} and lost it in the power cut: {e}"));
        assert!(
            info.active_version >= v,
            "zone a acknowledged version {v} of key {key}; after the power cut it has {}",
            info.active_version
        );
        if let Some(&confirmed) = acked.replica.get(key) {
            assert_eq!(info.role, KeyRole::Primary, "{key} was replicated to zone b");
            let now = info
                .replicas
                .iter()
                .find(|r| r.zone == "b")
                .and_then(|r| r.confirmed_version);
            assert!(
                now >= Some(confirmed),
                "zone a showed zone b's confirmation of version {confirmed} of {key}; after the power cut it has {now:?}"
            );
        }
    }
    for (blob, dek) in &acked.blobs {
        expect_dek(&mut c, blob, dek, "a");
    }
}

/// What zone b still lacks of the multi-zone keys `primaries` of zone a:
/// a key whose rotation history differs, or whose active version zone a
/// has not recorded as confirmed by b. Empty once replication caught up.
fn lagging(a: &TestDaemon, b: &TestDaemon, primaries: &[Uuid]) -> Vec<String> {
    let (Some(mut ca), Some(mut cb)) = (connect(&a.socket), connect(&b.socket)) else {
        return vec!["a daemon does not answer".into()];
    };
    let mut out = Vec::new();
    for id in primaries {
        let key = id.to_string();
        let (Ok(info), Ok(ha)) = (ca.describe_key(&key), ca.list_rotations(&key)) else {
            out.push(format!("{key}: zone a does not answer"));
            continue;
        };
        match cb.list_rotations(&key) {
            Ok(hb) if hb == ha => {}
            Ok(hb) => {
                out.push(format!("{key}: zone b holds {} of {} versions", hb.len(), ha.len()));
                continue;
            }
            Err(e) => {
                out.push(format!("{key}: zone b: {e}"));
                continue;
            }
        }
        let confirmed = info
            .replicas
            .iter()
            .find(|r| r.zone == "b")
            .and_then(|r| r.confirmed_version);
        if confirmed != Some(info.active_version) {
            out.push(format!(
                "{key}: zone a records b at {confirmed:?} of {}",
                info.active_version
            ));
        }
    }
    out
}

/// Waits (at most [`CONVERGE`]) until zone b holds every version of every
/// multi-zone key of zone a and a recorded it; then checks the material:
/// a blob of every version, wrapped on a, unwraps on b to the same key, and
/// a blob wrapped on b unwraps on a. Returns the keys checked and the wait.
fn converge(a: &TestDaemon, b: &TestDaemon, acked: &ZoneShared, rng: &mut Rng) -> (usize, Duration) {
    let primaries: Vec<KeyInfo> = a
        .client()
        .list_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.role == KeyRole::Primary)
        .collect();
    let ids: Vec<Uuid> = primaries.iter().map(|k| k.id).collect();
    let started = Instant::now();
    let caught_up = wait_for(CONVERGE, || lagging(a, b, &ids).is_empty().then_some(()));
    let waited = started.elapsed();
    assert!(
        caught_up.is_some(),
        "replication did not catch up within {CONVERGE:?} after the restart; still waiting for: {:?}\nzone a:\n{}\nzone b:\n{}",
        lagging(a, b, &ids),
        a.logs(),
        b.logs()
    );
    let (mut ca, mut cb) = (a.client(), b.client());
    // A blob of the active version too (a rotation whose answer the cut
    // swallowed has no blob yet).
    for k in &primaries {
        wrap_one(&mut ca, &k.id.to_string(), acked, rng).unwrap();
    }
    let acked = acked.lock().unwrap();
    let mut covered: HashMap<Uuid, BTreeSet<u32>> = HashMap::new();
    for (blob, dek) in &acked.blobs {
        let h = BlobHeader::parse(blob).unwrap();
        if ids.contains(&h.key_id) {
            covered.entry(h.key_id).or_default().insert(h.version);
            expect_dek(&mut cb, blob, dek, "b");
        }
    }
    for k in &primaries {
        let active = ca.describe_key(&k.id.to_string()).unwrap().active_version;
        let have = covered.get(&k.id).cloned().unwrap_or_default();
        assert!(
            (1..=active).all(|v| have.contains(&v)),
            "key {}: versions 1..={active}, blobs only of {have:?}",
            k.id
        );
        let dek = rng.next().to_le_bytes().repeat(4);
        let blob = cb.wrap(&k.id.to_string(), &dek, &Context::new()).unwrap();
        expect_dek(&mut ca, &blob, &dek, "a");
    }
    (primaries.len(), waited)
}

/// Runs `f` with the (running) daemon `d` stopped by SIGSTOP, if `stop`.
fn with_stopped(d: &TestDaemon, stop: bool, f: impl FnOnce()) {
    if stop {
        kill(d.pid(), Signal::SIGSTOP).unwrap();
    }
    f();
    if stop {
        kill(d.pid(), Signal::SIGCONT).unwrap();
    }
}

/// Which daemons a cycle of the replication loop kills (and whose state
/// dir loses power).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Both,
    Primary,
    Replica,
}

#[test]
fn power_cut_during_replication_loses_nothing_either_zone_acknowledged() {
    let (Some(mut sa), Some(mut sb)) = (harness(), harness()) else {
        return;
    };
    let cycles = power_cycles();
    let seed = seed_from("KMS_POWER_SEED");
    println!("replication power loop: {cycles} cycles, seed {seed} (replay with KMS_POWER_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let site = Site::new();
    let start = |zone: &str, state: &LazyFs| {
        let mut opts = site.options(zone, &["a", "b"]);
        opts.state_dir = Some(state.path().to_path_buf());
        TestDaemon::start_with(opts)
    };
    let mut a = start("a", &sa);
    let mut b = start("b", &sb);
    let acked: ZoneShared = Arc::default();
    let mut waited = Duration::ZERO;
    let first = rng.below(3);
    for cycle in 0..cycles {
        // Fresh multi-zone keys every cycle (each allows 10 manual
        // rotations), with a blob of version 1.
        {
            let mut c = a.client();
            for i in 0..2 {
                let name = format!("zone-{cycle}-{i}");
                c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                })
                .unwrap();
                acked.lock().unwrap().versions.insert(name.clone(), 1);
                wrap_one(&mut c, &name, &acked, &mut rng).unwrap();
                c.replicate_key(&name, "b").unwrap();
                acked.lock().unwrap().replica.insert(name, 1);
            }
        }
        let keys: Vec<String> = acked.lock().unwrap().replica.keys().cloned().collect();
        let before = acked.lock().unwrap().ops;
        let (stop, watched) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let mut threads = Vec::new();
        for w in 0..2 {
            let mine = keys.iter().skip(w).step_by(2).cloned().collect();
            let (s, all, ac, st, r) = (
                a.socket.clone(),
                keys.clone(),
                acked.clone(),
                stop.clone(),
                Rng(rng.next() | 1),
            );
            threads.push(std::thread::spawn(move || zone_worker(s, mine, all, ac, st, r)));
        }
        let (s, ac, st) = (a.socket.clone(), acked.clone(), watched.clone());
        let watcher = std::thread::spawn(move || confirmation_watcher(s, ac, st));
        let busy = wait_for(Duration::from_secs(30), || {
            (acked.lock().unwrap().ops > before).then_some(())
        });
        assert!(busy.is_some(), "no operation acknowledged in 30 s");
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        // Each kind of cut in turn, from a random first one.
        let cut = [Cut::Both, Cut::Primary, Cut::Replica][((first + cycle) % 3) as usize];
        stop.store(true, Ordering::Relaxed);
        // Half the time the clients stop first and the cut comes while the
        // primary is still pushing their last rotations and recording the
        // confirmations (which the watcher sees).
        let drain = rng.below(2) == 0;
        if drain {
            for t in threads.drain(..) {
                t.join().expect("a client saw wrong data");
            }
            std::thread::sleep(Duration::from_millis(rng.below(100)));
        }
        watched.store(true, Ordering::Relaxed);
        match cut {
            Cut::Both if rng.below(2) == 0 => {
                a.kill9();
                b.kill9();
            }
            Cut::Both => {
                b.kill9();
                a.kill9();
            }
            Cut::Primary => a.kill9(),
            Cut::Replica => b.kill9(),
        }
        for t in threads.into_iter().chain([watcher]) {
            t.join().expect("a client saw wrong data");
        }
        if cut != Cut::Replica {
            sa.power_cut().expect("power cut of zone a");
        }
        // Each zone that lost power is checked while the other cannot talk
        // to it (down, or stopped with SIGSTOP): what it acknowledged must
        // come from its own store, not from catching up.
        if cut != Cut::Primary {
            sb.power_cut().expect("power cut of zone b");
            with_stopped(&a, cut == Cut::Replica, || {
                b.restart();
                check_replica(&b, &acked.lock().unwrap());
            });
        }
        if cut != Cut::Replica {
            with_stopped(&b, true, || {
                a.restart();
                check_primary(&a, &acked.lock().unwrap());
            });
        } else {
            check_primary(&a, &acked.lock().unwrap());
        }
        let (n, w) = converge(&a, &b, &acked, &mut rng);
        waited += w;
        println!(
            "replication power loop: cycle {cycle} cut {cut:?}{}; waited {w:?} for zone b to hold every \
             version of {n} multi-zone keys and zone a to record it",
            if drain {
                " after the clients stopped"
            } else {
                " among busy clients"
            }
        );
    }
    let ac = acked.lock().unwrap();
    let (s, t) = (sa.stats(), sb.stats());
    assert!(s.fsyncs > 0 && s.fsyncdirs > 0, "zone a never fsynced its state: {s:?}");
    assert!(t.fsyncs > 0 && t.fsyncdirs > 0, "zone b never fsynced its state: {t:?}");
    println!(
        "replication power loop: {cycles} cycles in {:?} ({waited:?} waiting for replication), {} acknowledged \
         operations, {} keys, {} replicated ({} versions acknowledged by zone b), {} blobs; zone a harness {s:?}, \
         zone b harness {t:?}",
        started.elapsed(),
        ac.ops,
        ac.versions.len(),
        ac.replica.len(),
        ac.replica.values().map(|&v| u64::from(v)).sum::<u64>(),
        ac.blobs.len()
    );
}

// ---- A power cut in the middle of a rewrap ----------------------------------

/// 200 files under version 1 on a mount, then per cycle: rotate the mount's
/// key, start `fs rewrap`, and cut the power at a random file while it
/// runs. Every file must read as before (its header at either version),
/// every file the rewrap reported done must stay at the new version, and a
/// second rewrap must move exactly the rest.
#[test]
fn power_cut_during_a_rewrap_keeps_every_file() {
    const FILES: u64 = 200;
    let (Some(mut state), Some(mut data)) = (harness(), harness()) else {
        return;
    };
    // The fs key allows 10 manual rotations, one per cycle.
    let cycles = power_cycles().min(10);
    let seed = seed_from("KMS_POWER_SEED");
    println!("rewrap power loop: {cycles} cycles, seed {seed} (replay with KMS_POWER_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start_with_mount_opts(DaemonOptions {
        state_dir: Some(state.path().to_path_buf()),
        data_dir: Some(data.path().to_path_buf()),
        ..DaemonOptions::default()
    });
    let mnt = d.mnt();
    let target = mnt.to_str().unwrap().to_string();
    let files: Vec<(PathBuf, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let len = rng.below(9000) as usize;
            let body = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
            (mnt.join(format!("f{i:03}")), body)
        })
        .collect();
    for (p, body) in &files {
        write_synced(p, body);
    }
    fsync_dir(&mnt);
    assert_eq!(d.client().fs_versions(&target).unwrap().counts, vec![(1, FILES)]);
    let mut mid_run = 0;
    for cycle in 0..cycles {
        let v = d.client().rotate_key("fs").unwrap().expect("rotated").active_version;
        // Cut once `at` headers have been written and the first progress
        // frame has come (or when the rewrap ended first). Counting writes,
        // not syncs, keeps the cut in the middle when a sync is missing.
        let at = 1 + rng.below(FILES * 3 / 4);
        let base = data.stats().writes;
        let reported = Arc::new(AtomicU64::new(0));
        let (socket, t, r) = (d.socket.clone(), target.clone(), reported.clone());
        let call = std::thread::spawn(move || {
            let mut c = connect(&socket).expect("connect to kmsd");
            c.fs_rewrap_with_progress(&t, |done, _| {
                r.fetch_max(done, Ordering::SeqCst);
            })
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while (data.stats().writes < base + at || reported.load(Ordering::SeqCst) == 0) && !call.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the rewrap made no progress in 60 s\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let written = data.stats().writes - base;
        kill_and_cut(&mut d, &mut [&mut state, &mut data]);
        let finished = match call.join().unwrap() {
            Ok(_) => true,
            Err(e) if e.is_connection_error() => false,
            Err(e) => panic!("the rewrap failed before the cut: {e}"),
        };
        mid_run += u64::from(!finished);
        // Files the rewrap reported done, by its progress frames, before
        // the cut (the final answer reports all of them).
        let reported = reported.load(Ordering::SeqCst);
        d.restart();
        let info = d.client().fs_versions(&target).unwrap();
        let at_new = info.counts.iter().find(|c| c.0 == v).map_or(0, |c| c.1);
        assert_eq!(info.unreadable, 0, "a header was torn by the cut: {info:?}");
        assert_eq!(info.counts.iter().map(|c| c.1).sum::<u64>(), FILES, "{info:?}");
        assert!(
            at_new >= reported,
            "the rewrap reported {reported} files done before the power cut; after it only {at_new} are at \
             version {v}: {info:?}"
        );
        for (p, body) in &files {
            let got = fs::read(p).unwrap_or_else(|e| panic!("{}: {e} after a cut rewrap", p.display()));
            assert!(&got == body, "{}: content changed by a cut rewrap", p.display());
        }
        let r = d.client().fs_rewrap(&target).unwrap();
        assert_eq!(
            (r.rewrapped, r.already_current, r.failed),
            (FILES - at_new, at_new, 0),
            "the second rewrap"
        );
        assert_eq!(d.client().fs_versions(&target).unwrap().counts, vec![(v, FILES)]);
        println!(
            "rewrap power loop: cycle {cycle}: cut after {written} header writes{}, {reported} reported done, \
             {at_new} of {FILES} at version {v} after the cut; the second rewrap moved the rest",
            if finished { " (the rewrap had finished)" } else { "" }
        );
    }
    for (p, body) in &files {
        assert!(&fs::read(p).unwrap() == body, "{}", p.display());
    }
    assert!(cycles == 0 || mid_run > 0, "no cut came in the middle of a rewrap");
    println!(
        "rewrap power loop: {cycles} cycles in {:?}, {mid_run} cut mid-rewrap; data harness {:?}",
        started.elapsed(),
        data.stats()
    );
}

/// Empties the harness and puts the schema-1 fixture's state in it,
/// durably.
fn reset_to_store_v1(h: &LazyFs) {
    for e in fs::read_dir(h.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    upgrade::copy_tree(&upgrade::fixture().join("state"), h.path(), 0o700, 0o600);
}

/// How far a migration had come when the power went: what `store.meta`
/// says and whether the staging directory is there.
fn migration_phase(state: &Path) -> &'static str {
    let meta = fs::read(state.join("store.meta")).unwrap_or_default();
    let staging = state.join("keys.schema2").exists();
    match (meta.starts_with(b"KMSDMETA"), staging) {
        (false, false) => "not started",
        (false, true) => "staged, not committed",
        (true, true) => "committed, not moved",
        (true, false) => "done",
    }
}

#[test]
fn power_cut_during_or_after_a_store_migration_loses_no_key() {
    let Some(mut state) = harness() else { return };
    let m = upgrade::manifest();
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().join("root-key");
    upgrade::copy_root_key(&root);
    let cycles: u64 = std::env::var("KMS_POWER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed = seed_from("KMS_POWER_SEED");
    println!("migration power loop: {cycles} cycles, seed {seed} (replay with KMS_POWER_SEED={seed})");
    let mut rng = Rng(seed);

    // Migrated and serving, then the power goes.
    reset_to_store_v1(&state);
    let mut d = TestDaemon::start_with(upgrade::options(&m, state.path(), &root));
    d.kill9();
    state.power_cut().unwrap();
    d.restart();
    upgrade::check_keys(&d, &m);

    // The power goes at a random moment of the start, often mid-migration.
    let mut phases = Vec::new();
    for _ in 0..cycles {
        d.kill9();
        reset_to_store_v1(&state);
        let mut child = d.command().spawn().expect("start kmsd");
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        let _ = child.kill();
        child.wait().unwrap();
        state.power_cut().unwrap();
        phases.push(migration_phase(state.path()));
        d.restart();
        upgrade::check_keys(&d, &m);
    }
    println!("migration power loop: the power went at {phases:?}");
}
