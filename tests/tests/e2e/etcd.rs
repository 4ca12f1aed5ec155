//! The etcd key store: the conformance suite on a real etcd, and fleets of
//! real kmsd daemons sharing one etcd (a single member or three).

use std::time::Duration;

use futures::StreamExt;
use kms_tests::etcd::{etcd_available, Etcd};
use kmsd::keys::store::conformance::{self, Harness};
use kmsd::keys::store::{Change, EtcdSettings, EtcdStore, KeyStore};
use kmsd::keys::RootKey;

const ROOT: [u8; 32] = [0x5a; 32];

fn settings(etcd: &Etcd, prefix: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: etcd.endpoints(),
        prefix: prefix.to_string(),
        tls: None,
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
    }
}

/// The suite's backend: a single etcd member of its own, each test under
/// a prefix of its own.
struct EtcdHarness {
    etcd: Etcd,
    prefix: String,
}

impl EtcdHarness {
    fn new() -> Option<Self> {
        etcd_available().then(|| Self {
            etcd: Etcd::single(),
            prefix: format!("/conformance/{}/", uuid::Uuid::new_v4()),
        })
    }
}

impl Harness for EtcdHarness {
    type Store = EtcdStore;
    type Crash = ();

    fn open(&mut self) -> EtcdStore {
        EtcdStore::open(&settings(&self.etcd, &self.prefix), RootKey::from_bytes(&ROOT)).unwrap()
    }

    /// None: a write is one transaction.
    fn crash_points(&self) -> Vec<()> {
        Vec::new()
    }

    fn arm_crash(&self, _: &EtcdStore, (): ()) {}

    fn second_writer(&mut self, _: &EtcdStore) -> Option<EtcdStore> {
        Some(self.open())
    }
}

mod conformance_on_etcd {
    use super::*;

    kmsd::key_store_conformance!(match EtcdHarness::new() {
        Some(h) => h,
        None => return,
    });
}

/// A reader whose watch needs revisions etcd has compacted gets every
/// record again, as one `Reloaded`, and then the changes after it.
#[test]
fn a_watch_behind_a_compaction_reloads_everything() {
    let Some(mut h) = EtcdHarness::new() else { return };
    let reader = h.open();
    assert!(reader.load().unwrap().is_empty());
    let writer = h.open();
    let a = conformance::record("a");
    let ra = writer.put(&a, None).unwrap();
    let b = conformance::record("b");
    let rb = writer.put(&b, None).unwrap();
    writer.delete(b.id, rb).unwrap();
    h.etcd.compact();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut changes = reader.changes();
    let mut next = || {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), changes.next()).await })
            .expect("a change within 10 s")
            .expect("the stream goes on")
    };
    match next() {
        Change::Reloaded { at, records } => {
            assert!(at > ra, "the snapshot is after the last write");
            assert_eq!(records.len(), 1, "{records:?}");
            assert_eq!((records[0].revision, &records[0].record), (ra, &a));
        }
        other => panic!("expected Reloaded, got {other:?}"),
    }
    let c = conformance::record("c");
    let rc = writer.put(&c, None).unwrap();
    match next() {
        Change::Put(s) => assert_eq!((s.revision, s.record), (rc, c)),
        other => panic!("expected the change after the snapshot, got {other:?}"),
    }
}

/// etcd holds only ciphertext and ids: no key name, description or
/// material appears in any key or value it stores.
#[test]
fn etcd_sees_only_ciphertext_and_ids() {
    let Some(mut h) = EtcdHarness::new() else { return };
    let s = h.open();
    let mut r = conformance::record("a description etcd must not see");
    r.name = Some("a-name-etcd-must-not-see".into());
    s.put(&r, None).unwrap();
    let dump = h.etcd.dump(&h.prefix);
    assert_eq!(dump.len(), 3, "meta, the record, its name's entry: {dump:?}");
    for (key, value) in &dump {
        let rest = key.strip_prefix(&h.prefix).unwrap();
        assert!(
            rest == "meta"
                || rest == format!("keys/{}", r.id)
                || rest.strip_prefix("names/").is_some_and(|t| t.len() == 64),
            "unexpected key {key}"
        );
        for secret in [&b"must not see"[..], r.versions[0].material.expose()] {
            assert!(
                !value.windows(secret.len()).any(|w| w == secret),
                "{key} holds plaintext"
            );
        }
    }
}
