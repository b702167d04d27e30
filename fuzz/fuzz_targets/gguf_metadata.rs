//! A model file as the engine opens it (`Engine::load`): GGUF header,
//! metadata and tensor table (candle's reader), the model configuration the
//! engine derives from the metadata, the tokenizer and chat template built
//! from it, then the layers. `make-seeds` writes a tiny but complete Llama
//! GGUF to start from. Must never panic, abort or run out of memory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("sovereign-fuzz-{}.gguf", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    if std::fs::write(path(), data).is_err() {
        return;
    }
    let _ = sovereign_inference::Engine::load(path());
});
