//! Per-request logit processing before sampling (OpenAI's `logit_bias`,
//! `presence_penalty`, `frequency_penalty`, and a grammar's mask) and the
//! log-probabilities reported back (`logprobs`, `top_logprobs`).

use std::collections::HashMap;

/// How a request reshapes the model's logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitShaping {
    /// Added to the logit of each token id.
    pub bias: Vec<(u32, f32)>,
    /// Subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
}

impl LogitShaping {
    /// Applies the bias and the penalties; `counts` holds how often each
    /// token was generated so far.
    pub(crate) fn apply(&self, logits: &mut [f32], counts: &HashMap<u32, u32>) {
        for &(token, bias) in &self.bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&token, &count) in counts {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit -= self.presence_penalty + self.frequency_penalty * count as f32;
                }
            }
        }
    }
}

/// A generated token's log-probability and the most likely tokens at its
/// position (from the model's own distribution, before any shaping).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `chosen` under `logits` and the `top` most likely.
pub(crate) fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &logit) in logits.iter().enumerate() {
            if best.len() < top || logit > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, l)| l >= logit);
                best.insert(at, (id as u32, logit));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_z),
        top: best.into_iter().map(|(id, l)| (id, l - log_z)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_normalise_and_rank() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let lp = logprobs(&logits, 2, 2);
        let total: f32 = logits.iter().map(|&l| (l - 2.0 + lp.logprob).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[1].1 - lp.logprob).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn bias_and_penalties_follow_openai() {
        let shaping = LogitShaping {
            bias: vec![(0, -100.0), (3, 5.0)],
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
        };
        let mut logits = [0.0f32; 4];
        shaping.apply(&mut logits, &HashMap::from([(1, 2), (2, 1)]));
        assert_eq!(logits, [-100.0, -1.0, -0.75, 5.0]);
    }
}
