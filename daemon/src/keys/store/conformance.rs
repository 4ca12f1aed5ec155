//! The conformance suite of [`KeyStore`]: what the key service relies on,
//! checked on any implementation through a [`Harness`].
//!
//! - durability: what a write acknowledged is there after a restart, with
//!   its revision;
//! - compare-and-swap: a create of an existing record, a write or delete
//!   with a stale revision, or one of an absent record, fails with
//!   `Conflict` and changes nothing; of concurrent writers with the same
//!   revision exactly one wins; revisions grow; `get` reads one record;
//! - names: with several writers, a create of a name another record holds
//!   fails with `NameTaken` (one writer's names are the service's job);
//! - atomicity: a write cut off at any point the harness can simulate
//!   leaves the old record or the new one, never a mix, and the store goes
//!   on;
//! - the change stream: another writer's changes arrive, the store's own
//!   do not; a single-writer store's stream never yields;
//! - bounds: a record over [`MAX_RECORD_LEN`] is refused and not stored.
//!
//! Run it with `key_store_conformance!(make_harness())`, which writes one
//! test per check; the file store does so in its tests.

use std::fmt::Debug;
use std::sync::Barrier;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kms_client::proto::KeyKind;
use uuid::Uuid;

use super::{Change, KeyStore, Revision, StoreError, Stored, MAX_RECORD_LEN};
use crate::keys::material::Material;
use crate::keys::model::{KeyRecord, KeyVersion, RotationSchedule};

/// One backend of a store under test.
pub trait Harness {
    /// The store.
    type Store: KeyStore;
    /// A point at which the backend can stop a write as a crash would.
    type Crash: Copy + Debug;

    /// Opens the store on this backend: empty the first time; later, as a
    /// restarted process finds it (the previous handle has been dropped).
    fn open(&mut self) -> Self::Store;

    /// The crash points this backend can simulate; none where a write is
    /// atomic by construction (e.g. one transaction).
    fn crash_points(&self) -> Vec<Self::Crash>;

    /// Makes the next `put` on `store` stop at `point`, as if the process
    /// died there.
    fn arm_crash(&self, store: &Self::Store, point: Self::Crash);

    /// A second writer on the same backend while `first` is open; `None`
    /// for a single-writer store.
    fn second_writer(&mut self, first: &Self::Store) -> Option<Self::Store>;
}

/// Writes one `#[test]` per check of this suite, each on a fresh harness
/// made by `$make`.
#[macro_export]
macro_rules! key_store_conformance {
    ($make:expr) => {
        #[test]
        fn conformance_durable_across_reopen() {
            $crate::keys::store::conformance::durable_across_reopen(&mut $make);
        }
        #[test]
        fn conformance_writes_compare_revisions() {
            $crate::keys::store::conformance::writes_compare_revisions(&mut $make);
        }
        #[test]
        fn conformance_concurrent_writers_one_wins() {
            $crate::keys::store::conformance::concurrent_writers_one_wins(&mut $make);
        }
        #[test]
        fn conformance_deletes_compare_revisions() {
            $crate::keys::store::conformance::deletes_compare_revisions(&mut $make);
        }
        #[test]
        fn conformance_crash_mid_write_leaves_old_or_new() {
            $crate::keys::store::conformance::crash_mid_write_leaves_old_or_new(&mut $make);
        }
        #[test]
        fn conformance_change_stream() {
            $crate::keys::store::conformance::change_stream(&mut $make);
        }
        #[test]
        fn conformance_names_unique_across_writers() {
            $crate::keys::store::conformance::names_unique_across_writers(&mut $make);
        }
        #[test]
        fn conformance_bounds() {
            $crate::keys::store::conformance::bounds(&mut $make);
        }
    };
}

/// A fresh customer key with one version.
pub fn record(description: &str) -> KeyRecord {
    let mut r = KeyRecord::new(
        Uuid::new_v4(),
        KeyKind::Customer,
        "zone",
        RotationSchedule::every(30, 1_000),
        1_000,
    );
    r.description = description.to_string();
    r
}

/// `r` with one more version and another description.
pub fn changed(r: &KeyRecord) -> KeyRecord {
    let mut next = r.clone();
    let version = r.active().version + 1;
    next.versions.push(KeyVersion {
        version,
        created_at: 2_000,
        origin: kms_client::proto::Origin::Manual,
        material: Material::random(),
    });
    next.description = format!("{} (v{version})", r.description);
    next
}

fn sorted(mut v: Vec<Stored>) -> Vec<Stored> {
    v.sort_by_key(|s| s.record.id);
    v
}

fn find(store: &impl KeyStore, id: Uuid) -> Option<Stored> {
    store.load().unwrap().into_iter().find(|s| s.record.id == id)
}

#[track_caller]
fn assert_conflict<T: Debug>(r: Result<T, StoreError>, expected: Option<Revision>, found: Option<Revision>) {
    match r {
        Err(StoreError::Conflict {
            expected: e, found: f, ..
        }) => assert_eq!((e, f), (expected, found), "conflict reports both revisions"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Acknowledged writes and their revisions survive a restart.
pub fn durable_across_reopen<H: Harness>(h: &mut H) {
    let s = h.open();
    assert!(s.load().unwrap().is_empty(), "a new store is empty");
    let (a, b) = (record("a"), record("b"));
    let ra = s.put(&a, None).unwrap();
    let rb = s.put(&b, None).unwrap();
    let b2 = changed(&b);
    let rb2 = s.put(&b2, Some(rb)).unwrap();
    assert_ne!(rb2, rb, "a write gives a new revision");
    drop(s);
    let s = h.open();
    let want = sorted(vec![
        Stored {
            revision: ra,
            record: a.clone(),
        },
        Stored {
            revision: rb2,
            record: b2,
        },
    ]);
    assert_eq!(sorted(s.load().unwrap()), want);
    s.put(&changed(&a), Some(ra)).expect("revisions hold across a restart");
}

/// Creates and replacements succeed only at the revision the store holds.
pub fn writes_compare_revisions<H: Harness>(h: &mut H) {
    let s = h.open();
    let a = record("a");
    let r1 = s.put(&a, None).unwrap();
    assert_conflict(s.put(&a, None), None, Some(r1));
    let a2 = changed(&a);
    let r2 = s.put(&a2, Some(r1)).unwrap();
    assert!(r2 > r1, "a later write has a greater revision: {r1} then {r2}");
    assert_conflict(s.put(&changed(&a), Some(r1)), Some(r1), Some(r2));
    assert_conflict(s.put(&record("absent"), Some(r1)), Some(r1), None);
    assert_eq!(
        s.load().unwrap(),
        vec![Stored {
            revision: r2,
            record: a2.clone()
        }],
        "refused writes leave no trace"
    );
    assert_eq!(
        s.get(a.id).unwrap(),
        Some(Stored {
            revision: r2,
            record: a2
        }),
        "get reads the record as stored"
    );
    assert_eq!(s.get(Uuid::new_v4()).unwrap(), None);
}

/// With several writers, a name is held by one record at a time: a create
/// of a taken name fails and stores nothing; a replace that keeps its name
/// passes; a deleted record's name is free again. Of writers racing to
/// create one name, exactly one wins.
pub fn names_unique_across_writers<H: Harness>(h: &mut H) {
    let a = h.open();
    let Some(b) = h.second_writer(&a) else {
        return;
    };
    let named = |n: &str| {
        let mut r = record(n);
        r.name = Some(n.to_string());
        r
    };
    let x = named("shared");
    let rx = a.put(&x, None).unwrap();
    let y = named("shared");
    match b.put(&y, None) {
        Err(StoreError::NameTaken { name }) => assert_eq!(name, "shared"),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    assert_eq!(b.get(y.id).unwrap(), None, "a refused create stores nothing");
    let rx2 = a.put(&changed(&x), Some(rx)).expect("a replace keeps its own name");
    a.delete(x.id, rx2).unwrap();
    b.put(&y, None).expect("a deleted key's name is free again");
    let racers = [named("race"), named("race")];
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .zip(&racers)
            .map(|(s, r)| scope.spawn(move || s.put(r, None)))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(
        results.iter().any(|r| matches!(r, Err(StoreError::NameTaken { .. }))),
        "{results:?}"
    );
}

/// Of writers racing with the same expected revision, exactly one wins,
/// for replacements and for creations.
pub fn concurrent_writers_one_wins<H: Harness>(h: &mut H) {
    const WRITERS: usize = 8;
    let s = h.open();
    let a = record("a");
    let r1 = s.put(&a, None).unwrap();
    let race = |expected: Option<Revision>, base: &KeyRecord| {
        let barrier = Barrier::new(WRITERS);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..WRITERS)
                .map(|i| {
                    let (s, barrier) = (&s, &barrier);
                    let mut mine = base.clone();
                    mine.description = format!("writer {i}");
                    scope.spawn(move || {
                        barrier.wait();
                        let result = s.put(&mine, expected);
                        (mine, result)
                    })
                })
                .collect();
            handles.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
        })
    };
    for (expected, base) in [(Some(r1), a.clone()), (None, record("new"))] {
        let results = race(expected, &base);
        let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one writer wins: {results:?}");
        for (_, r) in results.iter().filter(|(_, r)| r.is_err()) {
            assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
        }
        let (rec, rev) = (&winners[0].0, *winners[0].1.as_ref().unwrap());
        let held = find(&s, base.id).unwrap();
        assert_eq!(
            (held.revision, &held.record),
            (rev, rec),
            "the winner's record is stored"
        );
    }
}

/// Deletes succeed only at the revision the store holds, and last.
pub fn deletes_compare_revisions<H: Harness>(h: &mut H) {
    let s = h.open();
    let a = record("a");
    let r1 = s.put(&a, None).unwrap();
    let r2 = s.put(&changed(&a), Some(r1)).unwrap();
    assert_conflict(s.delete(a.id, r1), Some(r1), Some(r2));
    assert!(find(&s, a.id).is_some(), "a refused delete leaves the record");
    s.delete(a.id, r2).unwrap();
    assert!(find(&s, a.id).is_none());
    assert_conflict(s.delete(a.id, r2), Some(r2), None);
    assert_conflict(s.put(&a, Some(r2)), Some(r2), None);
    let r3 = s.put(&a, None).expect("a deleted id can be created again");
    let b = record("b");
    let rb = s.put(&b, None).unwrap();
    s.delete(b.id, rb).unwrap();
    drop(s);
    let s = h.open();
    assert_eq!(
        s.load().unwrap(),
        vec![Stored {
            revision: r3,
            record: a
        }],
        "deletes are durable"
    );
}

/// A write cut off at any point leaves the old or the new record, intact,
/// and the store accepts the next write.
pub fn crash_mid_write_leaves_old_or_new<H: Harness>(h: &mut H) {
    for point in h.crash_points() {
        let s = h.open();
        let (old, other) = (record("old"), record("other"));
        let r = s.put(&old, None).unwrap();
        let ro = s.put(&other, None).unwrap();
        let new = changed(&old);
        h.arm_crash(&s, point);
        assert!(s.put(&new, Some(r)).is_err(), "{point:?}: the crash is reported");
        drop(s);
        let s = h.open();
        let got = find(&s, old.id).unwrap_or_else(|| panic!("{point:?}: the record is gone"));
        assert!(
            got.record == old || got.record == new,
            "{point:?}: neither the old nor the new record"
        );
        let held = find(&s, other.id).unwrap();
        assert_eq!(
            (held.revision, held.record),
            (ro, other),
            "{point:?}: other records untouched"
        );
        s.put(&changed(&got.record), Some(got.revision))
            .unwrap_or_else(|e| panic!("{point:?}: the store goes on: {e}"));
    }
}

/// Another writer's changes arrive on the stream, the store's own do not;
/// a single-writer store's stream stays silent.
pub fn change_stream<H: Harness>(h: &mut H) {
    let a = h.open();
    let mut changes = a.changes();
    let own = record("own");
    let r_own = a.put(&own, None).unwrap();
    a.delete(own.id, r_own).unwrap();
    let Some(b) = h.second_writer(&a) else {
        assert!(
            changes.next().now_or_never().is_none(),
            "a single writer's stream never yields"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut next = || {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), changes.next()).await })
            .expect("a change within 10 s")
            .expect("the stream goes on")
    };
    let theirs = record("theirs");
    let r = b.put(&theirs, None).unwrap();
    assert_eq!(
        next(),
        Change::Put(Box::new(Stored {
            revision: r,
            record: theirs.clone()
        })),
        "the first change is theirs, not our own"
    );
    b.delete(theirs.id, r).unwrap();
    assert_eq!(
        next(),
        Change::Deleted {
            id: theirs.id,
            revision: r
        }
    );
}

/// A record over the limit is refused and not stored; one within it is
/// stored whole.
pub fn bounds<H: Harness>(h: &mut H) {
    let s = h.open();
    let mut big = record("");
    big.description = "x".repeat(MAX_RECORD_LEN + 1);
    match s.put(&big, None) {
        Err(StoreError::TooLarge { id, len, limit }) => {
            assert_eq!((id, limit), (big.id, MAX_RECORD_LEN));
            assert!(len > MAX_RECORD_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(find(&s, big.id).is_none(), "a refused record is not stored");
    let mut fits = record("");
    fits.description = "y".repeat(MAX_RECORD_LEN / 2);
    let r = s.put(&fits, None).unwrap();
    drop(s);
    let s = h.open();
    assert_eq!(
        find(&s, fits.id),
        Some(Stored {
            revision: r,
            record: fits
        })
    );
    s.put(&big, None)
        .expect_err("refused again, also as a create after a restart");
}
