//! Configuration parsing: arbitrary text is a config or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kmsd::config::Config::parse(text, Default::default());
    }
});
