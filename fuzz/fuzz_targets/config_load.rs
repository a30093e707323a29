//! Loading arbitrary configuration text never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = queue_runtime::config::parse_text(std::path::Path::new("fuzz.yaml"), text);
    }
});
