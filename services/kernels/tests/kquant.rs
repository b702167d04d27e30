//! k-quant (Q4_K, Q5_K, Q6_K) and F16/BF16 matmuls: every instruction set
//! against the scalar reference, and against candle's dequantize + f32
//! matmul and its `QMatMul` on the same weights.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_kernels::{Half, HalfMatMul, Isa, KQuant, KQuantMatMul, Q8KRows, QK_K};

const KINDS: [(KQuant, GgmlDType); 3] = [
    (KQuant::Q4K, GgmlDType::Q4K),
    (KQuant::Q5K, GgmlDType::Q5K),
    (KQuant::Q6K, GgmlDType::Q6K),
];

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Random f32 weights quantized by candle to `dtype`.
fn quantized(rng: &mut StdRng, n: usize, k: usize, dtype: GgmlDType) -> QTensor {
    let w = Tensor::from_vec(random(rng, n * k, 0.1), (n, k), &Device::Cpu).expect("tensor");
    QTensor::quantize(&w, dtype).expect("quantize")
}

/// `x @ dequantize(w)^T` in f32, and per output the sum of |w_ij x_i|.
fn reference(w: &QTensor, x: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let wf = w.dequantize(&Device::Cpu).expect("dequantize");
    let out = x.matmul(&wf.t().expect("t")).expect("matmul");
    let mag = x
        .abs()
        .expect("abs")
        .matmul(&wf.abs().expect("abs").t().expect("t"))
        .expect("matmul");
    (
        out.flatten_all().expect("flat").to_vec1().expect("vec"),
        mag.flatten_all().expect("flat").to_vec1().expect("vec"),
    )
}

fn isas() -> Vec<Isa> {
    if !Isa::Avx512.available() {
        eprintln!("note: this CPU lacks AVX-512 VNNI: the AVX-512 kernels are not tested here");
    }
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}

/// Each instruction set is within the activation quantization's error of the
/// exact product of the dequantized weights (Q8_K: at most half a step of
/// 1/127 of the block's largest value per element), and the SIMD paths
/// agree with the scalar one up to f32 summation order.
#[test]
fn kquant_paths_match_dequantized_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for (kind, dtype) in KINDS {
        for &(n, k, m) in &[(1, 256, 1), (7, 512, 3), (40, 1536, 2), (96, 768, 1)] {
            let w = quantized(&mut rng, n, k, dtype);
            let x =
                Tensor::from_vec(random(&mut rng, m * k, 3.0), (m, k), &Device::Cpu).expect("x");
            let (want, mag) = reference(&w, &x);
            let scalar = KQuantMatMul::from_qtensor(&w)
                .and_then(|mm| mm.with_isa(Isa::Scalar))
                .expect("k-quant tensor");
            assert_eq!(scalar.kind(), kind);
            let base: Vec<f32> = scalar
                .forward(&x)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            for i in 0..want.len() {
                let err = (base[i] - want[i]).abs();
                assert!(
                    err <= 0.01 * mag[i],
                    "{kind:?} {n}x{k} m={m} out {i}: {} vs exact {} (magnitude {})",
                    base[i],
                    want[i],
                    mag[i]
                );
            }
            for isa in isas() {
                let mm = scalar.clone().with_isa(isa).expect("available");
                let got: Vec<f32> = mm
                    .forward(&x)
                    .expect("forward")
                    .flatten_all()
                    .expect("flat")
                    .to_vec1()
                    .expect("vec");
                for i in 0..got.len() {
                    assert!(
                        (got[i] - base[i]).abs() <= 1e-5 * mag[i] + 1e-6,
                        "{kind:?} {isa:?} {n}x{k} out {i}: {} vs scalar {}",
                        got[i],
                        base[i]
                    );
                }
            }
        }
    }
}

/// Against candle's own k-quant `QMatMul` (which also quantizes the
/// activations to Q8_K): the same integer sums, so only rounding ties and
/// the f32 summation order differ.
#[test]
fn kquant_matches_candle_qmatmul() {
    let mut rng = StdRng::seed_from_u64(12);
    for (kind, dtype) in KINDS {
        let (n, k, m) = (64, 1024, 2);
        let w = quantized(&mut rng, n, k, dtype);
        let x = Tensor::from_vec(random(&mut rng, m * k, 2.0), (m, k), &Device::Cpu).expect("x");
        let (_, mag) = reference(&w, &x);
        let mm = KQuantMatMul::from_qtensor(&w).expect("k-quant");
        let ours: Vec<f32> = mm
            .forward(&x)
            .expect("ours")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let theirs: Vec<f32> = QMatMul::from_qtensor(w)
            .expect("qmatmul")
            .forward(&x)
            .expect("candle")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        for i in 0..ours.len() {
            assert!(
                (ours[i] - theirs[i]).abs() <= 2e-3 * mag[i],
                "{kind:?} out {i}: {} vs candle {}",
                ours[i],
                theirs[i]
            );
        }
    }
}

/// A hand-made Q6_K block: every quant 33 (weight `d * scale`), scales 1..16.
#[test]
fn q6k_hand_computed_block() {
    let mut blk = vec![0u8; 210];
    // Low nibble 1, high bits 2 (= 32): q = 33 for all 256 values.
    for b in &mut blk[..128] {
        *b = 0x11;
    }
    for b in &mut blk[128..192] {
        *b = 0b1010_1010;
    }
    for s in 0..16 {
        blk[192 + s] = (s + 1) as u8;
    }
    blk[208..210].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    let x = vec![1f32; QK_K];
    // sum over 16 sub-blocks of 0.5 * scale * 1 * 16 values = 8 * (1 + ... + 16) = 1088.
    for isa in isas() {
        let mm = KQuantMatMul::from_blocks(KQuant::Q6K, 1, QK_K, &blk)
            .and_then(|m| m.with_isa(isa))
            .expect("valid");
        let q = Q8KRows::quantize(&x, 1, QK_K);
        let mut out = [0f32];
        mm.matmul_q8k(&q, &mut out);
        assert!((out[0] - 1088.0).abs() < 1e-3, "{isa:?}: {}", out[0]);
    }
}

#[test]
fn rejects_bad_shapes_and_other_dtypes() {
    assert!(KQuantMatMul::from_blocks(KQuant::Q4K, 1, 128, vec![0u8; 72]).is_none());
    assert!(KQuantMatMul::from_blocks(KQuant::Q4K, 2, 256, vec![0u8; 144]).is_none());
    let w = Tensor::zeros((4, 256), DType::F32, &Device::Cpu).expect("zeros");
    let q4_0 = QTensor::quantize(&w, GgmlDType::Q4_0).expect("q4_0");
    assert!(KQuantMatMul::from_qtensor(&q4_0).is_none());
    assert!(HalfMatMul::from_qtensor(&q4_0).is_none());
    let mm = KQuantMatMul::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4K).expect("q4k"))
        .expect("q4k");
    let wrong = Tensor::zeros((1, 128), DType::F32, &Device::Cpu).expect("zeros");
    assert!(mm.forward(&wrong).is_err());
}

/// F16 and BF16: each path against the widened f32 product.
#[test]
fn half_paths_match_f32() {
    let mut rng = StdRng::seed_from_u64(13);
    for (kind, dtype) in [(Half::F16, GgmlDType::F16), (Half::Bf16, GgmlDType::BF16)] {
        for &(n, k, m) in &[(3, 37, 2), (17, 576, 3), (64, 1536, 1)] {
            let w = quantized(&mut rng, n, k, dtype);
            let x =
                Tensor::from_vec(random(&mut rng, m * k, 3.0), (m, k), &Device::Cpu).expect("x");
            let (want, mag) = reference(&w, &x);
            for isa in isas() {
                let mm = HalfMatMul::from_qtensor(&w)
                    .and_then(|mm| mm.with_isa(isa))
                    .expect("half tensor");
                assert_eq!(mm.kind(), kind);
                let got: Vec<f32> = mm
                    .forward(&x)
                    .expect("f")
                    .flatten_all()
                    .expect("f")
                    .to_vec1()
                    .expect("v");
                for i in 0..got.len() {
                    assert!(
                        (got[i] - want[i]).abs() <= 1e-5 * mag[i] + 1e-6,
                        "{kind:?} {isa:?} {n}x{k} out {i}: {} vs {}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

/// A row's result does not depend on the other rows computed with it.
#[test]
fn batch_invariant() {
    let mut rng = StdRng::seed_from_u64(14);
    for (_, dtype) in KINDS {
        let (n, k) = (48, 512);
        let w = quantized(&mut rng, n, k, dtype);
        let mm = KQuantMatMul::from_qtensor(&w).expect("k-quant");
        let xs = random(&mut rng, 5 * k, 2.0);
        let all: Vec<f32> = mm
            .forward(&Tensor::from_vec(xs.clone(), (5, k), &Device::Cpu).expect("x"))
            .expect("f")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        for r in 0..5 {
            let one: Vec<f32> = mm
                .forward(
                    &Tensor::from_vec(xs[r * k..(r + 1) * k].to_vec(), (1, k), &Device::Cpu)
                        .expect("x"),
                )
                .expect("f")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            assert_eq!(one, all[r * n..(r + 1) * n].to_vec());
        }
    }
}

/// Q5_0 and Q5_1 (the k-quant files' matrices with rows not a multiple of
/// 256): each path within the activation quantization's error of the
/// dequantized product, SIMD equal to scalar up to summation order.
#[test]
fn q5_paths_match_dequantized_reference() {
    use sovereign_kernels::Q5MatMul;
    let mut rng = StdRng::seed_from_u64(15);
    for &(n, k, m, dtype) in &[
        (1, 32, 1, GgmlDType::Q5_0),
        (5, 96, 2, GgmlDType::Q5_0),
        (33, 640, 3, GgmlDType::Q5_0),
        (64, 1024, 1, GgmlDType::Q5_0),
        (1, 32, 1, GgmlDType::Q5_1),
        (9, 160, 2, GgmlDType::Q5_1),
        (40, 576, 3, GgmlDType::Q5_1),
    ] {
        let w = quantized(&mut rng, n, k, dtype);
        let x = Tensor::from_vec(random(&mut rng, m * k, 3.0), (m, k), &Device::Cpu).expect("x");
        let (want, mag) = reference(&w, &x);
        let scalar = Q5MatMul::from_qtensor(&w)
            .and_then(|mm| mm.with_isa(Isa::Scalar))
            .expect("q5");
        assert_eq!(scalar.name(), format!("{dtype:?}"));
        let base: Vec<f32> = scalar
            .forward(&x)
            .expect("f")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        for i in 0..want.len() {
            assert!(
                (base[i] - want[i]).abs() <= 0.01 * mag[i],
                "{n}x{k} out {i}: {} vs exact {}",
                base[i],
                want[i]
            );
        }
        for isa in isas() {
            let got: Vec<f32> = scalar
                .clone()
                .with_isa(isa)
                .expect("isa")
                .forward(&x)
                .expect("f")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            for i in 0..got.len() {
                assert!(
                    (got[i] - base[i]).abs() <= 1e-5 * mag[i] + 1e-6,
                    "{isa:?} {n}x{k} out {i}: {} vs scalar {}",
                    got[i],
                    base[i]
                );
            }
        }
    }
}
