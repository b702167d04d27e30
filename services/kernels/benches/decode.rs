//! Prompt and decode speed of a whole greedy decode of the demo model with
//! the minimal reference forward pass of `tests/llama` (plain candle-core
//! ops), with this crate's kernels and with candle's `QMatMul`: what the
//! kernels give a straightforward candle engine, to set beside llama.cpp.
//!
//! `CANDLE_NUM_THREADS=T cargo bench -p sovereign-kernels --bench decode`
//! (env DECODE_TOKENS, default 64; REPEATS, default 5; median reported).

#[path = "../tests/llama/mod.rs"]
mod llama;

use std::time::Instant;

use llama::{argmax, demo_model, Kernels, Llama, PROMPT};
use sovereign_kernels::Isa;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let n = env_usize("DECODE_TOKENS", 64);
    let repeats = env_usize("REPEATS", 5);
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let path = demo_model();
    for kernels in [Kernels::Sovereign(Isa::detect()), Kernels::Candle] {
        let mut pp = Vec::new();
        let mut tg = Vec::new();
        for _ in 0..repeats {
            let mut model = Llama::load(&path, kernels)?;
            let t = Instant::now();
            let mut logits = model.forward(&PROMPT)?;
            pp.push(PROMPT.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..n {
                let tok = argmax(&logits)?;
                logits = model.forward(&[tok])?;
            }
            tg.push(n as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "threads {threads} {kernels:?}: prompt {} tokens {:.1} tok/s; decode {n} tokens {:.1} tok/s (median of {repeats})",
            PROMPT.len(),
            median(pp),
            median(tg)
        );
    }
    Ok(())
}
