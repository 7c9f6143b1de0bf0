//! Log-probabilities of a generated token under the model's raw distribution.

use crate::request::TokenLogprobs;

/// `log Σ exp(logits)`, in f64 with the maximum taken out: `log_softmax(x)[i]` is
/// `x[i] − log_normalizer(x)`.
pub fn log_normalizer(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The log-softmax of `logits` at `token`, plus the `k` most likely tokens (ties to the
/// lower id), computed in f64 for a stable normalizer.
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let log_norm = log_normalizer(logits);
    let lp = |id: usize| (logits[id] as f64 - log_norm) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (id, &x) in logits.iter().enumerate() {
            if top.len() == k && x <= logits[top[k - 1].0 as usize] {
                continue;
            }
            // Insert after every entry at least as large: earlier ids win ties.
            let at = top.partition_point(|&(t, _)| logits[t as usize] >= x);
            top.insert(at, (id as u32, 0.0));
            top.truncate(k);
        }
        for entry in &mut top {
            entry.1 = lp(entry.0 as usize);
        }
    }
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(token as usize)),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_log_softmax() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let norm: f64 = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let out = token_logprobs(&logits, 4, 3);
        assert!((out.logprob as f64 - (0.5 - norm)).abs() < 1e-6);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert!((out.top[0].1 as f64 - (3.0 - norm)).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        let probs: f64 = token_logprobs(&logits, 0, 5)
            .top
            .iter()
            .map(|t| (t.1 as f64).exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-6);
    }
}
