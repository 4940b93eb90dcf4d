//! Any bytes as a GitHub delivery of any event, with any signature header:
//! a decision or an error, never a panic; and whatever it publishes has
//! passed the image and version patterns. Run: `cargo fuzz run
//! github_delivery` (needs cargo-fuzz, and RUSTC_BOOTSTRAP=1 on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use slipway::trigger::github::{Delivery, parse, verify};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(0);
    let (head, body) = data.split_at(split);
    let header = std::str::from_utf8(head).ok();
    let _ = verify(b"secret", body, header);
    for event in ["registry_package", "package", "push", "ping", "other"] {
        if let Ok(Delivery::Published(p)) = parse(event, body) {
            assert!(slipway::config::valid_image(&p.image), "{p:?}");
            assert!(slipway::submit::valid_version(&p.version), "{p:?}");
        }
    }
});
