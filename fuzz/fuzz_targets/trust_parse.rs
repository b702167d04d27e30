//! Arbitrary text as a trust file: parse, re-render, check a successor. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sovereign_signing::TrustFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = TrustFile::parse(text) {
        let rendered = file.to_text();
        let again = TrustFile::parse(&rendered).expect("a rendered trust file parses");
        assert_eq!(again.trust(), file.trust());
        let _ = again.accepts_successor(&file);
    }
});
