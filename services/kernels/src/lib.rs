/*!
Quantized matmul kernels for the inference engine.

[`Q41MatMul`] multiplies f32 activations by GGUF Q4_1 weights the way ggml
does: each row of activations is quantized to Q8_1 blocks of 32 (`d`, `s =
d * sum(q)`, 32 signed bytes), and every output is the sum over blocks of
`d_w * d_x * sumi + m_w * s_x`, where `sumi` is the exact integer dot product
of the 4-bit weights with the 8-bit activations. The weights are used as they
are in the file (no requantization, no repacking): 20-byte blocks of `d`
(f16), `m` (f16) and 16 bytes of nibbles.

The inner dot product is picked at run time with `is_x86_feature_detected!`:
AVX-512 (F, BW, VL, VNNI), AVX2 with FMA and F16C, or a portable scalar
version, so one binary runs on any x86-64. All three compute the same integer
sums; they differ only in the order the per-block f32 terms are added (see
[`Isa`]).

Rows are spread over this crate's worker pool (`pool.rs`), which the
engine's other parallel work uses too ([`par_chunks_mut`]), so the engine has
one set of worker threads, sized by `CANDLE_NUM_THREADS` (or
`RAYON_NUM_THREADS`) before the first call. A call returns once every chunk
of its work is done, whether or not every worker ran, so a core taken by
another process does not stall it. `SOVEREIGN_KERNELS_POOL=rayon` uses the
current rayon pool instead (see `use_rayon`).

With several activation rows (a prompt, a batch of sequences), the SIMD
kernels (AVX2 and AVX-512) take them four at a time: a weight row's blocks
are loaded and unpacked (nibbles, scales) once for the four, and each row
keeps its own accumulators. Every row does exactly the f32 operations, in the same order,
that it does alone, so a row's output is bit for bit the same whatever the
batch or prompt chunk it is computed in (see `RowsDot`).

Use in an engine: where `QMatMul::from_qtensor` would take a Q4_1 tensor,
`Q41MatMul::from_qtensor(&qtensor)` (then `forward` as with `QMatMul`); for
projections that share an input, `Q41MatMul::stack_rows(&[&q, &k, &v])` and
split the output with `Tensor::narrow`; for the Q8_0 output head
[`Q80MatMul`]; for the k-quants (Q4_K, Q5_K, Q6_K) [`KQuantMatMul`], with
activations quantized to Q8_K ([`Q8KRows`]); for Q5_0/Q5_1 [`Q5MatMul`]; for F16/BF16 weights
[`HalfMatMul`]. All are `Send + Sync` and hold their own copy of the weights,
so the `QTensor` can be dropped afterwards. [`attend`] is one head of
causal attention for one row, with the same bits on every instruction set.
*/
#![allow(unsafe_code)]

mod attention;
mod half_mm;
mod kquant;
mod lanes;
mod pool;
mod q5;
mod q8;
mod q80;
mod q8k;
mod round;
mod simd;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Storage, Tensor};
use pool::SharedOut;

pub use attention::{attend, ordered_dot};
pub use half_mm::{Half, HalfMatMul};
pub use kquant::{KQuant, KQuantMatMul};
pub use pool::par_chunks_mut;
pub use q5::{Q5MatMul, Q5_0_BLOCK_BYTES, Q5_1_BLOCK_BYTES};
pub use q8::Q8Rows;
pub use q80::Q80MatMul;
pub use q8k::{Q8KRows, QK_K};

/// Bytes of one GGUF Q4_1 block: `d` (f16), `m` (f16), 16 bytes holding 32 nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Values per Q4_1 / Q8_1 block.
pub const QK: usize = 32;

/// The instruction set a kernel uses for the block dot products.
///
/// Every variant computes each block's integer sum exactly; the f32 results
/// differ from [`Isa::Scalar`] only by the order in which per-block (and, for
/// the SIMD paths, per-lane) products are added, that is by a few f32 ulps of
/// the sum of absolute terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, one block at a time (the reference).
    Scalar,
    /// AVX2 + FMA + F16C: 256-bit `maddubs`/`madd`, one block per step.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI: 512-bit `vpdpbusd` for Q4_1, Q8_0, Q5_0,
    /// Q5_1 and the k-quants (F16/BF16 use the AVX2 kernels).
    Avx512,
}

impl Isa {
    /// The fastest instruction set this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.available() {
            Isa::Avx512
        } else if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run kernels built for `self` (std caches the
    /// detection; inlined, the check is a few loads in every dot product).
    #[inline]
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A Q4_1 weight matrix `[n, k]` ready to multiply activations `[.., k]` into `[.., n]`.
#[derive(Clone)]
pub struct Q41MatMul {
    n: usize,
    k: usize,
    /// The 16 nibble bytes of every block, row-major (`n` rows of `k / 32` blocks).
    qs: Vec<u8>,
    /// The f16 bits of every block's `d`, same order.
    d: Vec<u16>,
    /// The f16 bits of every block's `m`, same order.
    m: Vec<u16>,
    isa: Isa,
}

impl std::fmt::Debug for Q41MatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q41MatMul")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl Q41MatMul {
    /// Takes the weights of a 2-D Q4_1 `QTensor` of shape `[n, k]` (GGUF's
    /// `[out, in]`). `None` if the dtype is not Q4_1, the tensor is not 2-D,
    /// or its bytes cannot be read.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        if t.dtype() != GgmlDType::Q4_1 {
            return None;
        }
        let (n, k) = t.shape().dims2().ok()?;
        let data = t.data().ok()?;
        Self::from_blocks(n, k, &data)
    }

    /// Builds from raw GGUF Q4_1 bytes for a `[n, k]` matrix. `None` if `k`
    /// is not a positive multiple of 32 or the byte count does not match.
    ///
    /// The blocks' fields are split into three arrays (nibbles, `d`, `m`) so
    /// that SIMD loads cover several blocks; every bit is kept as it is.
    pub fn from_blocks(n: usize, k: usize, blocks: impl AsRef<[u8]>) -> Option<Self> {
        let blocks = blocks.as_ref();
        if k == 0 || !k.is_multiple_of(QK) || blocks.len() != n * (k / QK) * Q4_1_BLOCK_BYTES {
            return None;
        }
        let count = n * (k / QK);
        let mut qs = Vec::with_capacity(count * QK / 2);
        let mut d = Vec::with_capacity(count);
        let mut m = Vec::with_capacity(count);
        for blk in blocks.chunks_exact(Q4_1_BLOCK_BYTES) {
            d.push(u16::from_le_bytes([blk[0], blk[1]]));
            m.push(u16::from_le_bytes([blk[2], blk[3]]));
            qs.extend_from_slice(&blk[4..]);
        }
        let isa = Isa::detect();
        tracing::trace!(n, k, ?isa, "Q4_1 matmul");
        Some(Self {
            n,
            k,
            qs,
            d,
            m,
            isa,
        })
    }

    /// One matrix with the rows of `parts` one after another (all with the
    /// same `k`), for projections that read the same input (q, k, v; gate,
    /// up): one activation quantization and one pool call instead of several.
    /// The output's last dimension is the parts' `n`s in order (split it with
    /// `Tensor::narrow`). `None` if `parts` is empty or the `k`s differ.
    pub fn stack_rows(parts: &[&Q41MatMul]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k) {
            return None;
        }
        let mut out = Self {
            n: 0,
            k: first.k,
            qs: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
            isa: first.isa,
        };
        for p in parts {
            out.n += p.n;
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Some(out)
    }

    /// The same weights with the kernels of `isa`; `None` if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Option<Self> {
        if !isa.available() {
            return None;
        }
        self.isa = isa;
        Some(self)
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Output features (rows of the weight matrix).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of the weight matrix).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x @ w^T` for f32 `x` of shape `[.., k]` on the CPU, giving `[.., n]`;
    /// the semantics of `candle_core::quantized::QMatMul::forward`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (q, mut out_dims) = quantize_input("Q4_1", x, self.k)?;
        let mut out = vec![0f32; q.rows() * self.n];
        self.matmul_q8(&q, &mut out);
        out_dims.push(self.n);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `out[r * n + j] = dot(activation row r, weight row j)` for already
    /// quantized activations, spread over candle's worker pool.
    ///
    /// # Panics
    /// If `q` was not quantized with this matrix's `k` or `out` is not `q.rows() * n` long.
    pub fn matmul_q8(&self, q: &Q8Rows, out: &mut [f32]) {
        assert_eq!(q.k(), self.k, "activations quantized for another k");
        assert_eq!(out.len(), q.rows() * self.n, "output length");
        par_rows(self.n, self.k, q.rows(), out, Q41Rows { mm: self, q });
    }
}

/// The Q4_1 dot products of one [`Q41MatMul::matmul_q8`] call.
struct Q41Rows<'a> {
    mm: &'a Q41MatMul,
    q: &'a Q8Rows,
}

impl RowsDot for Q41Rows<'_> {
    #[inline]
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        let (mm, q) = (self.mm, self.q);
        let nb = mm.k / QK;
        let w = simd::WRow {
            qs: &mm.qs[j * nb * QK / 2..(j + 1) * nb * QK / 2],
            d: &mm.d[j * nb..(j + 1) * nb],
            m: &mm.m[j * nb..(j + 1) * nb],
        };
        let xs = std::array::from_fn(|i| simd::XRow {
            qs: q.row_qs(r + i),
            d: q.row_d(r + i),
            s: q.row_s(r + i),
        });
        simd::dot(mm.isa, &w, &xs)
    }
}

/// Checks `x` (`[.., k]`, f32, CPU) and quantizes it; returns the rows and
/// the outer dimensions.
pub(crate) fn quantize_input(
    what: &str,
    x: &Tensor,
    k: usize,
) -> candle_core::Result<(Q8Rows, Vec<usize>)> {
    let (xs, m, outer) = input_rows(what, x, k)?;
    Ok((Q8Rows::quantize(&xs, m, k), outer))
}

/// Checks `x` (`[.., k]`, f32, CPU) and copies its values out; returns them,
/// the number of rows and the outer dimensions.
pub(crate) fn input_rows(
    what: &str,
    x: &Tensor,
    k: usize,
) -> candle_core::Result<(Vec<f32>, usize, Vec<usize>)> {
    let dims = x.dims();
    let Some((&last, outer)) = dims.split_last() else {
        candle_core::bail!("{what} matmul: input is a scalar, expected [.., {k}]");
    };
    if last != k {
        candle_core::bail!(
            "{what} matmul: input has {last} features in {dims:?}, the weights expect {k}"
        );
    }
    if !matches!(x.device(), Device::Cpu) {
        candle_core::bail!("{what} matmul: input must be on the CPU");
    }
    if x.dtype() != candle_core::DType::F32 {
        candle_core::bail!("{what} matmul: input must be f32, got {:?}", x.dtype());
    }
    let m: usize = outer.iter().product();
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{what} matmul: input must be on the CPU");
    };
    let all = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    let Some(xs) = all.get(start..start + m * k) else {
        candle_core::bail!("{what} matmul: input storage is shorter than its layout");
    };
    Ok((xs.to_vec(), m, outer.to_vec()))
}

/// Activation rows the multi-row kernels take in one call (see [`RowsDot`]).
const ROW_TILE: usize = 4;

/// Weight rows [`par_rows`] hands to one [`RowsDot::dots`] call when there
/// are several activation rows. With one (decode) they go one at a time:
/// the AVX-512 Q5 kernel took 27 µs a call one at a time against 42 in
/// pairs at 1536x576 (`benches/rows.rs`), where with 32 rows pairs took
/// 530 µs against 890 for the same code one weight row at a time.
const WEIGHT_TILE: usize = 2;

/// The dot products of one matmul: weight row `j` with `R` consecutive
/// activation rows `r..r + R`, one weight-row unpacking shared by all of them.
///
/// Batch invariance: element `i` of the result must be bit for bit what
/// `dot::<1>(j, r + i)` gives, so a row's output does not depend on the rows
/// it is computed with (each row does the same f32 operations in the same
/// order whatever `R` is).
trait RowsDot: Sync {
    /// `[dot(j, r), dot(j, r + 1), .., dot(j, r + R - 1)]`.
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R];

    /// `[dot::<R>(j, r), dot::<R>(j + 1, r), .., dot::<R>(j + W - 1, r)]`,
    /// bit for bit; a kernel may override it to load each activation row
    /// once for the `W` weight rows.
    #[inline]
    fn dots<const W: usize, const R: usize>(&self, j: usize, r: usize) -> [[f32; R]; W] {
        std::array::from_fn(|i| self.dot::<R>(j + i, r))
    }
}

/// A one-row dot product `f(j, r)` is a [`RowsDot`] that takes its rows one by one.
impl<F: Fn(usize, usize) -> f32 + Sync> RowsDot for F {
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        std::array::from_fn(|i| self(j, r + i))
    }
}

/// `out[r * n + j] = dot(j, r)` for every weight row `j < n` and activation
/// row `r < m`, weight rows spread over the worker pool (each weight row is
/// read once while it is hot, for all activation rows): with several
/// activation rows, weight rows in tiles of [`WEIGHT_TILE`] (what is left
/// of a range one at a time), see [`weight_tile`].
fn par_rows<D: RowsDot>(n: usize, k: usize, m: usize, out: &mut [f32], dot: D) {
    assert_eq!(out.len(), m * n, "output length");
    let dst = SharedOut(out.as_mut_ptr());
    pool::par_ranges(n, n * m * k, |rows: std::ops::Range<usize>| {
        let paired_end = if m > 1 {
            rows.start + rows.len() / WEIGHT_TILE * WEIGHT_TILE
        } else {
            rows.start
        };
        // SAFETY: every weight row passed is below `n` and belongs to exactly
        // one range handed out by the pool, so no two workers write the
        // same element; `out` holds `m * n` values and outlives the pool call.
        unsafe {
            for j in (rows.start..paired_end).step_by(WEIGHT_TILE) {
                weight_tile::<WEIGHT_TILE, D>(&dot, &dst, n, m, j);
            }
            for j in paired_end..rows.end {
                weight_tile::<1, D>(&dot, &dst, n, m, j);
            }
        }
    });
}

/// Weight rows `j..j + W` against all `m` activation rows: activation rows
/// in tiles of [`ROW_TILE`], the last `m % ROW_TILE` in one smaller tile.
///
/// # Safety
/// `dst` points to `m * n` writable values, `j + W <= n`, and nothing else
/// reads or writes the columns `j..j + W` meanwhile.
unsafe fn weight_tile<const W: usize, D: RowsDot>(
    dot: &D,
    dst: &SharedOut,
    n: usize,
    m: usize,
    j: usize,
) {
    let tiled = m / ROW_TILE * ROW_TILE;
    // SAFETY: every `put` writes rows below `m` of the columns `j..j + W`
    // (caller).
    unsafe {
        for r in (0..tiled).step_by(ROW_TILE) {
            put(dst, n, j, r, dot.dots::<W, ROW_TILE>(j, r));
        }
        match m - tiled {
            1 => put(dst, n, j, tiled, dot.dots::<W, 1>(j, tiled)),
            2 => put(dst, n, j, tiled, dot.dots::<W, 2>(j, tiled)),
            3 => put(dst, n, j, tiled, dot.dots::<W, 3>(j, tiled)),
            _ => {}
        }
    }
}

/// `out[(r + i) * n + j + w] = vs[w][i]`.
///
/// # Safety
/// `dst` points to at least `(r + R) * n` values, `j + W <= n`, and nothing
/// else accesses those elements meanwhile.
#[inline(always)]
unsafe fn put<const W: usize, const R: usize>(
    dst: &SharedOut,
    n: usize,
    j: usize,
    r: usize,
    vs: [[f32; R]; W],
) {
    for (w, col) in vs.iter().enumerate() {
        for (i, &v) in col.iter().enumerate() {
            // SAFETY: `(r + i) * n + j + w < (r + R) * n` (caller).
            unsafe { dst.0.add((r + i) * n + j + w).write(v) };
        }
    }
}
