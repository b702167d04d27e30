//! Q8_0 matmul (the output head's format): every instruction set against the
//! scalar reference and against candle's `QMatMul`, on random tensors and on
//! the demo model's `token_embd` (49152 x 576).

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_kernels::{Isa, Q80MatMul, Q8Rows, QK};

fn random_q80(rng: &mut StdRng, n: usize, k: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n * k / QK {
        out.extend_from_slice(&f16::from_f32(rng.gen_range(0.0005f32..0.01)).to_le_bytes());
        for _ in 0..QK {
            out.push(rng.gen());
        }
    }
    out
}

/// Per output, the sum over blocks of |d_w d_x sumi| in f64 (exact sums).
fn magnitudes(w: &[u8], q: &Q8Rows, n: usize, k: usize) -> Vec<f64> {
    let kb = k / QK;
    let mut out = Vec::new();
    for r in 0..q.rows() {
        for j in 0..n {
            let mut s = 0f64;
            for b in 0..kb {
                let blk = &w[(j * kb + b) * 34..][..34];
                let d = f64::from(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                let qy = q.block(r, b);
                let sumi: i64 = (0..QK)
                    .map(|i| i64::from(blk[2 + i] as i8) * i64::from(qy[i]))
                    .sum();
                s += (d * f64::from(q.row_d(r)[b]) * sumi as f64).abs();
            }
            out.push(s);
        }
    }
    out
}

fn run(mm: &Q80MatMul, x: &[f32], m: usize) -> Vec<f32> {
    let q = Q8Rows::quantize(x, m, mm.k());
    let mut out = vec![0f32; m * mm.n()];
    mm.matmul_q8(&q, &mut out);
    out
}

fn simd_isas() -> Vec<Isa> {
    if !Isa::Avx512.available() {
        eprintln!("note: this CPU lacks AVX-512 VNNI: the AVX-512 kernels are not tested here");
    }
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    assert!(!isas.is_empty(), "this CPU has neither AVX2 nor AVX-512");
    isas
}

/// SIMD vs scalar: the integer sums are exact, so only the f32 summation
/// order differs; bound 4 * nb * 2^-24 of the sum of absolute block terms.
#[test]
fn simd_paths_match_scalar() {
    let mut rng = StdRng::seed_from_u64(5);
    for &(n, k, m) in &[
        (1, 32, 1),
        (3, 64, 2),
        (9, 224, 3),
        (33, 160, 1),
        (100, 576, 5),
        (64, 1536, 1),
    ] {
        let w = random_q80(&mut rng, n, k);
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3f32..3.0)).collect();
        let scalar = Q80MatMul::from_blocks(n, k, &w)
            .and_then(|mm| mm.with_isa(Isa::Scalar))
            .expect("valid");
        let want = run(&scalar, &x, m);
        let mags = magnitudes(&w, &Q8Rows::quantize(&x, m, k), n, k);
        for isa in simd_isas() {
            let got = run(&scalar.clone().with_isa(isa).expect("isa"), &x, m);
            for i in 0..got.len() {
                let tol = 4.0 * (k / QK) as f64 * mags[i] * f64::from(f32::EPSILON) / 2.0 + 1e-30;
                assert!(
                    (f64::from(got[i]) - f64::from(want[i])).abs() <= tol,
                    "{isa:?} n={n} k={k} m={m} out {i}: {} vs scalar {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// A block computed by hand: w = 2 * (1, -1, 3, 0, ..), x = (127, 127, 127, 0, ..).
#[test]
fn scalar_reference_matches_hand_computed_block() {
    let mut w = f16::from_f32(2.0).to_le_bytes().to_vec();
    let mut vals = [0i8; 32];
    vals[0] = 1;
    vals[1] = -1;
    vals[2] = 3;
    vals[31] = -128;
    w.extend(vals.iter().map(|&v| v as u8));
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 127.0;
    x[2] = 127.0;
    x[31] = 1.0;
    // d_x = 1, q_x = (127, 127, 127, 0.., 1): sumi = 127 - 127 + 381 - 128 = 253.
    let mm = Q80MatMul::from_blocks(1, 32, &w)
        .and_then(|m| m.with_isa(Isa::Scalar))
        .expect("valid");
    assert_eq!(run(&mm, &x, 1), vec![2.0 * 253.0]);
    for isa in simd_isas() {
        let mm = mm.clone().with_isa(isa).expect("isa");
        assert_eq!(run(&mm, &x, 1), vec![2.0 * 253.0], "{isa:?}");
    }
}

/// Against candle's Q8_0 `QMatMul` (same activation quantization, ggml's
/// formula): equal up to summation order and candle's own rounding of the
/// activation scale; bound 1e-4 of the sum of absolute block terms. k is
/// kept off multiples of 256: there candle 0.11 (AVX-512 VNNI CPUs) takes a
/// repacked path that quantizes activations per 256 values (Q8_K), not per 32
/// as ggml's Q8_0 dot product (and this crate) do, a different rounding.
#[test]
fn forward_matches_candle_and_rejects_other_dtypes() {
    let mut rng = StdRng::seed_from_u64(9);
    for &(n, k, dims) in &[(300, 576, &[1usize, 1][..]), (64, 1568, &[2, 3][..])] {
        let w = random_q80(&mut rng, n, k);
        let qt = QTensor::new(
            QStorage::from_data(Cow::Borrowed(&w), &Device::Cpu, GgmlDType::Q8_0).expect("storage"),
            (n, k),
        )
        .expect("qtensor");
        let mm = Q80MatMul::from_qtensor(&qt).expect("Q8_0");
        let m: usize = dims.iter().product();
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3f32..3.0)).collect();
        let mut xdims = dims.to_vec();
        xdims.push(k);
        let xt = Tensor::from_vec(x.clone(), xdims, &Device::Cpu).expect("x");
        let want = QMatMul::from_qtensor(qt)
            .and_then(|q| q.forward(&xt))
            .expect("candle");
        let got = mm.forward(&xt).expect("forward");
        assert_eq!(got.dims(), want.dims());
        let g = got
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        let c = want
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        let mags = magnitudes(&w, &Q8Rows::quantize(&x, m, k), n, k);
        for i in 0..g.len() {
            assert!(
                (f64::from(g[i]) - f64::from(c[i])).abs() <= 1e-4 * mags[i] + 1e-6,
                "n={n} k={k} out {i}: {} vs candle {}",
                g[i],
                c[i]
            );
        }
    }
    let x = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).expect("x");
    let q41 = QTensor::quantize(&x, GgmlDType::Q4_1).expect("q4_1");
    assert!(Q80MatMul::from_qtensor(&q41).is_none(), "Q4_1 is not Q8_0");
    assert!(
        Q80MatMul::from_blocks(2, 64, vec![0u8; 3 * 34]).is_none(),
        "wrong length"
    );
}

/// The demo model's output head: every path against candle on two rows.
#[test]
fn demo_model_output_head() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script)
        .output()
        .expect("run scripts/fetch-model");
    assert!(
        out.status.success(),
        "fetch-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).expect("utf-8 path");
    let mut file = std::fs::File::open(path.trim()).expect("open model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let qt = content
        .tensor(&mut file, "token_embd.weight", &Device::Cpu)
        .expect("token_embd");
    let mm = Q80MatMul::from_qtensor(&qt).expect("token_embd is Q8_0");
    assert_eq!((mm.n(), mm.k()), (49152, 576));
    let w = qt.data().expect("bytes").into_owned();
    let mut rng = StdRng::seed_from_u64(2);
    let x: Vec<f32> = (0..2 * 576).map(|_| rng.gen_range(-3f32..3.0)).collect();
    let xt = Tensor::from_vec(x.clone(), (1, 2, 576), &Device::Cpu).expect("x");
    let c = QMatMul::from_qtensor(qt)
        .and_then(|q| q.forward(&xt))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("candle");
    let mags = magnitudes(&w, &Q8Rows::quantize(&x, 2, 576), 49152, 576);
    let scalar = run(&mm.clone().with_isa(Isa::Scalar).expect("scalar"), &x, 2);
    for isa in simd_isas() {
        let g = run(&mm.clone().with_isa(isa).expect("isa"), &x, 2);
        for i in 0..g.len() {
            let tol = 4.0 * 18.0 * mags[i] * f64::from(f32::EPSILON) / 2.0 + 1e-30;
            assert!(
                (f64::from(g[i]) - f64::from(scalar[i])).abs() <= tol,
                "{isa:?} {i}"
            );
            assert!(
                (f64::from(g[i]) - f64::from(c[i])).abs() <= 1e-4 * mags[i] + 1e-6,
                "{isa:?} {i}"
            );
        }
    }
}
