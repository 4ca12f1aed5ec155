//! Golden bytes for every schema, and the rule that schema modules use no
//! wire or model type.

use kms_client::proto::{KeyKind, KeyRole, KeyState, Origin, Policy, Principal, ReplicaInfo};
use uuid::Uuid;

use super::*;
use crate::keys::material::Material;
use crate::keys::model::{KeyVersion, RotationSchedule};

fn version(n: u32, origin: Origin) -> KeyVersion {
    KeyVersion {
        version: n,
        created_at: 1_700_000_000 + u64::from(n),
        origin,
        material: Material::from_bytes([n as u8; 32]),
    }
}

/// Three records that between them use every variant of every enum.
fn records() -> Vec<KeyRecord> {
    let a = KeyRecord {
        id: Uuid::from_u128(0x0123_4567_89ab_4cde_8f01_2345_6789_abcd),
        name: Some("golden-a".into()),
        description: "replica, pending deletion".into(),
        kind: KeyKind::DefaultOrganization,
        zone: "z1".into(),
        role: KeyRole::Replica {
            primary_zone: "z0".into(),
        },
        state: KeyState::PendingDeletion {
            delete_at: 1_800_000_000,
        },
        created_at: 1_700_000_000,
        policy: Policy {
            users: vec![Principal::Gid(100), Principal::Uid(7)],
            admins: vec![Principal::Gid(0)],
            public_use: true,
        },
        rotation: RotationSchedule {
            enabled: false,
            period_days: 365,
            next_at: None,
        },
        manual_rotations: 0,
        versions: vec![version(1, Origin::Replicated), version(2, Origin::Replicated)],
        replicas: vec![ReplicaInfo {
            zone: "z2".into(),
            confirmed_version: None,
        }],
        serial: 0,
        epoch: 0,
        deleted_at: None,
    };
    let b = KeyRecord {
        id: Uuid::from_u128(0xfedc_ba98_7654_4321_8fed_cba9_8765_4321),
        name: None,
        description: String::new(),
        kind: KeyKind::Customer,
        zone: "z0".into(),
        role: KeyRole::Primary,
        state: KeyState::Disabled,
        created_at: 1_600_000_000,
        policy: Policy {
            users: vec![Principal::Uid(1000)],
            admins: vec![],
            public_use: false,
        },
        rotation: RotationSchedule {
            enabled: true,
            period_days: 30,
            next_at: Some(1_700_500_000),
        },
        manual_rotations: 10,
        versions: vec![
            version(1, Origin::Initial),
            version(2, Origin::Manual),
            version(3, Origin::Automatic),
        ],
        replicas: vec![
            ReplicaInfo {
                zone: "z1".into(),
                confirmed_version: Some(3),
            },
            ReplicaInfo {
                zone: "z3".into(),
                confirmed_version: Some(1),
            },
        ],
        serial: 0,
        epoch: 0,
        deleted_at: None,
    };
    let c = KeyRecord {
        role: KeyRole::SingleZone,
        state: KeyState::Enabled,
        ..b.clone()
    };
    vec![a, b, c]
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// [`records`] as the schema-1 code wrote them: the postcard of the
/// model's `KeyRecord` at commit d957242, before the store had a schema.
const V1_GOLDEN: [&str; 3] = [
    concat!(
        "100123456789ab4cde8f0123456789abcd0108676f6c64656e2d61197265706c6963612c2070656e64696e672064656c",
        "6574696f6e01027a3102027a300280a4a7da0680e2cfaa0602016400070101000100ed020000020181e2cfaa06030101",
        "0101010101010101010101010101010101010101010101010101010101010282e2cfaa06030202020202020202020202",
        "02020202020202020202020202020202020202020201027a3200",
    ),
    concat!(
        "10fedcba98765443218fedcba987654321000000027a30010180a0f8fa050100e8070000011e01a0a4eeaa060a030181",
        "e2cfaa060001010101010101010101010101010101010101010101010101010101010101010282e2cfaa060202020202",
        "020202020202020202020202020202020202020202020202020202020383e2cfaa060103030303030303030303030303",
        "0303030303030303030303030303030303030302027a310103027a330101",
    ),
    concat!(
        "10fedcba98765443218fedcba987654321000000027a30000080a0f8fa050100e8070000011e01a0a4eeaa060a030181",
        "e2cfaa060001010101010101010101010101010101010101010101010101010101010101010282e2cfaa060202020202",
        "020202020202020202020202020202020202020202020202020202020383e2cfaa060103030303030303030303030303",
        "0303030303030303030303030303030303030302027a310103027a330101",
    ),
];

#[test]
fn schema_1_reads_the_bytes_the_old_release_wrote() {
    for (golden, want) in V1_GOLDEN.iter().zip(records()) {
        let bytes = unhex(golden);
        let v1: v1::KeyRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_allocvec(&v1).unwrap(), bytes, "schema 1 is frozen");
        let got = decode(1, &bytes).unwrap();
        assert_eq!((got.revision, got.record), (1, want));
    }
}

/// [`records`] at revision 7 in schema 2. If this test fails, schema 2
/// changed: undo that and make the change schema 3.
const V2_GOLDEN: [&str; 3] = [
    concat!(
        "07100123456789ab4cde8f0123456789abcd0108676f6c64656e2d61197265706c6963612c2070656e64696e67206465",
        "6c6574696f6e01027a3102027a300280a4a7da0680e2cfaa0602016400070101000100ed020000020181e2cfaa060301",
        "010101010101010101010101010101010101010101010101010101010101010282e2cfaa060302020202020202020202",
        "0202020202020202020202020202020202020202020201027a3200000000",
    ),
    concat!(
        "0710fedcba98765443218fedcba987654321000000027a30010180a0f8fa050100e8070000011e01a0a4eeaa060a0301",
        "81e2cfaa060001010101010101010101010101010101010101010101010101010101010101010282e2cfaa0602020202",
        "02020202020202020202020202020202020202020202020202020202020383e2cfaa0601030303030303030303030303",
        "030303030303030303030303030303030303030302027a310103027a330101000000",
    ),
    concat!(
        "0710fedcba98765443218fedcba987654321000000027a30000080a0f8fa050100e8070000011e01a0a4eeaa060a0301",
        "81e2cfaa060001010101010101010101010101010101010101010101010101010101010101010282e2cfaa0602020202",
        "02020202020202020202020202020202020202020202020202020202020383e2cfaa0601030303030303030303030303",
        "030303030303030303030303030303030303030302027a310103027a330101000000",
    ),
];

#[test]
fn schema_2_is_frozen() {
    for (golden, rec) in V2_GOLDEN.iter().zip(records()) {
        let bytes = encode(7, &rec).unwrap();
        assert_eq!(hex(&bytes), *golden, "schema 2 encoding of {:?}", rec.name);
        let back = decode(2, &bytes).unwrap();
        assert_eq!((back.revision, back.record), (7, rec));
    }
}

#[test]
fn serials_epochs_and_tombstones_round_trip() {
    let mut rec = records()[1].clone();
    rec.serial = 1 << 40;
    rec.epoch = 3;
    rec.deleted_at = Some(1_750_000_000);
    let back = decode(2, &encode(7, &rec).unwrap()).unwrap();
    assert_eq!(back.record, rec);
}

#[test]
fn schema_modules_use_no_wire_or_model_type() {
    let allowed = [
        "use serde::{Deserialize, Serialize};",
        "use uuid::Uuid;",
        "use super::Secret;",
    ];
    for (name, src) in [("v1.rs", include_str!("v1.rs")), ("v2.rs", include_str!("v2.rs"))] {
        for line in src.lines().filter(|l| l.trim_start().starts_with("use ")) {
            assert!(allowed.contains(&line.trim()), "{name}: {line}");
        }
        for word in ["kms_client", "proto", "crate::", "model"] {
            assert!(!src.contains(word), "{name} mentions {word}");
        }
    }
}

#[test]
fn key_files_name_their_schema() {
    assert_eq!(schema_of(b"KMSDKEY1...."), Some(1));
    assert_eq!(schema_of(b"KMSDKEY2...."), Some(2));
    assert_eq!(schema_of(b"KMSDKEY9...."), None);
    assert!(matches!(decode(3, b""), Err(SchemaError::Unknown(3))));
    assert!(matches!(decode(2, b"\x01"), Err(SchemaError::Decode { schema: 2, .. })));
}

#[test]
fn secrets_do_not_print() {
    let rec: v2::KeyRecord = (&records()[0]).into();
    let shown = format!("{rec:?}");
    assert!(
        shown.contains("Secret([redacted])") && !shown.contains("[1, 1, 1"),
        "{shown}"
    );
}
