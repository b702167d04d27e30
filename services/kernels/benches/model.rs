//! The matmul work of one decode token of the demo model: every Q4_1 weight
//! matrix once (30 layers x q, k, v, o, gate, up, down) plus the Q8_0 output
//! head, on one activation row, with this crate's kernels and with candle's
//! `QMatMul` on the same weights. The rest of a decode step (attention,
//! norms, RoPE, sampling) is not included: this is the floor the matmuls set.
//!
//! `cargo bench -p sovereign-kernels --bench model` (threads: `CANDLE_NUM_THREADS`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use sovereign_kernels::{Q41MatMul, Q80MatMul};

fn median_of<F: FnMut()>(runs: usize, mut f: F) -> Duration {
    f();
    let mut v: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script).output()?;
    if !out.status.success() {
        return Err(format!("fetch-model: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let path = String::from_utf8(out.stdout)?;
    let mut file = std::fs::File::open(path.trim())?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut ours = Vec::new();
    let mut candle = Vec::new();
    for name in &names {
        if content.tensor_infos[name].ggml_dtype != GgmlDType::Q4_1 {
            continue;
        }
        let qt = content.tensor(&mut file, name, &Device::Cpu)?;
        let mm = Q41MatMul::from_qtensor(&qt).ok_or("not Q4_1")?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, mm.k()), &Device::Cpu)?;
        ours.push((mm, x.clone()));
        candle.push((QMatMul::from_qtensor(qt)?, x));
    }
    // The same weights with q|k|v and gate|up stacked per layer (5 calls per
    // layer instead of 7).
    let mut fused: Vec<(Q41MatMul, Tensor)> = Vec::new();
    for layer in 0.. {
        let get = |what: &str| {
            let name = format!("blk.{layer}.{what}.weight");
            names.iter().position(|n| *n == name)
        };
        let Some(q) = get("attn_q") else { break };
        let idx = |what: &str| -> Result<usize, Box<dyn std::error::Error>> {
            get(what).ok_or_else(|| format!("layer {layer} has no {what}").into())
        };
        let q41: Vec<&String> = names
            .iter()
            .filter(|n| content.tensor_infos[*n].ggml_dtype == GgmlDType::Q4_1)
            .collect();
        let pick = |i: usize| -> Result<&Q41MatMul, Box<dyn std::error::Error>> {
            let pos = q41.iter().position(|n| **n == names[i]).ok_or("not Q4_1")?;
            Ok(&ours[pos].0)
        };
        let qkv = Q41MatMul::stack_rows(&[pick(q)?, pick(idx("attn_k")?)?, pick(idx("attn_v")?)?])
            .ok_or("qkv")?;
        let gu = Q41MatMul::stack_rows(&[pick(idx("ffn_gate")?)?, pick(idx("ffn_up")?)?])
            .ok_or("gate/up")?;
        for mm in [
            qkv,
            pick(idx("attn_output")?)?.clone(),
            gu,
            pick(idx("ffn_down")?)?.clone(),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, 1, mm.k()), &Device::Cpu)?;
            fused.push((mm, x));
        }
    }
    let head_q = content.tensor(&mut file, "token_embd.weight", &Device::Cpu)?;
    let our_head = Q80MatMul::from_qtensor(&head_q).ok_or("token_embd is not Q8_0")?;
    let head = QMatMul::from_qtensor(head_q)?;
    let hx = Tensor::randn(0f32, 1.0, (1, 1, 576), &Device::Cpu)?;
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    // Each weight once per token, the head last, as a decode step reads them
    // (the head alone would stay in the L3 cache between repeats).
    let t_ours = median_of(21, || {
        for (mm, x) in &ours {
            black_box(mm.forward(x).ok());
        }
        black_box(our_head.forward(&hx).ok());
    });
    let t_fused = median_of(21, || {
        for (mm, x) in &fused {
            black_box(mm.forward(x).ok());
        }
        black_box(our_head.forward(&hx).ok());
    });
    let t_candle = median_of(21, || {
        for (mm, x) in &candle {
            black_box(mm.forward(x).ok());
        }
        black_box(head.forward(&hx).ok());
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "threads {threads}: the matmuls of one decode token (210 Q4_1 + Q8_0 head), median of 21"
    );
    println!(
        "  sovereign-kernels: {:.2} ms = {:.0} tok/s at most",
        ms(t_ours),
        1e3 / ms(t_ours)
    );
    println!(
        "  sovereign-kernels, q|k|v and gate|up stacked ({} calls): {:.2} ms = {:.0} tok/s at most",
        fused.len() + 1,
        ms(t_fused),
        1e3 / ms(t_fused)
    );
    println!(
        "  candle QMatMul:    {:.2} ms = {:.0} tok/s at most",
        ms(t_candle),
        1e3 / ms(t_candle)
    );
    Ok(())
}
