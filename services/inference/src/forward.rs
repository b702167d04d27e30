//! The per-row arithmetic of a decoder layer on plain `f32` slices: RMSNorm,
//! RoPE, SiLU gating (attention over a sequence's cache is
//! `sovereign_kernels::attend`, with the same fixed order).
//!
//! Every function computes a row from that row's inputs alone, with
//! reductions in a fixed order (eight lanes, then the lanes in order), so a
//! row's result is the same whether it is computed alone, in a batch, or in
//! any prefill chunk: the engine's batch invariance rests on this.

use sovereign_kernels::ordered_dot;

/// `out = x / rms(x) * weight` for every row of `x`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let k = weight.len();
    for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let scale = 1.0 / (ordered_dot(row, row) / k as f32 + eps).sqrt();
        for ((d, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * scale * w;
        }
    }
}

/// [`rms_norm`] in place: every `weight.len()` values of `x` (a row, or a
/// head of q or k) normalized on their own.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let k = weight.len();
    for row in x.chunks_exact_mut(k) {
        let scale = 1.0 / (ordered_dot(row, row) / k as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// Rotates every head of `x` (`heads * head_dim` values) by the position
/// whose `cos`/`sin` rows (`head_dim / 2` each) are given; `interleaved`:
/// pairs are adjacent values (GGUF), otherwise the two halves (Hugging Face).
pub(crate) fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// `out[i] = silu(gate[i]) * up[i]` for rows holding gate then up (`2 * n` values each).
pub(crate) fn silu_gate(gate_up: &[f32], n: usize, out: &mut [f32]) {
    for (row, dst) in gate_up.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (gate, up) = row.split_at(n);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `out[i] = gelu(gate[i]) * up[i]` (tanh approximation, Gemma) for rows
/// holding gate then up. `0.5 * g * (1 + tanh(t))` is computed as the equal
/// `g / (1 + e^(-2t))`, which needs one exponential and no library call.
pub(crate) fn gelu_gate(gate_up: &[f32], n: usize, out: &mut [f32]) {
    let c = 2.0 * (2.0f32 / std::f32::consts::PI).sqrt();
    for (row, dst) in gate_up.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (gate, up) = row.split_at(n);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + exp(-c * (g + 0.044715 * g * g * g))) * u;
        }
    }
}

/// `e^x` to about 2 ulp (relative error below 3e-7), in plain f32 and
/// integer operations so that a loop of it vectorizes (the library `expf`
/// is a call per value). `x` is clamped to `[-87, 88]`, where the result is
/// a normal f32: below, the true value is within 2^-125 of what it gives,
/// above it would overflow. NaN gives NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds an f32 below 2^22 to an integer.
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 split in two: `n * LN2_HI` is exact for |n| < 2^10.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // x = n ln 2 + r with n an integer in [-126, 127] and |r| <= ln 2 / 2.
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to r^6 (error below r^7 / 7! < 1.2e-7).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n built from its exponent bits.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x += y`.
pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() <= 4e-7,
                "exp({x}) = {got}, std {want}"
            );
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gates_match_their_definitions() {
        let gate_up = [-3.0f32, -0.5, 0.0, 0.7, 2.5, 2.0, 1.0, -1.5, 0.5, 3.0];
        let (gate, up) = gate_up.split_at(5);
        let mut out = [0f32; 5];
        gelu_gate(&gate_up, 5, &mut out);
        let c = (2.0f32 / std::f32::consts::PI).sqrt();
        for ((&o, &g), &u) in out.iter().zip(gate).zip(up) {
            let want = 0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({g}): {o} vs {want}"
            );
        }
        silu_gate(&gate_up, 5, &mut out);
        for ((&o, &g), &u) in out.iter().zip(gate).zip(up) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({g}): {o} vs {want}"
            );
        }
    }

    #[test]
    fn rms_norm_and_rope_match_their_definitions() {
        let x = [3.0, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert_eq!(out, [3.0 / rms, 8.0 / rms]);
        let mut v = [1.0, 0.0];
        let (c, s) = (0.6f32, 0.8f32);
        rope(&mut v, 2, &[c], &[s], true);
        assert_eq!(v, [c, s]);
    }
}
