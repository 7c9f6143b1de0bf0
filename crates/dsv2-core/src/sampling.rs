//! Choosing the next token from a row of logits, and stop strings.
//!
//! [`SamplingParams`] holds every option; [`SamplingParams::from_generation_config`] takes
//! the model's defaults (keys present in `generation_config.json` only, as vLLM does) and
//! [`SamplingParams::apply`] lets explicit options override them. [`Sampler`] applies, in
//! this order (the order of transformers' logits processors and vLLM's sampler):
//!
//! 1. repetition penalty (HF): for every id seen in prompt or output, a positive logit is
//!    divided by the penalty, a negative one multiplied;
//! 2. frequency and presence penalties (OpenAI), over generated ids only:
//!    `logit -= frequency_penalty * count + presence_penalty * (count > 0)`;
//! 3. temperature: `0` means greedy (argmax, first index on ties), otherwise `logit / t`;
//! 4. top-k (HF: keeps every token whose logit ties the k-th largest);
//! 5. top-p (HF: keeps the most likely tokens until their mass reaches `top_p`, at least one);
//! 6. min-p (drops tokens whose probability is below `min_p` times the largest);
//!
//! then draws from the renormalized distribution with a seeded xoshiro256++ generator.
//! Buffers are reused between calls: the hot path does not allocate after the first token.

use crate::error::{CoreError, Result};
use crate::generation_config::GenerationConfig;

/// All decoding options. `Default` is greedy decoding with nothing else enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; `0` = off.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; `1` = off.
    pub top_p: f32,
    /// Relative probability floor in [0, 1]; `0` = off.
    pub min_p: f32,
    /// HF repetition penalty (> 0); `1` = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty; `0` = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty; `0` = off.
    pub frequency_penalty: f32,
    /// RNG seed; `None` picks a random one (see [`Sampler::seed`]).
    pub seed: Option<u64>,
    /// Limit on generated tokens; `None` = until EOS / stop / context end.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends when the output contains one; it is not emitted.
    pub stop: Vec<String>,
    /// Ids that end generation (from config.json and generation_config.json).
    pub eos_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            eos_token_ids: Vec::new(),
        }
    }
}

/// Options given explicitly (e.g. on the command line); each `Some` overrides the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<usize>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// See [`SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f32>,
    /// See [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f32>,
    /// See [`SamplingParams::seed`].
    pub seed: Option<u64>,
    /// See [`SamplingParams::max_tokens`].
    pub max_tokens: Option<usize>,
    /// Stop strings, added to any already set.
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Defaults from `generation_config.json` (only the keys it has; `do_sample: false` or
    /// absent means greedy, as in transformers) and the EOS ids of config.json and the
    /// generation config together.
    ///
    /// Unlike transformers' `generate`, an absent `top_k` stays off (transformers would use
    /// 50); pass `top_k` explicitly to get that behaviour.
    pub fn from_generation_config(gen: Option<&GenerationConfig>, config_eos_ids: &[u32]) -> Self {
        let mut p = SamplingParams::default();
        let mut eos: Vec<u32> = config_eos_ids.to_vec();
        if let Some(g) = gen {
            if g.do_sample == Some(true) {
                p.temperature = g.temperature.unwrap_or(1.0);
                p.top_p = g.top_p.unwrap_or(1.0);
                p.top_k = g.top_k.unwrap_or(0);
                p.min_p = g.min_p.unwrap_or(0.0);
            }
            p.repetition_penalty = g.repetition_penalty.unwrap_or(1.0);
            p.max_tokens = g.max_new_tokens;
            for &id in &g.eos_token_ids {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        p.eos_token_ids = eos;
        p
    }

    /// Applies explicit options on top (returns the result for chaining).
    pub fn apply(mut self, o: &SamplingOverrides) -> Self {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        set!(
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty
        );
        if o.seed.is_some() {
            self.seed = o.seed;
        }
        if o.max_tokens.is_some() {
            self.max_tokens = o.max_tokens;
        }
        for s in &o.stop {
            if !self.stop.contains(s) {
                self.stop.push(s.clone());
            }
        }
        self
    }

    /// Checks every value's range; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(CoreError::sampling(
                    name,
                    format!("must be a finite number, got {v}"),
                ))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(CoreError::sampling(
                "temperature",
                format!("must be >= 0 (0 = greedy), got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(CoreError::sampling(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(CoreError::sampling(
                "min_p",
                format!("must be in [0, 1], got {}", self.min_p),
            ));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(CoreError::sampling(
                "repetition_penalty",
                format!("must be > 0 (1 = off), got {}", self.repetition_penalty),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(CoreError::sampling("max_tokens", "must be at least 1"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(CoreError::sampling(
                "stop",
                "stop strings must not be empty",
            ));
        }
        Ok(())
    }

    /// True when decoding is greedy (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// xoshiro256++ (Blackman & Vigna, 2019), seeded through splitmix64 as its authors
/// recommend. Small, fast, and the same sequence on every platform.
#[derive(Debug, Clone)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            // splitmix64
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed from the OS-randomized hasher state and the clock, for unseeded runs.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Picks tokens from logits according to [`SamplingParams`], remembering the prompt and
/// generated ids for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: Xoshiro256,
    /// `seen[id]`: id occurred in prompt or output (repetition penalty).
    seen: Vec<bool>,
    seen_ids: Vec<u32>,
    /// `counts[id]`: times id was generated (frequency / presence penalties).
    counts: Vec<u32>,
    counted_ids: Vec<u32>,
    // Scratch buffers reused across calls.
    logits: Vec<f32>,
    candidates: Vec<u32>,
}

impl Sampler {
    /// A sampler for validated `params` (errors name the bad parameter).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(random_seed);
        Ok(Sampler {
            rng: Xoshiro256::new(seed),
            seed,
            params,
            seen: Vec::new(),
            seen_ids: Vec::new(),
            counts: Vec::new(),
            counted_ids: Vec::new(),
            logits: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The seed in use (the drawn one when none was given), to reproduce a run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records prompt ids: they count for the repetition penalty (not for the
    /// frequency/presence penalties, which look at generated ids only).
    pub fn add_prompt(&mut self, ids: &[u32]) {
        for &id in ids {
            self.mark_seen(id);
        }
    }

    /// Records an id as generated without sampling it (e.g. a forced token).
    pub fn accept(&mut self, id: u32) {
        self.mark_seen(id);
        let i = id as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        if self.counts[i] == 0 {
            self.counted_ids.push(id);
        }
        self.counts[i] += 1;
    }

    /// Chooses the next token from one row of logits (one per vocabulary id) and records it
    /// as generated.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = self.choose(logits);
        self.accept(id);
        id
    }

    fn mark_seen(&mut self, id: u32) {
        let i = id as usize;
        if i >= self.seen.len() {
            self.seen.resize(i + 1, false);
        }
        if !self.seen[i] {
            self.seen[i] = true;
            self.seen_ids.push(id);
        }
    }

    /// Penalized, temperature-scaled logits in `self.logits`; returns false for greedy.
    fn prepare(&mut self, logits: &[f32]) {
        let p = &self.params;
        self.logits.clear();
        self.logits.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
        );
        let n = self.logits.len();
        // Size the history tables to the vocabulary once, so `accept` never grows them.
        if self.seen.len() < n {
            self.seen.resize(n, false);
            self.counts.resize(n, 0);
        }
        if p.repetition_penalty != 1.0 {
            for &id in &self.seen_ids {
                if let Some(l) = self.logits.get_mut(id as usize) {
                    *l = if *l < 0.0 {
                        *l * p.repetition_penalty
                    } else {
                        *l / p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for &id in &self.counted_ids {
                let i = id as usize;
                if i < n {
                    let c = self.counts[i] as f32;
                    self.logits[i] -= p.frequency_penalty * c + p.presence_penalty;
                }
            }
        }
        if p.temperature > 0.0 && p.temperature != 1.0 {
            let t = p.temperature;
            for l in &mut self.logits {
                *l /= t;
            }
        }
    }

    fn argmax(&self) -> u32 {
        let mut best = 0usize;
        for (i, &l) in self.logits.iter().enumerate() {
            if l > self.logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Fills `self.candidates` with the ids that survive top-k / top-p / min-p (in
    /// decreasing logit order when top-k or top-p is on) and returns the max logit.
    fn filter(&mut self) -> f32 {
        let p = &self.params;
        let logits = &self.logits;
        let n = logits.len();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        self.candidates.clear();
        // Tokens at -inf (masked) can never be drawn.
        self.candidates
            .extend((0..n as u32).filter(|&i| logits[i as usize] > f32::NEG_INFINITY));

        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(p.top_k - 1, desc);
            let kth = logits[self.candidates[p.top_k - 1] as usize];
            // HF keeps every token tied with the k-th value.
            self.candidates.clear();
            self.candidates
                .extend((0..n as u32).filter(|&i| logits[i as usize] >= kth));
            self.candidates.sort_unstable_by(desc);
        }

        if p.top_p < 1.0 {
            let z: f64 = self
                .candidates
                .iter()
                .map(|&i| f64::from(logits[i as usize] - max).exp())
                .sum();
            let target = f64::from(p.top_p) * z;
            // Sort a growing head of the candidates until it holds `top_p` of the mass.
            let total = self.candidates.len();
            let mut head = total.min(256);
            loop {
                if head < total {
                    self.candidates.select_nth_unstable_by(head - 1, desc);
                }
                self.candidates[..head].sort_unstable_by(desc);
                let mut cum = 0.0f64;
                let mut keep = None;
                for (j, &i) in self.candidates[..head].iter().enumerate() {
                    // Keep a token while the mass before it is below top_p (HF's rule).
                    if cum >= target {
                        keep = Some(j);
                        break;
                    }
                    cum += f64::from(logits[i as usize] - max).exp();
                }
                if let Some(j) = keep {
                    self.candidates.truncate(j.max(1));
                    break;
                }
                if head == total {
                    break;
                }
                head = total.min(head * 8);
            }
        }

        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p);
            self.candidates
                .retain(|&i| f64::from(logits[i as usize] - max).exp() >= floor);
        }
        max
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        self.prepare(logits);
        if self.logits.is_empty() {
            return 0;
        }
        if self.params.is_greedy() {
            return self.argmax();
        }
        let max = self.filter();
        if !max.is_finite() || self.candidates.is_empty() {
            return self.argmax();
        }
        let z: f64 = self
            .candidates
            .iter()
            .map(|&i| f64::from(self.logits[i as usize] - max).exp())
            .sum();
        let mut u = self.rng.next_f64() * z;
        for &i in &self.candidates {
            u -= f64::from(self.logits[i as usize] - max).exp();
            if u < 0.0 {
                return i;
            }
        }
        *self.candidates.last().unwrap_or(&0)
    }

    /// The distribution [`sample`](Self::sample) would draw from, as (id, probability)
    /// pairs, without drawing or recording anything (for tests and diagnostics).
    pub fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f64)> {
        self.prepare(logits);
        if self.params.is_greedy() || self.logits.is_empty() {
            return vec![(
                if self.logits.is_empty() {
                    0
                } else {
                    self.argmax()
                },
                1.0,
            )];
        }
        let max = self.filter();
        let weights: Vec<(u32, f64)> = self
            .candidates
            .iter()
            .map(|&i| (i, f64::from(self.logits[i as usize] - max).exp()))
            .collect();
        let z: f64 = weights.iter().map(|w| w.1).sum();
        let mut out: Vec<(u32, f64)> = weights.into_iter().map(|(i, w)| (i, w / z)).collect();
        out.sort_by_key(|w| w.0);
        out
    }
}

/// What [`StopMatcher::push`] releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text that is certainly not part of a stop string: show it.
    pub text: String,
    /// The stop string that matched; generation ends and nothing after `text` is shown.
    pub stopped: Option<String>,
}

/// Finds stop strings in streamed text, across token boundaries. Text that could be the
/// start of a stop string is held back until it is known not to be one.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds a piece of output. Returns the text safe to show and, if a stop string is now
    /// complete, which one (the text before it is in `text`; the rest is dropped).
    pub fn push(&mut self, piece: &str) -> StopOutput {
        if self.stops.is_empty() {
            return StopOutput {
                text: piece.to_string(),
                stopped: None,
            };
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first {
            let stop = stop.clone();
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopOutput {
                text,
                stopped: Some(stop),
            };
        }
        // Hold the longest tail that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - hold;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutput {
            text,
            stopped: None,
        }
    }

    /// Releases the held-back text when the output ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain transcription of transformers' logits processors (f64, full sorts), giving
    /// the probability of every id.
    fn reference(
        logits: &[f32],
        p: &SamplingParams,
        prompt: &[u32],
        generated: &[u32],
    ) -> Vec<f64> {
        let mut l: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        let mut seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for &id in &seen {
            let x = &mut l[id as usize];
            let r = f64::from(p.repetition_penalty);
            *x = if *x < 0.0 { *x * r } else { *x / r };
        }
        for (id, x) in l.iter_mut().enumerate() {
            let count = generated.iter().filter(|&&g| g as usize == id).count() as f64;
            if count > 0.0 {
                *x -= f64::from(p.frequency_penalty) * count + f64::from(p.presence_penalty);
            }
        }
        for x in &mut l {
            *x /= f64::from(p.temperature);
        }
        let softmax = |l: &[f64]| -> Vec<f64> {
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|x| x / z).collect()
        };
        if p.top_k > 0 && p.top_k < l.len() {
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[p.top_k - 1];
            for x in &mut l {
                if *x < kth {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        if p.top_p < 1.0 {
            // TopPLogitsWarper: ascending sort, drop tokens whose cumulative mass (with all
            // smaller ones) is <= 1 - top_p, always keeping the largest.
            let probs = softmax(&l);
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[a].total_cmp(&l[b]));
            let mut cum = 0.0;
            let last = order.len() - 1;
            for (rank, &i) in order.iter().enumerate() {
                cum += probs[i];
                if cum <= 1.0 - f64::from(p.top_p) && rank != last {
                    l[i] = f64::NEG_INFINITY;
                }
            }
        }
        if p.min_p > 0.0 {
            let probs = softmax(&l);
            let top = probs.iter().copied().fold(0.0, f64::max);
            for (x, &pr) in l.iter_mut().zip(&probs) {
                if pr < f64::from(p.min_p) * top {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        softmax(&l)
    }

    fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Xoshiro256::new(seed);
        (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * scale)
            .collect()
    }

    fn check_against_reference(
        logits: &[f32],
        params: SamplingParams,
        prompt: &[u32],
        generated: &[u32],
    ) {
        let want = reference(logits, &params, prompt, generated);
        let mut s = Sampler::new(params.clone()).unwrap();
        s.add_prompt(prompt);
        for &g in generated {
            s.accept(g);
        }
        let got = s.distribution(logits);
        let support: Vec<u32> = (0..want.len() as u32)
            .filter(|&i| want[i as usize] > 0.0)
            .collect();
        let got_ids: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(got_ids, support, "{params:?}");
        for &(id, pr) in &got {
            let w = want[id as usize];
            // f32 logits against f64: agree to ~1e-6 relative.
            assert!(
                (pr - w).abs() < 2e-5 * w.max(1e-4),
                "{params:?}: id {id}: {pr} vs {w}"
            );
        }
    }

    fn sampling(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(1),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn filters_match_the_reference() {
        let peaked = random_logits(1000, 3, 8.0);
        let flat = random_logits(3000, 4, 1.0);
        for logits in [&peaked, &flat] {
            for t in [0.3f32, 1.0, 1.7] {
                check_against_reference(logits, sampling(t), &[], &[]);
                for k in [1, 5, 50, 999] {
                    check_against_reference(
                        logits,
                        SamplingParams {
                            top_k: k,
                            ..sampling(t)
                        },
                        &[],
                        &[],
                    );
                }
                for top_p in [0.05f32, 0.5, 0.9, 0.95, 0.999] {
                    check_against_reference(
                        logits,
                        SamplingParams {
                            top_p,
                            ..sampling(t)
                        },
                        &[],
                        &[],
                    );
                    check_against_reference(
                        logits,
                        SamplingParams {
                            top_p,
                            top_k: 40,
                            ..sampling(t)
                        },
                        &[],
                        &[],
                    );
                }
                for min_p in [0.01f32, 0.1, 0.5, 1.0] {
                    check_against_reference(
                        logits,
                        SamplingParams {
                            min_p,
                            ..sampling(t)
                        },
                        &[],
                        &[],
                    );
                    check_against_reference(
                        logits,
                        SamplingParams {
                            min_p,
                            top_p: 0.9,
                            top_k: 100,
                            ..sampling(t)
                        },
                        &[],
                        &[],
                    );
                }
            }
        }
    }

    #[test]
    fn penalties_match_the_reference() {
        let logits = random_logits(500, 9, 4.0);
        let prompt = [1, 2, 3, 3, 400];
        let generated = [7, 7, 7, 2, 499, 10];
        for (rep, freq, pres) in [
            (1.3f32, 0.0f32, 0.0f32),
            (0.8, 0.0, 0.0),
            (1.0, 0.7, 0.0),
            (1.0, 0.0, 1.5),
            (1.2, 0.4, -0.6),
        ] {
            let params = SamplingParams {
                repetition_penalty: rep,
                frequency_penalty: freq,
                presence_penalty: pres,
                top_p: 0.97,
                ..sampling(0.8)
            };
            check_against_reference(&logits, params, &prompt, &generated);
        }
    }

    #[test]
    fn penalties_on_known_numbers() {
        let logits = [2.0f32, -2.0, 1.0, 0.5];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..sampling(1.0)
        })
        .unwrap();
        s.add_prompt(&[0, 1]);
        s.accept(2);
        s.accept(2);
        // [2/2, -2*2, 1/2 - (0.5*2 + 0.25), 0.5]
        let want = [1.0f64, -4.0, -0.75, 0.5];
        let z: f64 = want.iter().map(|x| x.exp()).sum();
        for (id, p) in s.distribution(&logits) {
            assert!((p - want[id as usize].exp() / z).abs() < 1e-7, "{id}: {p}");
        }
        // Greedy sees the penalized logits too: 1.0 at id 0 beats 0.5 at id 3.
        let mut g = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        g.add_prompt(&[0]);
        assert_eq!(g.sample(&[1.2, -1.0, 0.0, 0.7]), 3);
    }

    #[test]
    fn greedy_is_argmax_with_first_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NEG_INFINITY]), 1);
        let logits = random_logits(1000, 5, 5.0);
        let best = (0..1000)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(s.sample(&logits), best as u32);
    }

    #[test]
    fn top_k_keeps_ties_like_hf() {
        let logits = [1.0f32, 3.0, 2.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..sampling(1.0)
        })
        .unwrap();
        let ids: Vec<u32> = s.distribution(&logits).iter().map(|d| d.0).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            top_p: 0.95,
            top_k: 50,
            seed: Some(42),
            ..sampling(0.9)
        };
        let run = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone()).unwrap();
            (0..200)
                .map(|step| s.sample(&random_logits(2000, step, 3.0)))
                .collect::<Vec<u32>>()
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        let b = run(&SamplingParams {
            seed: Some(43),
            ..params.clone()
        });
        assert_ne!(a, b);
        // Unseeded samplers draw a seed and report it, which reproduces the run.
        let s = Sampler::new(SamplingParams {
            seed: None,
            ..params.clone()
        })
        .unwrap();
        let drawn = s.seed();
        assert_eq!(
            run(&SamplingParams {
                seed: Some(drawn),
                ..params.clone()
            }),
            run(&SamplingParams {
                seed: Some(drawn),
                ..params
            })
        );
    }

    #[test]
    fn xoshiro_known_values() {
        // splitmix64(0) first outputs are the published test vector of splitmix64.
        let r = Xoshiro256::new(0);
        assert_eq!(r.s[0], 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.s[1], 0x6E78_9E6A_A1B9_65F4);
        let mut r = Xoshiro256::new(0);
        let x: Vec<f64> = (0..1000).map(|_| r.next_f64()).collect();
        assert!(x.iter().all(|&v| (0.0..1.0).contains(&v)));
        let mean = x.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.03, "{mean}");
    }

    #[test]
    fn temperature_sampling_frequencies_chi_square() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 1.5, 0.0];
        let t = 0.7f32;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l) / f64::from(t)).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let expected: Vec<f64> = w.iter().map(|x| x / z).collect();
        let n = 30_000;
        let mut s = Sampler::new(sampling(t)).unwrap();
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.choose(&logits) as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&expected)
            .map(|(&c, &p)| (c as f64 - p * n as f64).powi(2) / (p * n as f64))
            .sum();
        // 5 degrees of freedom: 20.5 is the 0.1% critical value.
        assert!(
            chi2 < 20.5,
            "chi2 = {chi2}, counts {counts:?}, expected {expected:?}"
        );

        // With top-k 2 only the two largest ever come out, in ratio e^(2/0.7) : e^(1.5/0.7).
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..sampling(t)
        })
        .unwrap();
        let mut c = [0usize; 6];
        for _ in 0..n {
            c[s.choose(&logits) as usize] += 1;
        }
        assert_eq!(c[0] + c[2] + c[3] + c[5], 0);
        let p1 = 1.0 / (1.0 + (-0.5f64 / 0.7).exp());
        let got = c[1] as f64 / n as f64;
        assert!(
            (got - p1).abs() < 4.0 * (p1 * (1.0 - p1) / n as f64).sqrt(),
            "{got} vs {p1}"
        );
    }

    #[test]
    fn buffers_are_reused() {
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.9,
            top_k: 100,
            min_p: 0.05,
            ..sampling(0.8)
        })
        .unwrap();
        s.add_prompt(&[1, 2, 3]);
        s.sample(&random_logits(5000, 1, 3.0));
        let caps = (
            s.logits.capacity(),
            s.candidates.capacity(),
            s.seen.capacity(),
            s.counts.capacity(),
        );
        let (lp, cp) = (s.logits.as_ptr(), s.candidates.as_ptr());
        for step in 0..50 {
            s.sample(&random_logits(5000, step + 2, 3.0));
        }
        assert_eq!(caps.0, s.logits.capacity());
        assert_eq!(caps.1, s.candidates.capacity());
        assert_eq!(caps.2, s.seen.capacity());
        assert_eq!(caps.3, s.counts.capacity());
        assert_eq!((lp, cp), (s.logits.as_ptr(), s.candidates.as_ptr()));
    }

    #[test]
    fn defaults_from_generation_config_and_overrides() {
        let gen = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.3),
            top_p: Some(0.95),
            eos_token_ids: vec![100001, 7],
            ..GenerationConfig::default()
        };
        let p = SamplingParams::from_generation_config(Some(&gen), &[100001]);
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.min_p),
            (0.3, 0.95, 0, 0.0)
        );
        assert_eq!(p.eos_token_ids, vec![100001, 7]);
        assert_eq!(p.repetition_penalty, 1.0);

        let o = SamplingOverrides {
            temperature: Some(0.0),
            top_k: Some(20),
            seed: Some(5),
            max_tokens: Some(64),
            stop: vec!["\n\n".into()],
            ..SamplingOverrides::default()
        };
        let q = p.clone().apply(&o);
        assert!(q.is_greedy());
        assert_eq!(
            (q.top_p, q.top_k, q.seed, q.max_tokens),
            (0.95, 20, Some(5), Some(64))
        );
        assert_eq!(q.stop, vec!["\n\n".to_string()]);

        // do_sample false (or no file) is greedy, as in transformers.
        let greedy = GenerationConfig {
            do_sample: Some(false),
            temperature: Some(0.3),
            ..GenerationConfig::default()
        };
        assert!(SamplingParams::from_generation_config(Some(&greedy), &[]).is_greedy());
        assert!(SamplingParams::from_generation_config(None, &[2]).is_greedy());
        assert_eq!(
            SamplingParams::from_generation_config(None, &[2]).eos_token_ids,
            vec![2]
        );
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        for (params, name) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..SamplingParams::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..SamplingParams::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..SamplingParams::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..SamplingParams::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..SamplingParams::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..SamplingParams::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..SamplingParams::default()
                },
                "stop",
            ),
        ] {
            let e = Sampler::new(params).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    fn run_stops(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.text);
            if step.stopped.is_some() {
                return (out, step.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_strings_across_pieces() {
        let (text, stop) = run_stops(
            &["</s>", "\n\nUser:"],
            &["Hello", " wor", "ld\n", "\nUs", "er: more"],
        );
        assert_eq!(
            (text.as_str(), stop.as_deref()),
            ("Hello world", Some("\n\nUser:"))
        );
        // Held-back text is released once it cannot be a stop string any more.
        let mut m = StopMatcher::new(["\n\nUser:".to_string()]);
        assert_eq!(m.push("ab\n").text, "ab");
        assert_eq!(m.push("\nUse").text, "");
        assert_eq!(m.push("d it").text, "\n\nUsed it");
        // The earliest match wins; multi-byte stops; flush at the end.
        assert_eq!(
            run_stops(&["bcd", "abc"], &["xabcd"]),
            ("x".into(), Some("abc".into()))
        );
        assert_eq!(
            run_stops(&["你好"], &["我你", "好吗"]),
            ("我".into(), Some("你好".into()))
        );
        assert_eq!(run_stops(&["END"], &["the EN"]), ("the EN".into(), None));
        assert_eq!(run_stops(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn stop_matcher_against_a_plain_reference() {
        let mut rng = Xoshiro256::new(11);
        let alphabet = ['a', 'b', '\n', 'é'];
        for _ in 0..2000 {
            let len = (rng.next_u64() % 20) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(rng.next_u64() % 4) as usize])
                .collect();
            let stops = ["ab\nb", "bb", "éa"];
            // Reference: cut at the first occurrence of any stop string.
            let first = stops
                .iter()
                .filter_map(|s| text.find(s).map(|i| (i, *s)))
                .min_by_key(|x| x.0);
            let want = match first {
                Some((i, s)) => (text[..i].to_string(), Some(s.to_string())),
                None => (text.clone(), None),
            };
            // Split at random char boundaries.
            let chars: Vec<char> = text.chars().collect();
            let mut pieces = Vec::new();
            let mut i = 0;
            while i < chars.len() {
                let n = 1 + (rng.next_u64() % 3) as usize;
                pieces.push(
                    chars[i..(i + n).min(chars.len())]
                        .iter()
                        .collect::<String>(),
                );
                i += n;
            }
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let got = run_stops(&stops, &refs);
            assert_eq!(got, want, "{text:?} {pieces:?}");
        }
    }
}
