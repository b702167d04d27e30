//! Safetensors (F32/F16/BF16) Llama models: tiny random-weight models of the
//! same architecture, written by the test.

use std::path::Path;

use sovereign_inference::Stage;

const HIDDEN: usize = 64;
const FFN: usize = 128;
const VOCAB: usize = 100;
const LAYERS: usize = 3;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// Writes config.json and model.safetensors; `dtype` is F32, F16 or BF16.
fn write_model(dir: &Path, dtype: &str, tied: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "vocab_size": VOCAB, "intermediate_size": FFN,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let kv = HIDDEN / HEADS * KV_HEADS;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    if !tied {
        tensors.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    }
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}.");
        tensors.extend([
            (format!("{p}input_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}post_attention_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}mlp.gate_proj.weight"), vec![FFN, HIDDEN]),
            (format!("{p}mlp.up_proj.weight"), vec![FFN, HIDDEN]),
            (format!("{p}mlp.down_proj.weight"), vec![HIDDEN, FFN]),
        ]);
    }
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (seed, (name, shape)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut values = random(n, seed as u64 + 1);
        if shape.len() == 1 {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let start = data.len();
        for v in values {
            match dtype {
                "F32" => data.extend(v.to_le_bytes()),
                "F16" => data.extend(half::f16::from_f32(v).to_le_bytes()),
                _ => data.extend(half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

fn logits(stages: &[Stage], steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = stages.iter().map(Stage::new_cache).collect();
    steps
        .iter()
        .map(|tokens| {
            let mut hidden = stages[0].embed(tokens).unwrap();
            for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
                hidden = stage.run_layers(hidden, cache).unwrap();
            }
            stages
                .last()
                .unwrap()
                .head(&hidden)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

const STEPS: [&[u32]; 3] = [&[1, 5, 9, 42, 7], &[3], &[99]];

#[test]
fn safetensors_models_split_by_layer_ranges_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, tied) in [("F32", true), ("BF16", false)] {
        let dir = tmp.path().join(dtype);
        write_model(&dir, dtype, tied);
        let full = logits(&[Stage::load(&dir, 0..LAYERS).unwrap()], &STEPS);
        let split = logits(
            &[
                Stage::load(&dir, 0..1).unwrap(),
                Stage::load(&dir, 1..LAYERS).unwrap(),
            ],
            &STEPS,
        );
        assert_eq!(full, split, "{dtype}");
        assert_eq!(full[0].len(), VOCAB);
        assert!(full.iter().flatten().all(|v| v.is_finite()));
    }
}

#[test]
fn f16_weights_give_nearly_the_f32_logits() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("f32"), "F32", true);
    write_model(&tmp.path().join("f16"), "F16", true);
    let a = logits(
        &[Stage::load(&tmp.path().join("f32"), 0..LAYERS).unwrap()],
        &STEPS,
    );
    let b = logits(
        &[Stage::load(&tmp.path().join("f16"), 0..LAYERS).unwrap()],
        &STEPS,
    );
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        // f16 keeps 11 significant bits of weights around 0.1: errors of ~1e-4 per weight.
        assert!((x - y).abs() < 2e-2, "{x} vs {y}");
    }
    assert_ne!(a, b, "the F16 model did not load its own weights");
}

#[test]
fn broken_safetensors_models_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, "F32", true);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 4]).unwrap();
    let err = Stage::load(&dir, 0..LAYERS).err().unwrap().to_string();
    assert!(err.contains("malformed"), "{err}");
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let err = Stage::load(&dir, 0..LAYERS).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(Stage::load(&empty, 0..1).is_err());
}
