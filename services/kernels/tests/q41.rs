//! Q4_1 matmul: every instruction set against the scalar reference and
//! against candle's own `QMatMul`, on random tensors and on the demo model.

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovereign_kernels::{Isa, Q41MatMul, Q8Rows, Q4_1_BLOCK_BYTES, QK};

/// Random Q4_1 blocks with scales like a trained model's (d, m ~ 1e-2).
fn random_q41(rng: &mut StdRng, n: usize, k: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * k / QK * Q4_1_BLOCK_BYTES);
    for _ in 0..n * k / QK {
        let d = f16::from_f32(rng.gen_range(0.001f32..0.05));
        let m = f16::from_f32(rng.gen_range(-0.4f32..0.0));
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        for _ in 0..QK / 2 {
            out.push(rng.gen());
        }
    }
    out
}

fn random_x(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-3f32..3.0)).collect()
}

/// Per output, the sum over blocks of |d_w d_x sumi| + |m_w s_x| computed in
/// f64: the scale of the terms whose f32 summation order differs between paths.
fn magnitudes(w: &[u8], q: &Q8Rows, n: usize, k: usize) -> Vec<f64> {
    let kb = k / QK;
    let mut out = Vec::new();
    for r in 0..q.rows() {
        for j in 0..n {
            let mut s = 0f64;
            for b in 0..kb {
                let blk = &w[(j * kb + b) * Q4_1_BLOCK_BYTES..][..Q4_1_BLOCK_BYTES];
                let d = f64::from(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                let m = f64::from(f16::from_le_bytes([blk[2], blk[3]]).to_f32());
                let qy = q.block(r, b);
                let mut sumi = 0i64;
                for i in 0..QK / 2 {
                    sumi += i64::from(blk[4 + i] & 15) * i64::from(qy[i]);
                    sumi += i64::from(blk[4 + i] >> 4) * i64::from(qy[i + QK / 2]);
                }
                let (dy, sy) = (q.row_d(r)[b], q.row_s(r)[b]);
                s += (d * f64::from(dy) * sumi as f64).abs() + (m * f64::from(sy)).abs();
            }
            out.push(s);
        }
    }
    out
}

fn run(mm: &Q41MatMul, x: &[f32], m: usize) -> Vec<f32> {
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
    // The project's machines have both; a CPU without them would leave only
    // the scalar path untested against itself.
    assert!(!isas.is_empty(), "this CPU has neither AVX2 nor AVX-512");
    isas
}

/// Each SIMD path equals the scalar reference up to f32 reordering: the
/// integer sums are exact, so the only difference is the order of adding
/// per-block (and per-lane) f32 products, bounded by a few ulps (2^-24 each)
/// of the sum of absolute terms per block count. We allow 4 * nb * 2^-24 of it.
#[test]
fn simd_paths_match_scalar_on_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    // k not a multiple of 256, odd n, batch 1..17; block counts 1, 2, 3, 5, 6,
    // 7, 18, 25, 48 reach every tail of the grouped layout (groups of 4, a
    // pair, a single block).
    for &(n, k, m) in &[
        (1, 32, 1),
        (3, 64, 1),
        (5, 192, 4),
        (9, 224, 2),
        (7, 96, 3),
        (33, 160, 1),
        (192, 576, 17),
        (65, 800, 2),
        (576, 1536, 1),
    ] {
        let w = random_q41(&mut rng, n, k);
        let x = random_x(&mut rng, m * k);
        let scalar = Q41MatMul::from_blocks(n, k, w.clone())
            .and_then(|mm| mm.with_isa(Isa::Scalar))
            .expect("valid shape");
        let want = run(&scalar, &x, m);
        let mags = magnitudes(&w, &Q8Rows::quantize(&x, m, k), n, k);
        let nb = (k / QK) as f64;
        for isa in simd_isas() {
            let mm = scalar.clone().with_isa(isa).expect("available");
            let got = run(&mm, &x, m);
            for (i, ((g, w), mag)) in got.iter().zip(&want).zip(&mags).enumerate() {
                let tol = 4.0 * nb * mag * f64::from(f32::EPSILON) / 2.0 + 1e-30;
                assert!(
                    (f64::from(*g) - f64::from(*w)).abs() <= tol,
                    "{isa:?} n={n} k={k} m={m} out {i}: {g} vs scalar {w} (tol {tol})"
                );
            }
        }
    }
}

/// The scalar reference is ggml's formula written out: check one block by hand.
#[test]
fn scalar_reference_matches_hand_computed_block() {
    // Weights: d = 0.5, m = -1, nibbles 0..15 in low halves, 15 in high halves.
    let mut w = Vec::new();
    w.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    w.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
    for i in 0..16u8 {
        w.push(i | (15 << 4));
    }
    // Activations: 127 * e_0 + 127 * e_16 -> d_x = 1, q = 127 at 0 and 16.
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[16] = 127.0;
    // Weight values: w_i = 0.5 * v_i - 1 -> w_0 = -1, w_16 = 6.5; exact dot = 127 * 5.5.
    let mm = Q41MatMul::from_blocks(1, 32, w).and_then(|m| m.with_isa(Isa::Scalar));
    let out = run(&mm.expect("valid"), &x, 1);
    assert_eq!(out, vec![127.0 * 5.5]);
}

/// Against candle's own Q4_1 matmul (`QMatMul`, generic ggml code with
/// candle's Q8_1 quantization), through `forward` with batch dimensions.
/// (candle debug-asserts an even block count, so k is a multiple of 64 here.)
/// candle rounds `s = f16(f16(sum) * f16(d))` where ggml (and this crate) use
/// `f16(sum * d)`: a relative difference up to ~2^-10 in `s`, so the bound is
/// 2e-3 of the sum of absolute terms (plus the reordering bound).
#[test]
fn forward_matches_candle_qmatmul() {
    let mut rng = StdRng::seed_from_u64(11);
    for &(n, k, dims) in &[
        (576, 576, &[1usize, 1][..]),
        (192, 576, &[2, 5][..]),
        (1536, 576, &[1, 3][..]),
        (576, 1536, &[4][..]),
        (45, 320, &[2, 1, 3][..]),
    ] {
        let w = random_q41(&mut rng, n, k);
        let qt = QTensor::new(
            QStorage::from_data(Cow::Borrowed(&w), &Device::Cpu, GgmlDType::Q4_1).expect("storage"),
            (n, k),
        )
        .expect("qtensor");
        let m: usize = dims.iter().product();
        let x = random_x(&mut rng, m * k);
        let mut xdims = dims.to_vec();
        xdims.push(k);
        let xt = Tensor::from_vec(x.clone(), xdims.clone(), &Device::Cpu).expect("x");
        let mm = Q41MatMul::from_qtensor(&qt).expect("Q4_1");
        let want = QMatMul::from_qtensor(qt)
            .and_then(|q| q.forward(&xt))
            .expect("candle matmul");
        let mags = magnitudes(&w, &Q8Rows::quantize(&x, m, k), n, k);
        for isa in [Isa::Scalar].into_iter().chain(simd_isas()) {
            let got = mm
                .clone()
                .with_isa(isa)
                .expect("isa")
                .forward(&xt)
                .expect("forward");
            assert_eq!(got.dims(), want.dims(), "output shape");
            let g = got
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("vec");
            let c = want
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("vec");
            for (i, ((g, c), mag)) in g.iter().zip(&c).zip(&mags).enumerate() {
                let tol = 2e-3 * mag + 1e-6;
                assert!(
                    (f64::from(*g) - f64::from(*c)).abs() <= tol,
                    "{isa:?} n={n} k={k} out {i}: {g} vs candle {c} (tol {tol})"
                );
            }
        }
    }
}

#[test]
fn rejects_other_dtypes_and_bad_inputs() {
    let x = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).expect("x");
    let q8 = QTensor::quantize(&x, GgmlDType::Q8_0).expect("q8_0");
    assert!(Q41MatMul::from_qtensor(&q8).is_none(), "Q8_0 is not Q4_1");
    assert!(
        Q41MatMul::from_blocks(2, 48, vec![0; 2 * 20]).is_none(),
        "k % 32 != 0"
    );
    assert!(
        Q41MatMul::from_blocks(2, 64, vec![0; 3 * 20]).is_none(),
        "wrong length"
    );
    let mm = Q41MatMul::from_blocks(3, 64, vec![0; 3 * 2 * 20]).expect("valid");
    let err =
        mm.forward(&Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).expect("x"));
    let msg = err.expect_err("k mismatch").to_string();
    assert!(msg.contains("32 features"), "{msg}");
    let err =
        mm.forward(&Tensor::zeros((1, 64), candle_core::DType::F16, &Device::Cpu).expect("x"));
    assert!(err.expect_err("f16 input").to_string().contains("f32"));
    let empty = Tensor::zeros((0, 64), candle_core::DType::F32, &Device::Cpu).expect("x");
    assert_eq!(mm.forward(&empty).expect("no rows").dims(), &[0, 3]);
    let t = Tensor::zeros((64, 2), candle_core::DType::F32, &Device::Cpu).expect("x");
    let out = mm
        .forward(&t.t().expect("transposed"))
        .expect("non-contiguous input");
    assert_eq!(out.dims(), &[2, 3]);
}

/// All Q4_1 tensors of the demo model load; on each layer-0 shape, SIMD
/// equals scalar within the reordering bound and candle within its bound,
/// on activations shaped like the model's (unit RMS).
#[test]
fn demo_model_q41_tensors() {
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
    let mut q41 = 0;
    let mut rng = StdRng::seed_from_u64(3);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if content.tensor_infos[name].ggml_dtype != GgmlDType::Q4_1 {
            continue;
        }
        q41 += 1;
        let qt = content
            .tensor(&mut file, name, &Device::Cpu)
            .expect("tensor");
        let mm = Q41MatMul::from_qtensor(&qt).expect("loads as Q4_1");
        if !name.starts_with("blk.0.") {
            continue;
        }
        let (n, k) = (mm.n(), mm.k());
        let m = 3;
        let x = random_x(&mut rng, m * k);
        let xt = Tensor::from_vec(x.clone(), (1, m, k), &Device::Cpu).expect("x");
        let w = qt.data().expect("bytes").into_owned();
        let want = QMatMul::from_qtensor(qt)
            .and_then(|q| q.forward(&xt))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle");
        let scalar = mm.clone().with_isa(Isa::Scalar).expect("scalar");
        let sref = run(&scalar, &x, m);
        let mags = magnitudes(&w, &Q8Rows::quantize(&x, m, k), n, k);
        let nb = (k / QK) as f64;
        for isa in simd_isas() {
            let got = run(&mm.clone().with_isa(isa).expect("isa"), &x, m);
            for i in 0..got.len() {
                let (g, s, c, mag) = (got[i], sref[i], want[i], mags[i]);
                let tol = 4.0 * nb * mag * f64::from(f32::EPSILON) / 2.0 + 1e-30;
                assert!(
                    (f64::from(g) - f64::from(s)).abs() <= tol,
                    "{name} {isa:?} {i}: {g} vs {s}"
                );
                assert!(
                    (f64::from(g) - f64::from(c)).abs() <= 2e-3 * mag + 1e-6,
                    "{name} {isa:?} {i}: {g} vs candle {c}"
                );
            }
        }
    }
    assert_eq!(q41, 210, "the demo model has 210 Q4_1 tensors");
}

/// Stacking q, k, v (or gate, up) gives, bit for bit, the outputs of the
/// separate matrices side by side: each output is the same row dot product.
#[test]
fn stacked_rows_equal_separate_outputs() {
    let mut rng = StdRng::seed_from_u64(13);
    let k = 576;
    let parts: Vec<Q41MatMul> = [576, 192, 192]
        .iter()
        .map(|&n| Q41MatMul::from_blocks(n, k, random_q41(&mut rng, n, k)).expect("valid"))
        .collect();
    let refs: Vec<&Q41MatMul> = parts.iter().collect();
    let stacked = Q41MatMul::stack_rows(&refs).expect("same k");
    assert_eq!(stacked.n(), 960);
    let x = Tensor::from_vec(random_x(&mut rng, 2 * k), (2, k), &Device::Cpu).expect("x");
    let whole = stacked.forward(&x).expect("stacked");
    let mut at = 0;
    for p in &parts {
        let part = whole
            .narrow(1, at, p.n())
            .and_then(|t| t.to_vec2::<f32>())
            .expect("narrow");
        let alone = p
            .forward(&x)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("alone");
        assert_eq!(part, alone);
        at += p.n();
    }
    let other = Q41MatMul::from_blocks(4, 64, vec![0u8; 4 * 2 * 20]).expect("valid");
    assert!(
        Q41MatMul::stack_rows(&[&parts[0], &other]).is_none(),
        "different k"
    );
    assert!(Q41MatMul::stack_rows(&[]).is_none(), "nothing to stack");
}
