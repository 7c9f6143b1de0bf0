//! Decoupled RoPE with optional YaRN scaling, exactly as the reference computes it.
//!
//! Frequencies follow `DeepseekV2YarnRotaryEmbedding`: the correction range from
//! `original_max_position_embeddings` with floor/ceil, a linear ramp over the `Dr/2` pair
//! indices blending interpolated (`/ factor`) and extrapolated frequencies, and a cos/sin
//! amplitude of `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`. Angles are
//! `f32(position) * f32(inv_freq)`, one f32 rounding, as in the reference.

use dsv2_core::config::yarn_get_mscale;
use dsv2_core::ModelConfig;

/// Per-pair inverse frequencies and the cos/sin amplitude.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `[Dr/2]` inverse frequency of each adjacent pair.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1.0 unless `mscale != mscale_all_dim`).
    pub amplitude: f32,
}

impl Rope {
    /// The RoPE of `config` (`qk_rope_head_dim`, `rope_theta`, `rope_scaling`).
    pub fn new(config: &ModelConfig) -> Rope {
        let dim = config.qk_rope_head_dim;
        let base = config.rope_theta;
        // Computed like torch: f32 exponent, f32 power, f32 reciprocals and ramp.
        let pos_freq: Vec<f32> = (0..dim / 2)
            .map(|i| base.powf(((2 * i) as f32 / dim as f32) as f64) as f32)
            .collect();
        let Some(yarn) = config.rope_scaling else {
            return Rope {
                inv_freq: pos_freq.iter().map(|&p| 1.0 / p).collect(),
                amplitude: 1.0,
            };
        };
        let correction_dim = |rotations: f64| {
            dim as f64
                * (yarn.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(yarn.beta_fast).floor().max(0.0) as f32;
        let high = correction_dim(yarn.beta_slow).ceil().min(dim as f64 - 1.0) as f32;
        let high = if low == high { high + 0.001 } else { high };
        let factor = yarn.factor as f32;
        let inv_freq = pos_freq
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extra_weight = 1.0 - ramp;
                let (extra, inter) = (1.0 / p, 1.0 / (factor * p));
                inter * (1.0 - extra_weight) + extra * extra_weight
            })
            .collect();
        let amplitude = (yarn_get_mscale(yarn.factor, yarn.mscale)
            / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)) as f32;
        Rope {
            inv_freq,
            amplitude,
        }
    }

    /// Writes cos and sin `[positions.len(), Dr/2]` of the given absolute positions.
    pub fn angles(&self, positions: &[u32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        for &pos in positions {
            for &f in &self.inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32 * self.amplitude);
                sin.push(angle.sin() as f32 * self.amplitude);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite() -> ModelConfig {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dsv2-core/testdata/deepseek-v2-lite-config.json"
        ))
        .unwrap();
        ModelConfig::from_json_str(&text).unwrap()
    }

    #[test]
    fn v2_lite_yarn_table_matches_the_reference_values() {
        let rope = Rope::new(&lite());
        assert_eq!(rope.inv_freq.len(), 32);
        // Values printed by the reference's fp32 table (numerics note §5.1).
        let close = |a: f32, b: f64| ((a as f64 - b) / b).abs() < 2e-7;
        assert!(
            close(rope.inv_freq[11], 3.900692547e-02),
            "{}",
            rope.inv_freq[11]
        );
        assert!(
            close(rope.inv_freq[16], 5.499999885e-03),
            "{}",
            rope.inv_freq[16]
        );
        assert!(
            close(rope.inv_freq[31], 3.333803534e-06),
            "{}",
            rope.inv_freq[31]
        );
        // Pairs up to the low end of the correction range (10) are not scaled.
        assert_eq!(rope.inv_freq[0], 1.0);
        assert!(close(rope.inv_freq[10], 1.0 / 10000f64.powf(20.0 / 64.0)));
        assert_eq!(rope.amplitude, 1.0);
    }

    #[test]
    fn amplitude_is_the_mscale_ratio() {
        let mut config = lite();
        if let Some(y) = config.rope_scaling.as_mut() {
            y.mscale = 1.0;
        }
        let rope = Rope::new(&config);
        let want = (0.1 * 40f64.ln() + 1.0) / (0.1 * 0.707 * 40f64.ln() + 1.0);
        assert!((rope.amplitude as f64 - want).abs() < 1e-6);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.angles(&[0, 5], &mut cos, &mut sin);
        assert_eq!(cos.len(), 64);
        assert!((cos[0] as f64 - want).abs() < 1e-6 && sin[0] == 0.0);
        assert_eq!(cos[32], (5.0f64).cos() as f32 * rope.amplitude);
    }
}
