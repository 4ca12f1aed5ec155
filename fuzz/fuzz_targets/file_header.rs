//! Encrypted-file header and block parsing: arbitrary bytes never panic.
#![no_main]

use kms_fuse::format::{open_block, BlockKey, Header};
use kms_fuse::Dek;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        let _ = h.current();
    }
    let key = BlockKey::new(&Dek::from_bytes([7; 32]));
    assert!(open_block(&key, &[0; 16], 0, true, data).is_err());
});
