//! Any bytes as a GitHub delivery of any event, with any signature header:
//! a decision or an error, never a panic; and whatever it publishes has
//! passed the image and version patterns (a push: branch and commit). Run: `cargo fuzz run
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
        match parse(event, body) {
            Ok(Delivery::Published(p)) => {
                assert!(slipway::config::valid_image(&p.image), "{p:?}");
                assert!(slipway::submit::valid_version(&p.version), "{p:?}");
            }
            // What reaches git must have passed its patterns.
            Ok(Delivery::Push { branch, commit, .. }) => {
                assert!(slipway::config::environment::valid_branch(&branch), "{branch:?}");
                assert!(slipway::git::valid_commit(&commit), "{commit:?}");
            }
            _ => {}
        }
    }
});
