//! The quantized matmul kernels alone (activations quantized beforehand) at
//! 1, 8 and 32 activation rows (decode, a small batch, a prompt chunk), for
//! every weight format on a demo-model-sized matrix, with each SIMD
//! instruction set this CPU has (AVX2, AVX-512), to compare them.
//!
//! `CANDLE_NUM_THREADS=1 cargo bench -p sovereign-kernels --bench rows [-- TYPE..]`
//! (types as printed, e.g. `Q4_1 Q4K`: only those; default all).
//! Prints the fastest call of about 300 ms of calls per case, per call and
//! per row.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sovereign_kernels::{Isa, KQuantMatMul, Q41MatMul, Q5MatMul, Q80MatMul, Q8KRows, Q8Rows};

/// The fastest of the calls made in about 300 ms (after 20 ms of warm-up):
/// on a shared machine, the call least disturbed by other processes.
fn time<F: FnMut()>(mut f: F) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(20) {
        f();
    }
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < Duration::from_millis(300) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

/// A function timing one matmul of `rows` activation rows.
type Timer = Box<dyn Fn(usize) -> Duration>;

/// The timer for weights `w` (random, quantized by candle to its format)
/// with the kernels of `isa`.
fn timer(w: &QTensor, isa: Isa) -> Option<Timer> {
    let (n, k) = w.shape().dims2().ok()?;
    let x = move |rows: usize| -> Vec<f32> {
        let t = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).expect("randn");
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    };
    Some(match w.dtype() {
        GgmlDType::Q4_1 => {
            let mm = Q41MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |rows| {
                let q = Q8Rows::quantize(&x(rows), rows, k);
                let mut out = vec![0f32; rows * n];
                time(|| mm.matmul_q8(black_box(&q), &mut out))
            })
        }
        GgmlDType::Q8_0 => {
            let mm = Q80MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |rows| {
                let q = Q8Rows::quantize(&x(rows), rows, k);
                let mut out = vec![0f32; rows * n];
                time(|| mm.matmul_q8(black_box(&q), &mut out))
            })
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let mm = Q5MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |rows| {
                let q = Q8Rows::quantize(&x(rows), rows, k);
                let mut out = vec![0f32; rows * n];
                time(|| mm.matmul_q8(black_box(&q), &mut out))
            })
        }
        _ => {
            let mm = KQuantMatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |rows| {
                let q = Q8KRows::quantize(&x(rows), rows, k);
                let mut out = vec![0f32; rows * n];
                time(|| mm.matmul_q8k(black_box(&q), &mut out))
            })
        }
    })
}

fn main() -> candle_core::Result<()> {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    println!(
        "threads {threads}, ISA {:?}; fastest call (per row)",
        Isa::detect()
    );
    println!(
        "{:<6} {:<10} {:<6} {:>18} {:>18} {:>18}",
        "type", "n x k", "ISA", "rows 1", "rows 8", "rows 32"
    );
    for (dtype, n, k) in [
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q8_0, 1536, 576),
        (GgmlDType::Q5_0, 1536, 576),
        (GgmlDType::Q5_1, 1536, 576),
        (GgmlDType::Q4K, 1536, 768),
        (GgmlDType::Q5K, 1536, 768),
        (GgmlDType::Q6K, 1536, 768),
    ] {
        if !only.is_empty() && !only.contains(&format!("{dtype:?}")) {
            continue;
        }
        let w = Tensor::randn(0f32, 0.1, (n, k), &Device::Cpu)?;
        let w = QTensor::quantize(&w, dtype)?;
        for isa in [Isa::Avx2, Isa::Avx512] {
            if !isa.available() {
                continue;
            }
            let Some(t) = timer(&w, isa) else {
                candle_core::bail!("no kernel for {dtype:?}");
            };
            let cells: Vec<String> = [1, 8, 32]
                .into_iter()
                .map(|rows| {
                    let us = t(rows).as_secs_f64() * 1e6;
                    format!("{us:>8.1}us ({:>5.1})", us / rows as f64)
                })
                .collect();
            println!(
                "{:<6} {:<10} {:<6} {}",
                format!("{dtype:?}"),
                format!("{n}x{k}"),
                format!("{isa:?}"),
                cells.join(" ")
            );
        }
    }
    Ok(())
}
