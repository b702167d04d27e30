//! Rounding of the small values activation quantization produces, in plain
//! f32 and integer operations that compile to vector instructions on any
//! x86-64 (`f32::round` and `f32::round_ties_even` are library calls there
//! unless SSE4.1 is enabled at build time). Both give exactly what the std
//! functions give, for every `|y| < 2^22`.

/// `1.5 * 2^23`: adding it to an f32 of magnitude below `2^22` leaves no
/// fraction bits, so the addition rounds to an integer (ties to even, the
/// IEEE default) and subtracting it again is exact.
const SHIFT: f32 = 12_582_912.0;

/// `y.round_ties_even() as i32` for `|y| < 2^22`; NaN gives 0.
#[inline(always)]
pub(crate) fn ties_even(y: f32) -> i32 {
    ((y + SHIFT) - SHIFT) as i32
}

/// `y.round() as i32` (halves away from zero) for `|y| < 2^22`; NaN gives 0.
#[inline(always)]
pub(crate) fn half_away(y: f32) -> i32 {
    let a = y.abs();
    // Truncation, and the fraction it drops, are exact below 2^22.
    let t = a as i32;
    let r = t + i32::from(a - t as f32 >= 0.5);
    if y < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halves, their neighbours one ulp away, and a sweep of the range the
    /// quantizers use.
    fn samples() -> Vec<f32> {
        let mut out = vec![0.0, -0.0, f32::NAN, 127.0, -127.0, 4_194_303.5];
        for i in -300..=300 {
            let h = i as f32 + 0.5;
            out.extend([
                h,
                -h,
                h.next_up(),
                h.next_down(),
                -h.next_up(),
                -h.next_down(),
            ]);
        }
        out.extend((0..200_000).map(|i| (i as f32 - 100_000.0) * 0.001_37));
        out
    }

    #[test]
    fn ties_even_matches_std() {
        for y in samples() {
            assert_eq!(ties_even(y), y.round_ties_even() as i32, "{y}");
        }
    }

    #[test]
    fn half_away_matches_std() {
        for y in samples() {
            assert_eq!(half_away(y), y.round() as i32, "{y}");
        }
    }
}
