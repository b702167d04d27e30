//! Llama, Qwen 2, Qwen 3 and Gemma 3 on tiny random-weight GGUF files
//! written here: the engine's logits against a plain f32 implementation of
//! each architecture written out in this file (biases, q/k norms, post
//! norms, GELU, embedding scale, head size, RoPE layout and bases, sliding
//! windows), layer ranges against the whole model, and the refusal of an
//! unknown architecture.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_inference::{Engine, Stage};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 96;
const VOCAB: usize = 260;
const CONTEXT: usize = 64;
const WINDOW: usize = 4;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
    fn head_dim(self) -> usize {
        match self {
            Arch::Qwen3 | Arch::Gemma3 => 32,
            _ => HIDDEN / HEADS,
        }
    }
    fn layers(self) -> usize {
        if self == Arch::Gemma3 {
            6
        } else {
            2
        }
    }
    fn rope_base(self) -> f32 {
        if self == Arch::Gemma3 {
            1_000_000.0
        } else {
            10_000.0
        }
    }
}

/// The model's weights as f32 (matrices already rounded to f16, as stored).
struct Weights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>, bool)>,
}

impl Weights {
    fn get(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .iter()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("{name}"))
            .2
    }
}

fn random_weights(arch: Arch, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let hd = arch.head_dim();
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, matrix: bool| {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n)
            .map(|_| offset + rng.gen_range(-scale..scale))
            .collect();
        if matrix {
            v = v
                .into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect();
        }
        tensors.push((name, shape, v, matrix));
    };
    add(
        "token_embd.weight".into(),
        vec![VOCAB, HIDDEN],
        1.0,
        0.0,
        true,
    );
    add("output_norm.weight".into(), vec![HIDDEN], 0.2, 1.0, false);
    for i in 0..arch.layers() {
        let b = format!("blk.{i}");
        add(
            format!("{b}.attn_norm.weight"),
            vec![HIDDEN],
            0.2,
            1.0,
            false,
        );
        add(
            format!("{b}.ffn_norm.weight"),
            vec![HIDDEN],
            0.2,
            1.0,
            false,
        );
        add(
            format!("{b}.attn_q.weight"),
            vec![HEADS * hd, HIDDEN],
            0.3,
            0.0,
            true,
        );
        add(
            format!("{b}.attn_k.weight"),
            vec![KV_HEADS * hd, HIDDEN],
            0.3,
            0.0,
            true,
        );
        add(
            format!("{b}.attn_v.weight"),
            vec![KV_HEADS * hd, HIDDEN],
            0.3,
            0.0,
            true,
        );
        add(
            format!("{b}.attn_output.weight"),
            vec![HIDDEN, HEADS * hd],
            0.2,
            0.0,
            true,
        );
        add(
            format!("{b}.ffn_gate.weight"),
            vec![FFN, HIDDEN],
            0.2,
            0.0,
            true,
        );
        add(
            format!("{b}.ffn_up.weight"),
            vec![FFN, HIDDEN],
            0.2,
            0.0,
            true,
        );
        add(
            format!("{b}.ffn_down.weight"),
            vec![HIDDEN, FFN],
            0.2,
            0.0,
            true,
        );
        if arch == Arch::Qwen2 {
            add(
                format!("{b}.attn_q.bias"),
                vec![HEADS * hd],
                0.5,
                0.0,
                false,
            );
            add(
                format!("{b}.attn_k.bias"),
                vec![KV_HEADS * hd],
                0.5,
                0.0,
                false,
            );
            add(
                format!("{b}.attn_v.bias"),
                vec![KV_HEADS * hd],
                0.5,
                0.0,
                false,
            );
        }
        if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
            add(format!("{b}.attn_q_norm.weight"), vec![hd], 0.3, 1.0, false);
            add(format!("{b}.attn_k_norm.weight"), vec![hd], 0.3, 1.0, false);
        }
        if arch == Arch::Gemma3 {
            add(
                format!("{b}.post_attention_norm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
                false,
            );
            add(
                format!("{b}.post_ffw_norm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
                false,
            );
        }
    }
    if arch == Arch::Llama {
        add("output.weight".into(), vec![VOCAB, HIDDEN], 0.3, 0.0, true);
    }
    Weights { tensors }
}

/// GPT-2's byte-to-character map: the 256 one-character tokens of a byte-level vocabulary.
fn byte_chars() -> Vec<String> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(u32::from('¡')..=u32::from('¬'));
    printable.extend(u32::from('®')..=u32::from('ÿ'));
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("char").to_string()
        })
        .collect()
}

fn write_gguf(path: &Path, arch: Arch, w: &Weights, name_override: Option<&str>) {
    let a = name_override.unwrap_or(arch.name());
    let mut tokens = byte_chars();
    tokens.push("ab".into());
    tokens.push("<|endoftext|>".into());
    tokens.resize_with(VOCAB, || format!("<unused{}>", 0));
    for (i, t) in tokens.iter_mut().enumerate().skip(258) {
        *t = format!("<unused{i}>");
    }
    let types: Vec<Value> = (0..VOCAB)
        .map(|i| Value::I32(if i >= 257 { 3 } else { 1 }))
        .collect();
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u32v(arch.layers())),
        (format!("{a}.context_length"), u32v(CONTEXT)),
        (format!("{a}.embedding_length"), u32v(HIDDEN)),
        (format!("{a}.feed_forward_length"), u32v(FFN)),
        (format!("{a}.attention.head_count"), u32v(HEADS)),
        (format!("{a}.attention.head_count_kv"), u32v(KV_HEADS)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(arch.rope_base())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("a b".into())]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
    ];
    if arch != Arch::Llama {
        meta.push((format!("{a}.attention.key_length"), u32v(arch.head_dim())));
    }
    if arch == Arch::Gemma3 {
        meta.push((format!("{a}.attention.sliding_window"), u32v(WINDOW)));
    }
    let qtensors: Vec<(String, QTensor)> = w
        .tensors
        .iter()
        .map(|(name, shape, v, matrix)| {
            let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).expect("tensor");
            let dtype = if *matrix {
                GgmlDType::F16
            } else {
                GgmlDType::F32
            };
            (
                name.clone(),
                QTensor::quantize(&t, dtype).expect("quantize"),
            )
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).expect("create");
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write gguf");
}

/// `y = W x` for a row-major `[n, k]` matrix.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + 1e-6).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

/// RoPE on one head: pairs (i, i + d/2) except Llama's adjacent pairs.
fn rope(x: &mut [f32], pos: usize, base: f32, adjacent: bool) {
    let d = x.len();
    for i in 0..d / 2 {
        let theta = pos as f32 * base.powf(-2.0 * i as f32 / d as f32);
        let (c, s) = (theta.cos(), theta.sin());
        let (a, b) = if adjacent {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + d / 2)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// The logits of every position of `tokens`, written out plainly.
fn reference(arch: Arch, w: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let hd = arch.head_dim();
    let embed = w.get("token_embd.weight");
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            let row = &embed[t as usize * HIDDEN..(t as usize + 1) * HIDDEN];
            let scale = if arch == Arch::Gemma3 {
                (HIDDEN as f32).sqrt()
            } else {
                1.0
            };
            row.iter().map(|v| v * scale).collect()
        })
        .collect();
    for l in 0..arch.layers() {
        let g = |n: &str| w.get(&format!("blk.{l}.{n}"));
        let window = (arch == Arch::Gemma3 && l % 6 != 5).then_some(WINDOW);
        let base = if window.is_some() {
            10_000.0
        } else {
            arch.rope_base()
        };
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, g("attn_norm.weight"));
            let (mut q, mut k, mut v) = (
                matvec(g("attn_q.weight"), &h),
                matvec(g("attn_k.weight"), &h),
                matvec(g("attn_v.weight"), &h),
            );
            if arch == Arch::Qwen2 {
                for (t, b) in [
                    (&mut q, "attn_q.bias"),
                    (&mut k, "attn_k.bias"),
                    (&mut v, "attn_v.bias"),
                ] {
                    t.iter_mut().zip(g(b)).for_each(|(a, b)| *a += b);
                }
            }
            for (t, norm) in [
                (&mut q, "attn_q_norm.weight"),
                (&mut k, "attn_k_norm.weight"),
            ] {
                for head in t.chunks_exact_mut(hd) {
                    if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
                        let n = rms_norm(head, g(norm));
                        head.copy_from_slice(&n);
                    }
                    rope(head, pos, base, arch == Arch::Llama);
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for p in 0..xs.len() {
            let mut o = vec![0f32; HEADS * hd];
            for h in 0..HEADS {
                let kvh = h / (HEADS / KV_HEADS);
                let q = &qs[p][h * hd..(h + 1) * hd];
                let seen: Vec<usize> = (0..=p)
                    .filter(|&j| window.is_none_or(|w| p - j < w))
                    .collect();
                let scores: Vec<f32> = seen
                    .iter()
                    .map(|&j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for (&j, ej) in seen.iter().zip(&e) {
                    for d in 0..hd {
                        o[h * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let mut a = matvec(g("attn_output.weight"), &o);
            if arch == Arch::Gemma3 {
                a = rms_norm(&a, g("post_attention_norm.weight"));
            }
            xs[p].iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            let h = rms_norm(&xs[p], g("ffn_norm.weight"));
            let gate = matvec(g("ffn_gate.weight"), &h);
            let up = matvec(g("ffn_up.weight"), &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&gt, &u)| {
                    let a = if arch == Arch::Gemma3 {
                        gelu_tanh(gt)
                    } else {
                        gt / (1.0 + (-gt).exp())
                    };
                    a * u
                })
                .collect();
            let mut m = matvec(g("ffn_down.weight"), &act);
            if arch == Arch::Gemma3 {
                m = rms_norm(&m, g("post_ffw_norm.weight"));
            }
            xs[p].iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        }
    }
    let head = if arch == Arch::Llama {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    xs.iter()
        .map(|x| matvec(w.get(head), &rms_norm(x, w.get("output_norm.weight"))))
        .collect()
}

/// Runs `tokens` through `stages` (a prompt of `prefill` tokens, then one at
/// a time) and returns the logits of every position.
fn run(stages: &[Stage], tokens: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = stages.iter().map(Stage::new_cache).collect();
    let mut out = Vec::new();
    let mut step = |ids: &[u32]| {
        let mut h = stages[0].embed(ids).expect("embed");
        for (s, c) in stages.iter().zip(caches.iter_mut()) {
            h = s.run_layers(h, c).expect("layers");
        }
        let logits = stages.last().unwrap().head_rows(&h).expect("head");
        out.extend(logits.to_vec2::<f32>().expect("logits"));
    };
    step(&tokens[..prefill]);
    for t in &tokens[prefill..] {
        step(std::slice::from_ref(t));
    }
    out
}

const TOKENS: [u32; 11] = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 256];

#[test]
fn every_architecture_matches_a_plain_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (seed, arch) in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3]
        .into_iter()
        .enumerate()
    {
        let w = random_weights(arch, seed as u64 + 1);
        let path = dir.path().join(format!("{}.gguf", arch.name()));
        write_gguf(&path, arch, &w, None);
        let stage = Stage::load(&path, 0..arch.layers()).expect("load");
        assert_eq!(stage.config().arch.name(), arch.name());
        let got = run(std::slice::from_ref(&stage), &TOKENS, 7);
        let want = reference(arch, &w, &TOKENS);
        for (p, (g, r)) in got.iter().zip(&want).enumerate() {
            let scale = r.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (i, (a, b)) in g.iter().zip(r).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-3 * scale,
                    "{arch:?} position {p} logit {i}: engine {a}, reference {b}"
                );
            }
        }
    }
}

#[test]
fn gemma3_layer_ranges_match_the_whole_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let arch = Arch::Gemma3;
    let w = random_weights(arch, 9);
    let path = dir.path().join("gemma3.gguf");
    write_gguf(&path, arch, &w, None);
    let whole = run(&[Stage::load(&path, 0..6).expect("load")], &TOKENS, 5);
    let split = run(
        &[
            Stage::load(&path, 0..2).expect("first"),
            Stage::load(&path, 2..5).expect("middle"),
            Stage::load(&path, 5..6).expect("last"),
        ],
        &TOKENS,
        5,
    );
    assert_eq!(whole, split);
    let middle = Stage::load(&path, 2..5).expect("middle");
    assert!(middle.embed(&[1]).is_err(), "only the first stage embeds");
    assert!(middle
        .head(&Tensor::zeros((1, HIDDEN), candle_core::DType::F32, &Device::Cpu).expect("zeros"))
        .is_err());
}

#[test]
fn qwen_engine_generates_and_scores_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = random_weights(Arch::Qwen3, 21);
    let path = dir.path().join("qwen3.gguf");
    write_gguf(&path, Arch::Qwen3, &w, None);
    let engine = Engine::load(&path).expect("engine");
    assert_eq!(engine.tokenize("ab").expect("tokens"), vec![256]);
    let text = "the quick brown fox jumps over the lazy dog; ".repeat(3);
    let ppl = engine
        .perplexity(&text, 16, None, &mut |_, _| {})
        .expect("perplexity");
    assert_eq!(ppl.chunks, engine.tokenize(&text).expect("t").len() / 16);
    assert_eq!(ppl.scored, ppl.chunks * 7);
    assert!(ppl.perplexity.is_finite() && ppl.perplexity > 1.0);
    let paths = engine.matrix_paths();
    assert_eq!(paths.get("F16 kernel"), Some(&(7 * 2 + 1)), "{paths:?}");
    assert_eq!(paths.get("F16 candle"), None);
}

#[test]
fn unknown_architecture_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = random_weights(Arch::Llama, 3);
    let path = dir.path().join("mamba.gguf");
    write_gguf(&path, Arch::Llama, &w, Some("mamba"));
    let err = Engine::load(&path).err().expect("refused").to_string();
    assert!(
        err.contains("\"mamba\"") && err.contains("not supported"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn a_tensor_whose_dimensions_overflow_outrun_the_file_or_hold_nothing_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = random_weights(Arch::Llama, 4);
    let path = dir.path().join("good.gguf");
    write_gguf(&path, Arch::Llama, &w, None);
    let bytes = std::fs::read(&path).expect("read");
    // The tensor table entry: name (u64 length, bytes), u32 dimension
    // count, u64 dimensions, u32 type, u64 offset.
    let name = b"blk.0.attn_q.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tensor's entry")
        + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("u32")) as usize;
    assert_eq!(dims, 2);
    for (file, first, second) in [
        ("overflow.gguf", 1u64 << 40, 1u64 << 40),
        ("outrun.gguf", 1u64 << 20, 1u64 << 12),
        ("empty.gguf", 0, 64),
    ] {
        let mut patched = bytes.clone();
        patched[at + 4..at + 12].copy_from_slice(&first.to_le_bytes());
        patched[at + 12..at + 20].copy_from_slice(&second.to_le_bytes());
        let path = dir.path().join(file);
        std::fs::write(&path, patched).expect("write");
        let err = Engine::load(&path).err().expect("refused").to_string();
        assert!(err.contains("tensor blk.0.attn_q.weight"), "{file}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn a_block_count_beyond_the_tensor_table_is_refused_before_anything_is_sized_by_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = random_weights(Arch::Llama, 5);
    let path = dir.path().join("good.gguf");
    write_gguf(&path, Arch::Llama, &w, None);
    let mut bytes = std::fs::read(&path).expect("read");
    // The metadata entry: key, then the u32 type tag, then the u32 value.
    let key = b"llama.block_count";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key")
        + key.len();
    assert_eq!(
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("u32")),
        4
    );
    bytes[at + 4..at + 8].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
    let path = dir.path().join("layers.gguf");
    std::fs::write(&path, bytes).expect("write");
    let err = Engine::load(&path).err().expect("refused").to_string();
    assert!(err.contains("block_count 4294967040"), "{err}");
}

#[test]
fn a_context_length_beyond_the_engines_maximum_is_served_up_to_the_maximum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = random_weights(Arch::Llama, 6);
    let path = dir.path().join("good.gguf");
    write_gguf(&path, Arch::Llama, &w, None);
    let mut bytes = std::fs::read(&path).expect("read");
    let key = b"llama.context_length";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key")
        + key.len();
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let path = dir.path().join("context.gguf");
    std::fs::write(&path, bytes).expect("write");
    let engine = Engine::load(&path).expect("loads without sizing 2^32 positions");
    assert_eq!(engine.config().context, sovereign_inference::MAX_CONTEXT);
}
