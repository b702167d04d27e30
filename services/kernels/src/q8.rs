/*!
Activations quantized to Q8_1, ggml's `quantize_row_q8_1_ref`: per block of
32, `d = amax / 127` (stored as f16), `q = round(x / d)` (half away from
zero), `s = f16(d * sum(q))`. The quants are kept contiguous (so a SIMD load
covers whole blocks) and `d`, `s` are kept as the f32 values of their f16s.
*/

use half::f16;

use crate::QK;

/// Rows of activations quantized to Q8_1.
#[derive(Clone, Debug)]
pub struct Q8Rows {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    /// `(d, s)` per block, row-major.
    ds: Vec<[f32; 2]>,
}

impl Q8Rows {
    /// Quantizes `m` rows of `k` values (`xs.len() == m * k`, `k % 32 == 0`).
    ///
    /// # Panics
    /// If the lengths do not fit.
    pub fn quantize(xs: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && xs.len() == m * k, "Q8_1 shape");
        let mut qs = vec![0i8; m * k];
        let mut ds = Vec::with_capacity(m * k / QK);
        for (x, q) in xs.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (qi, &xi) in q.iter_mut().zip(x) {
                // |xi * id| <= 127 up to rounding, so the cast cannot saturate
                // for finite input; NaN becomes 0 (as casts define).
                *qi = (xi * id).round() as i8;
                sum += i32::from(*qi);
            }
            let dh = f16::from_f32(d).to_f32();
            let sh = f16::from_f32(sum as f32 * d).to_f32();
            ds.push([dh, sh]);
        }
        Self { rows: m, k, qs, ds }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quants of row `r` (`k` bytes).
    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }

    /// The `(d, s)` of each block of row `r`.
    pub fn row_ds(&self, r: usize) -> &[[f32; 2]] {
        let kb = self.k / QK;
        &self.ds[r * kb..(r + 1) * kb]
    }
}
