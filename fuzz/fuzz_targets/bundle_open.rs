//! Arbitrary bytes as a bundle file: open (header, manifest, parts), verify
//! against a fixed trust file, and stream the payload. Must never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sovereign_signing::{SigningKey, Trust, UnverifiedBundle};

fn trust() -> &'static Trust {
    static TRUST: OnceLock<Trust> = OnceLock::new();
    TRUST.get_or_init(|| {
        let key = SigningKey::from_seed(&[7; 32]);
        Trust::new(1, 1, vec![key.public_key()]).expect("valid trust")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sovereign-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("fuzz-1.0.0.sovb");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(bundle) = UnverifiedBundle::open(&path) {
        let _ = bundle.manifest().id();
        if let Ok(verified) = bundle.verify(trust()) {
            let _ = verified.check_payload(None);
        }
    }
    // The manifest parser on its own, for inputs that are not whole bundles.
    let _ = sovereign_signing::Manifest::parse(data);
});
