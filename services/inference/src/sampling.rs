//! Sampling with a counter-based generator: the random number for token
//! position `p` of a request with seed `s` is BLAKE3 keyed by `s`, applied to
//! `p`, so any node that samples position `p` draws the same number, and a
//! re-planned ring continues the same sequence.

/// How the next token is chosen (it travels to a ring's last stage, which
/// samples where the logits are when nothing else needs them).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sampler {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: all).
    pub top_p: f32,
    /// The request's seed.
    pub seed: u64,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampler {
    /// The uniform number in [0, 1) for `position`.
    pub fn uniform(&self, position: u64) -> f64 {
        let key = blake3::derive_key("sovereign sampling v1", &self.seed.to_le_bytes());
        let hash = blake3::keyed_hash(&key, &position.to_le_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Chooses a token from `logits` for `position`.
    pub fn sample(&self, logits: &[f32], position: u64) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax();
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i] - max) / self.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= f64::from(self.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u = self.uniform(position);
        for (p, &i) in probs.iter().zip(&order) {
            if u < *p {
                return i as u32;
            }
            u -= p;
        }
        order[order.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_position_draw_the_same_token() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Sampler {
            temperature: 1.0,
            seed: 42,
            ..Sampler::default()
        };
        let b = a.clone();
        let draws: Vec<u32> = (0..50).map(|p| a.sample(&logits, p)).collect();
        assert_eq!(
            draws,
            (0..50).map(|p| b.sample(&logits, p)).collect::<Vec<_>>()
        );
        let other = Sampler {
            seed: 43,
            ..a.clone()
        };
        assert_ne!(
            draws,
            (0..50)
                .map(|p| other.sample(&logits, p))
                .collect::<Vec<_>>()
        );
        assert!(
            draws
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 5,
            "not random: {draws:?}"
        );
    }

    #[test]
    fn greedy_top_k_and_top_p_restrict_the_choice() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        assert_eq!(Sampler::default().sample(&logits, 0), 1);
        let top2 = Sampler {
            temperature: 5.0,
            top_k: 2,
            seed: 1,
            ..Sampler::default()
        };
        assert!((0..200).all(|p| matches!(top2.sample(&logits, p), 1 | 2)));
        let nucleus = Sampler {
            temperature: 1.0,
            top_p: 0.01,
            seed: 1,
            ..Sampler::default()
        };
        assert!((0..200).all(|p| nucleus.sample(&logits, p) == 1));
        let u: Vec<f64> = (0..1000).map(|p| top2.uniform(p)).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = u.iter().sum::<f64>() / 1000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }
}
