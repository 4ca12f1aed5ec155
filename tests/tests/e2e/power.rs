//! Power loss: kmsd's state dir and a mount's backing dir on the LazyFS-style
//! harness of `kms_tests::lazyfs`, which drops everything not made durable
//! by fsync, fdatasync or a directory fsync when the power is cut.
//!
//! First the harness itself (each durability rule, both ways), then kmsd:
//! cycles of clients creating, rotating and wrapping with keys and appending
//! fsynced records through the mount, SIGKILL at a random moment, power
//! cut, restart, and check that every acknowledged key, version and blob and
//! every fsynced byte and name is there. Last, the migration of a schema-1
//! store (the committed fixture): the power goes once it is done, then at
//! random moments of the start, and every key must be there after.
//!
//! Each of these was removed by hand (not committed) and caught: the
//! file fsync in the store's `write_atomic` (store.meta left empty: kmsd
//! refuses to start), its directory fsync (the acknowledged key `fs` is
//! gone), `EncryptedFile::sync` in kms-fuse (fsynced log records gone: EIO),
//! the `fdatasync` of `admin::rewrap_file` (headers back at the old
//! version), and the backing-directory fsync of kms-fuse's `fsyncdir`
//! (fsynced files lose their names), the fsync of `keys/` after the
//! migration's moves (the store is left at schema 2 with schema-1 files:
//! kmsd refuses to start) and that of the migration's staging directory
//! (the same, when the power goes between the commit and the moves: caught
//! with `KMS_POWER_CYCLES=40`).
//!
//! `KMS_POWER_CYCLES` (default 3) sets the number of cycles and
//! `KMS_POWER_SEED` replays a run; the seed is printed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::proto::CreateKey;
use kms_tests::lazyfs::LazyFs;
use kms_tests::{fuse_available, DaemonOptions, TestDaemon};

use crate::upgrade;
use crate::workload::{seed_from, start_workers, verify, Rng, Shared};

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
    let cycles: u64 = std::env::var("KMS_POWER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
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
        verify(&d, &acked.lock().unwrap());
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
