//! The gateway's TOML configuration parser and validator on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_gateway::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::parse(text, std::path::Path::new("fuzz.toml")) {
            // Every error is one line.
            assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
        }
    }
});
