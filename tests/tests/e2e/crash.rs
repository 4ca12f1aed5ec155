//! Crash loop: cycles of start kmsd (with a mount), concurrent clients doing
//! the workload of `workload.rs` (keys created, rotated, wrapped,
//! re-encrypted, unwrapped; fsynced file appends), SIGKILL at a
//! random moment, restart, and check that nothing acknowledged was lost:
//! every blob a client was handed unwraps to its DEK, every version a
//! client was told about exists, every fsynced byte is there, and the mount
//! works.
//!
//! `KMS_CRASH_CYCLES` (default 3) sets the number of cycles and
//! `KMS_CRASH_SEED` replays a run; the seed is printed.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kms_client::proto::CreateKey;
use kms_tests::{fuse_available, TestDaemon};

use crate::workload::{seed_from, start_workers, verify, Crash, Rng, Shared};

#[test]
fn crash_loop_loses_nothing_acknowledged() {
    if !fuse_available() {
        return;
    }
    let cycles: u64 = std::env::var("KMS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed = seed_from("KMS_CRASH_SEED");
    println!("crash loop: {cycles} cycles, seed {seed} (replay with KMS_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start_with_mount();
    let mut keys = Vec::new();
    let acked: Shared = Arc::default();
    for cycle in 0..cycles {
        // Fresh keys now and then, since each allows only 10 manual rotations.
        if cycle % 4 == 0 {
            let mut c = d.client();
            for i in 0..3 {
                let name = format!("crash-{cycle}-{i}");
                c.create_key(CreateKey {
                    name: Some(name.clone()),
                    ..Default::default()
                })
                .unwrap();
                keys.push(name);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let workers = start_workers(&d, 4, &keys, &acked, &stop, &mut rng);
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("a worker saw wrong data");
        }
        d.restart();
        verify(&d, &acked.lock().unwrap(), Crash::Kill);
    }
    let a = acked.lock().unwrap();
    assert!(
        !a.blobs.is_empty() && !a.durable.is_empty(),
        "the loop acknowledged no blob or no fsynced write"
    );
    // How often a kill cut a block's write that kept old bytes (the undo
    // journal put them back: fuse/FORMAT.md, "The undo journal").
    let logs = d.logs();
    let undone = logs.matches("undone from the undo journal").count();
    let left = logs.matches("undo journal holds records").count();
    println!(
        "crash loop: {cycles} cycles, {} acknowledged operations, {} blobs and {} files verified, 0 lost; {left} restarts found journal records, {undone} torn block writes undone",
        a.ops,
        a.blobs.len(),
        a.durable.len()
    );
    let _ = File::open(d.mnt());
}

/// fuse/FORMAT.md, "The undo journal", through the real mount process: a
/// kill that cuts the in-place write of a block in the middle (kms-fuse's
/// `tear:file.write-in-place` fault point writes half of it, then SIGKILLs
/// the mount process) loses no byte of the file as it was fsynced, for an
/// append into the final block, an overwrite inside a block, a write past
/// the end and a truncate; the interrupted operation is undone whole.
#[test]
fn a_kill_tearing_a_block_write_loses_no_fsynced_byte() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use crate::names_crash::{daemon_with_faults, wait_remounted};

    if !fuse_available() {
        return;
    }
    let (d, faults, _dir) = daemon_with_faults();
    let old: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
    type Op = fn(&File);
    let ops: [(&str, Op); 4] = [
        ("append into the final block", |f| {
            let _ = f.write_all_at(&[0xEE; 100], 10_000);
        }),
        ("overwrite inside a block", |f| {
            let _ = f.write_all_at(&[0xEE; 50], 100);
        }),
        ("write past the end", |f| {
            let _ = f.write_all_at(&[0xEE; 10], 20_000);
        }),
        ("truncate", |f| {
            let _ = f.set_len(5000);
        }),
    ];
    for (n, (what, op)) in ops.into_iter().enumerate() {
        let path = d.mnt().join(format!("torn{n}"));
        let mut f = File::create(&path).unwrap();
        f.write_all(&old).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let victim = d.mount_pids()[0];
        std::fs::write(&faults, "tear:file.write-in-place\n").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        op(&f);
        drop(f);
        wait_remounted(&d, victim, what);
        assert!(
            std::fs::read_to_string(&faults).unwrap().is_empty(),
            "{what}: the tear point was not reached"
        );
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{what}: {e} after the restart:\n{}", d.logs()));
        assert!(got == old, "{what}: the file is not as fsynced ({} bytes)", got.len());
    }
    let undone = d.logs().matches("undone from the undo journal").count();
    assert_eq!(undone, 4, "each torn write was undone:\n{}", d.logs());
}
