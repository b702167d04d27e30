/*!
Activations quantized to Q8_K, ggml's `quantize_row_q8_K_ref`: per block of
256, the value of largest magnitude `max` gives `iscale = -127 / max`, every
quant is `min(127, round_ties_even(iscale * x))`, `d = 1 / iscale` (f32), and
`bsums` holds the exact sum of each 16 quants (what the k-quant kernels need
for their mins and offsets). Quants stay in natural order.
*/

use crate::q8::abs_max;
use crate::round;

/// Values per k-quant super-block (and per Q8_K block).
pub const QK_K: usize = 256;

/// Rows of activations quantized to Q8_K.
#[derive(Clone, Debug)]
pub struct Q8KRows {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i16>,
}

impl Q8KRows {
    /// Quantizes `m` rows of `k` values (`xs.len() == m * k`, `k % 256 == 0`).
    ///
    /// # Panics
    /// If the lengths do not fit.
    pub fn quantize(xs: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK_K) && xs.len() == m * k, "Q8_K shape");
        let nb = m * k / QK_K;
        let mut qs = vec![0i8; m * k];
        let mut d = Vec::with_capacity(nb);
        let mut bsums = vec![0i16; nb * QK_K / 16];
        for (b, (x, q)) in xs
            .chunks_exact(QK_K)
            .zip(qs.chunks_exact_mut(QK_K))
            .enumerate()
        {
            let amax = abs_max(x);
            if amax == 0.0 {
                d.push(0.0);
                continue;
            }
            // The first value of largest magnitude, as a scan keeping strict maxima finds.
            let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
            let iscale = -127.0 / max;
            for (qj, &v) in q.iter_mut().zip(x) {
                // |iscale * v| <= 127 up to rounding; NaN becomes 0.
                *qj = round::ties_even(iscale * v).min(127) as i8;
            }
            for (s, chunk) in q.chunks_exact(16).enumerate() {
                bsums[b * QK_K / 16 + s] = chunk.iter().map(|&v| i16::from(v)).sum();
            }
            d.push(1.0 / iscale);
        }
        Self {
            rows: m,
            k,
            qs,
            d,
            bsums,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quants of row `r` (`k` bytes, natural order).
    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }

    /// The scale `d` of each block of row `r`.
    pub fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.k / QK_K;
        &self.d[r * nb..(r + 1) * nb]
    }

    /// The exact sums of each 16 quants of row `r` (16 per block).
    pub fn row_bsums(&self, r: usize) -> &[i16] {
        let n = self.k / 16;
        &self.bsums[r * n..(r + 1) * n]
    }
}
