//! Batch invariance of the multi-row kernels: for every weight format and
//! instruction set, a matmul of `m` activation rows gives, bit for bit, what
//! each row gives alone (`m = 1`), wherever the row falls in a tile of rows
//! and whatever `m` is; and every instruction set stays within f32 summation
//! error of the scalar reference.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_kernels::{Isa, KQuantMatMul, Q41MatMul, Q5MatMul, Q80MatMul};

/// Row counts: every position in a tile of 4 or 8 and a remainder after two tiles.
const ROW_COUNTS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17];

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A matmul as a function from an `[m, k]` input to its flat `[m, n]` output.
type Matmul = Box<dyn Fn(&Tensor) -> Vec<f32>>;

/// The matmul for `w`'s format with the kernels of `isa`; `None` if this CPU
/// lacks `isa`.
fn matmul(w: &QTensor, isa: Isa) -> Option<Matmul> {
    fn flat(t: candle_core::Result<Tensor>) -> Vec<f32> {
        t.and_then(|t| t.flatten_all()?.to_vec1()).expect("forward")
    }
    Some(match w.dtype() {
        GgmlDType::Q4_1 => {
            let mm = Q41MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |x| flat(mm.forward(x)))
        }
        GgmlDType::Q8_0 => {
            let mm = Q80MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |x| flat(mm.forward(x)))
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let mm = Q5MatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |x| flat(mm.forward(x)))
        }
        _ => {
            let mm = KQuantMatMul::from_qtensor(w)?.with_isa(isa)?;
            Box::new(move |x| flat(mm.forward(x)))
        }
    })
}

/// Per output, the sum of `|w_ij x_i|` over the dequantized weights.
fn magnitudes(w: &QTensor, x: &Tensor) -> Vec<f32> {
    let wf = w.dequantize(&Device::Cpu).expect("dequantize");
    x.abs()
        .and_then(|a| a.matmul(&wf.abs()?.t()?))
        .and_then(|m| m.flatten_all()?.to_vec1())
        .expect("magnitudes")
}

/// For `dtype` on an `[n, k]` matrix: every available instruction set, every
/// row count of [`ROW_COUNTS`], the `m`-row output equals the rows computed
/// one at a time bit for bit, and is within summation error of the scalar one.
fn check(dtype: GgmlDType, n: usize, k: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let wf = Tensor::from_vec(random(&mut rng, n * k, 0.1), (n, k), &Device::Cpu).expect("w");
    let w = QTensor::quantize(&wf, dtype).expect("quantize");
    let scalar = matmul(&w, Isa::Scalar).expect("scalar kernels");
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        let Some(mm) = matmul(&w, isa) else {
            eprintln!("note: this CPU lacks {isa:?}: its {dtype:?} kernel is not tested here");
            continue;
        };
        for m in ROW_COUNTS {
            let x =
                Tensor::from_vec(random(&mut rng, m * k, 2.0), (m, k), &Device::Cpu).expect("x");
            let got = mm(&x);
            assert_eq!(got.len(), m * n);
            for r in 0..m {
                let alone = mm(&x.narrow(0, r, 1).expect("row"));
                for j in 0..n {
                    assert_eq!(
                        got[r * n + j].to_bits(),
                        alone[j].to_bits(),
                        "{dtype:?} {isa:?} {n}x{k} m={m} row {r} out {j}: {} in the batch, {} alone",
                        got[r * n + j],
                        alone[j]
                    );
                }
            }
            let want = scalar(&x);
            let mags = magnitudes(&w, &x);
            for (i, ((g, s), mag)) in got.iter().zip(&want).zip(&mags).enumerate() {
                assert!(
                    (g - s).abs() <= 1e-5 * mag + 1e-30,
                    "{dtype:?} {isa:?} {n}x{k} m={m} out {i}: {g} vs scalar {s} (magnitude {mag})"
                );
            }
        }
    }
}

#[test]
fn q4_1_rows_are_batch_invariant() {
    check(GgmlDType::Q4_1, 96, 576, 1);
    // 7 blocks: groups of 4, a pair and a single block.
    check(GgmlDType::Q4_1, 5, 224, 2);
}

#[test]
fn q8_0_rows_are_batch_invariant() {
    check(GgmlDType::Q8_0, 96, 576, 3);
    check(GgmlDType::Q8_0, 5, 224, 4);
    // 39 blocks: two steps of 16 (the second adds to a non-zero sum), a
    // group of 4, a pair and a single block.
    check(GgmlDType::Q8_0, 24, 1248, 10);
}

#[test]
fn q5_rows_are_batch_invariant() {
    for dtype in [GgmlDType::Q5_0, GgmlDType::Q5_1] {
        check(dtype, 96, 576, 5);
        check(dtype, 5, 224, 6);
    }
}

#[test]
fn kquant_rows_are_batch_invariant() {
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        check(dtype, 64, 1536, 7);
        check(dtype, 3, 256, 8);
    }
}

/// The kernels take weight rows in pairs where they can: a row gives the
/// same bits paired with its neighbour or alone. Stacking an odd-sized
/// matrix `a` (5 rows) on `b` moves every row of `b` to the other side of a
/// pair and pairs `a`'s last row (alone in `a`) with `b`'s first.
#[test]
fn q5_weight_rows_give_the_same_bits_paired_or_alone() {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [GgmlDType::Q5_0, GgmlDType::Q5_1] {
        let quantize = |rng: &mut StdRng, n: usize| {
            let wf = Tensor::from_vec(random(rng, n * 576, 0.1), (n, 576), &Device::Cpu);
            let w = QTensor::quantize(&wf.expect("w"), dtype).expect("quantize");
            Q5MatMul::from_qtensor(&w).expect("Q5")
        };
        let (a, b) = (quantize(&mut rng, 5), quantize(&mut rng, 4));
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            let (Some(a), Some(b)) = (a.clone().with_isa(isa), b.clone().with_isa(isa)) else {
                continue;
            };
            let ab = Q5MatMul::stack_rows(&[&a, &b]).expect("same k");
            for m in ROW_COUNTS {
                let x = Tensor::from_vec(random(&mut rng, m * 576, 2.0), (m, 576), &Device::Cpu)
                    .expect("x");
                let flat = |t: candle_core::Result<Tensor>| -> Vec<u32> {
                    let t = t.and_then(|t| t.flatten_all()?.to_vec1::<f32>());
                    t.expect("forward").iter().map(|v| v.to_bits()).collect()
                };
                let (got, ya, yb) = (
                    flat(ab.forward(&x)),
                    flat(a.forward(&x)),
                    flat(b.forward(&x)),
                );
                for r in 0..m {
                    let want = [&ya[r * 5..(r + 1) * 5], &yb[r * 4..(r + 1) * 4]].concat();
                    assert_eq!(
                        got[r * 9..(r + 1) * 9],
                        want,
                        "{dtype:?} {isa:?} m={m} row {r}"
                    );
                }
            }
        }
    }
}
