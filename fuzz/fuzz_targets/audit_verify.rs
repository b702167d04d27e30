//! Arbitrary bytes as an audit export, a record line and a checkpoint note:
//! the verifier must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sovereign_audit::{verify, verify_records, Checkpoint, Export};
use sovereign_signing::SigningKey;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed(&[7; 32]).public_key();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(export) = serde_json::from_str::<Export>(text) {
        let _ = verify(&export, None, None);
        let _ = verify(&export, Some(&key), export.checkpoints.first().map(String::as_str));
    }
    let _ = verify_records(text.lines(), &key);
    let _ = Checkpoint::verify(text, &key);
});
