//! Kernel benchmark on the demo model's matmul shapes: this crate's Q4_1
//! kernels (each instruction set) against candle's `QMatMul` on the same
//! weights, one activation row (decode) and 32 rows (prompt), and the Q8_0
//! output head (49152 x 576, Q8_0 x Q8_0).
//!
//! `cargo bench -p sovereign-kernels` (threads: `CANDLE_NUM_THREADS`, default
//! all cores). Prints the median of 15 timed batches per case.

use std::borrow::Cow;
use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_kernels::{Isa, Q41MatMul, Q80MatMul, Q4_1_BLOCK_BYTES, QK};

fn random_q41(rng: &mut StdRng, n: usize, k: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * k / QK * Q4_1_BLOCK_BYTES);
    for _ in 0..n * k / QK {
        out.extend_from_slice(&f16::from_f32(rng.gen_range(0.001f32..0.05)).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(rng.gen_range(-0.4f32..0.0)).to_le_bytes());
        for _ in 0..QK / 2 {
            out.push(rng.gen());
        }
    }
    out
}

/// Median time of one call over 15 batches sized to take about 20 ms each.
fn time<F: FnMut()>(mut f: F) -> Duration {
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < Duration::from_millis(20) {
        f();
        calls += 1;
    }
    let mut samples: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed() / calls
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    println!(
        "threads {threads}, best ISA {:?}; times are per call (median of 15)",
        Isa::detect()
    );
    println!(
        "{:<12} {:>4} {:>8} {:>11} {:>11} {:>11} {:>9}",
        "shape n x k", "rows", "candle", "scalar", "avx2", "avx512", "speedup"
    );
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = random_q41(&mut rng, n, k);
        let qt = QTensor::new(
            QStorage::from_data(Cow::Borrowed(&w), &Device::Cpu, GgmlDType::Q4_1)?,
            (n, k),
        )?;
        let Some(mm) = Q41MatMul::from_qtensor(&qt) else {
            candle_core::bail!("not Q4_1");
        };
        let candle = QMatMul::from_qtensor(qt)?;
        for rows in [1, 32] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &Device::Cpu)?;
            let tc = time(|| {
                black_box(candle.forward(&x).ok());
            });
            let mut cells = Vec::new();
            let mut best = Duration::MAX;
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                match mm.clone().with_isa(isa) {
                    Some(m) => {
                        let t = time(|| {
                            black_box(m.forward(&x).ok());
                        });
                        best = best.min(t);
                        cells.push(format!("{:>9.1}us", t.as_secs_f64() * 1e6));
                    }
                    None => cells.push(format!("{:>11}", "n/a")),
                }
            }
            println!(
                "{:<12} {:>4} {:>6.1}us {} {:>8.1}x",
                format!("{n}x{k}"),
                rows,
                tc.as_secs_f64() * 1e6,
                cells.join(" "),
                tc.as_secs_f64() / best.as_secs_f64()
            );
        }
    }
    let head = Tensor::randn(0f32, 1.0, (49152, 576), &Device::Cpu)?;
    let head = QTensor::quantize(&head, GgmlDType::Q8_0)?;
    let Some(ours) = Q80MatMul::from_qtensor(&head) else {
        candle_core::bail!("not Q8_0");
    };
    let head = QMatMul::from_qtensor(head)?;
    let x = Tensor::randn(0f32, 1.0, (1, 1, 576), &Device::Cpu)?;
    let t = time(|| {
        black_box(head.forward(&x).ok());
    });
    let mut cells = Vec::new();
    let mut best = Duration::MAX;
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        match ours.clone().with_isa(isa) {
            Some(m) => {
                let t = time(|| {
                    black_box(m.forward(&x).ok());
                });
                best = best.min(t);
                cells.push(format!("{:>9.1}us", t.as_secs_f64() * 1e6));
            }
            None => cells.push(format!("{:>11}", "n/a")),
        }
    }
    println!(
        "{:<12} {:>4} {:>6.1}us {} {:>8.1}x   (Q8_0 output head)",
        "49152x576",
        1,
        t.as_secs_f64() * 1e6,
        cells.join(" "),
        t.as_secs_f64() / best.as_secs_f64()
    );
    Ok(())
}
