//! Blob parsing and opening: arbitrary bytes never panic and never decrypt.
#![no_main]

use kms_client::blob::BlobHeader;
use kms_client::proto::Context;
use kmsd::keys::crypto::VersionCiphers;
use kmsd::keys::model::{KeyRecord, RotationSchedule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = BlobHeader::parse(data) else { return };
    let key = KeyRecord::new(header.key_id, kms_client::proto::KeyKind::Customer, "z", RotationSchedule::off(365), 0);
    let ciphers = VersionCiphers::build(&key, None);
    if let Some(cipher) = ciphers.get(header.version) {
        assert!(kmsd::keys::crypto::open(cipher, data, &Context::new()).is_err());
    }
});
