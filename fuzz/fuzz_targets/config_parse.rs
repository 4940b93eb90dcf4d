//! Any bytes given to the config parser: an error report or a config,
//! never a panic. Run: `cargo fuzz run config_parse` (from the repo root;
//! needs cargo-fuzz, and RUSTC_BOOTSTRAP=1 on a stable toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = slipway::config::parse("fuzz.toml", text) {
            // Rendering walks spans into the text: it must not panic either.
            let _ = e.render(false);
            let _ = e.reports();
        }
    }
});
