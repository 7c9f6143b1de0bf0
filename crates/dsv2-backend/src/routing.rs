//! The router's expert choice, as plain code every backend is checked against.

use crate::Routing;

/// Chooses experts for one token from its router probabilities `probs` `[E]` (softmax
/// of the f32 router logits). Writes `routing.top_k` expert ids and weights, in order of
/// decreasing probability.
///
/// Greedy: the `k` largest probabilities. Group-limited: experts form `n_group`
/// contiguous groups scored by their best probability; only the `topk_group` best groups
/// compete (the others are masked to 0, as the reference does). Weights are the chosen
/// probabilities times `routed_scaling_factor`, or renormalized to sum to 1 when
/// `norm_topk_prob` (then unscaled, as in the V2 reference).
pub fn route_token(probs: &[f32], routing: &Routing, ids: &mut [u32], weights: &mut [f32]) {
    let k = routing.top_k;
    debug_assert!(ids.len() == k && weights.len() == k);
    let e = probs.len();
    // Which experts may be chosen: all, or those in the best groups.
    let mut allowed_groups: u64 = u64::MAX;
    let group_size = match routing.groups {
        Some((n_group, topk_group)) => {
            let size = e / n_group;
            let score = |g: usize| {
                probs[g * size..(g + 1) * size]
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            };
            allowed_groups = 0;
            for _ in 0..topk_group {
                let mut best = None;
                for g in 0..n_group {
                    if allowed_groups & (1 << g) != 0 {
                        continue;
                    }
                    let s = score(g);
                    if best.is_none_or(|(_, bs)| s > bs) {
                        best = Some((g, s));
                    }
                }
                allowed_groups |= 1 << best.expect("topk_group <= n_group").0;
            }
            size
        }
        None => e,
    };
    let masked = |i: usize| {
        if routing.groups.is_some() && allowed_groups & (1 << (i / group_size)) == 0 {
            0.0
        } else {
            probs[i]
        }
    };
    // Selection of the k largest (k is small: 6), ties to the lower index.
    for slot in 0..k {
        let mut best: Option<(usize, f32)> = None;
        for i in 0..e {
            if ids[..slot].contains(&(i as u32)) {
                continue;
            }
            let p = masked(i);
            if best.is_none_or(|(_, bp)| p > bp) {
                best = Some((i, p));
            }
        }
        let (i, p) = best.expect("top_k <= experts");
        ids[slot] = i as u32;
        weights[slot] = p;
    }
    if routing.norm_topk_prob && k > 1 {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    } else {
        weights
            .iter_mut()
            .for_each(|w| *w *= routing.routed_scaling_factor);
    }
}

/// Softmax of `x` in place, in f32.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(top_k: usize, groups: Option<(usize, usize)>, norm: bool, scale: f32) -> Routing {
        Routing {
            top_k,
            groups,
            norm_topk_prob: norm,
            routed_scaling_factor: scale,
        }
    }

    #[test]
    fn greedy_picks_largest_and_scales() {
        let probs = [0.1, 0.4, 0.05, 0.3, 0.15];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route_token(&probs, &routing(2, None, false, 2.0), &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        assert_eq!(w, [0.8, 0.6]);
        route_token(&probs, &routing(2, None, true, 16.0), &mut ids, &mut w);
        assert!((w[0] - 0.4 / 0.7).abs() < 1e-6 && (w[1] - 0.3 / 0.7).abs() < 1e-6);
    }

    #[test]
    fn group_limited_scores_groups_by_their_max() {
        // 4 groups of 3. Group sums would pick groups 0 and 1; group maxima pick 1 and 3.
        let probs = [
            0.10, 0.10, 0.10, // group 0: max .10, sum .30
            0.20, 0.01, 0.01, // group 1: max .20
            0.09, 0.09, 0.09, // group 2: max .09, sum .27
            0.15, 0.03, 0.03, // group 3: max .15
        ];
        let (mut ids, mut w) = ([0u32; 3], [0f32; 3]);
        route_token(
            &probs,
            &routing(3, Some((4, 2)), false, 16.0),
            &mut ids,
            &mut w,
        );
        // Best three among groups 1 and 3 only: 3 (.20), 9 (.15), then 10 (.03, lower
        // index than 11 on the tie).
        assert_eq!(ids, [3, 9, 10]);
        assert!((w[0] - 3.2).abs() < 1e-6 && (w[1] - 2.4).abs() < 1e-6);
        // Plain greedy would take from group 0 as well.
        route_token(&probs, &routing(3, None, false, 1.0), &mut ids, &mut w);
        assert_eq!(ids, [3, 9, 0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, -1000.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((x[2] / x[1] - std::f32::consts::E).abs() < 1e-4);
        assert_eq!(x[3], 0.0);
    }
}
