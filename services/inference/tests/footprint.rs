//! A model's footprint by part, read from the demo model's metadata.

use sovereign_inference::Footprint;

#[test]
fn the_demo_models_footprint_adds_up_to_its_file() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script).output().unwrap();
    assert!(out.status.success(), "fetch-model failed");
    let path = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let f = Footprint::of(&path).unwrap();
    assert_eq!(f.layers, 30);
    // The embedding is held as f32 (vocab 49152 x hidden 576); the tied head
    // is the file's Q8_0 copy (34 bytes per 32 values) plus the final norm.
    assert_eq!(f.embed_bytes, 49152 * 576 * 4);
    assert_eq!(f.head_bytes, 576 * 4 + 49152 * 576 / 32 * 34);
    // 3 KV heads of 64 values, keys and values, f32.
    assert_eq!(f.kv_bytes_per_position, 2 * 3 * 64 * 4);
    // Every layer's quantized weights plus the quantized embedding are most
    // of the file (the rest is the tokenizer's metadata).
    let file = std::fs::metadata(&path).unwrap().len();
    let tensors = f.layers as u64 * f.layer_bytes + f.head_bytes;
    assert!(
        tensors < file && tensors > file * 9 / 10,
        "{tensors} of {file}"
    );
    assert!(
        f.head_bytes * 4 > tensors,
        "the tied embedding is about a third"
    );
}
