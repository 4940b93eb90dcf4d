//! Any bytes as a registry notification envelope: pushes or an error,
//! never a panic; every push has passed the image and version patterns.
//! Run: `cargo fuzz run registry_notification`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((pushed, _)) = slipway::trigger::registry::parse(data, &[]) {
        for p in pushed {
            assert!(slipway::submit::valid_version(&p.version), "{p:?}");
            assert!(p.images.iter().all(|i| slipway::config::valid_image(i)), "{p:?}");
        }
    }
    let _ = slipway::trigger::registry::verify(b"token", std::str::from_utf8(data).ok());
});
