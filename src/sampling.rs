//! Token sampling: repetition penalty, then top-k, top-p and min-p filtering,
//! then temperature and a seeded draw. Temperature 0 is greedy (argmax).

use crate::rng::Rng;

/// Sampling settings of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the top token's probability.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recent tokens; 1 = off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every value's range; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite_at_least = |name: &str, v: f32, min: f32| {
            if v.is_finite() && v >= min {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number >= {min}, got {v}"))
            }
        };
        finite_at_least("temperature", self.temperature, 0.0)?;
        finite_at_least("repeat_penalty", self.repeat_penalty, 0.0)?;
        if self.repeat_penalty == 0.0 {
            return Err("repeat_penalty must be > 0 (1 disables it)".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }
}

/// A seeded sampler for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from `logits`, given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalized = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        let mut owned;
        let logits = if penalized {
            owned = logits.to_vec();
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                let Some(l) = owned.get_mut(t as usize) else {
                    continue;
                };
                if seen.insert(t) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
            &owned[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_logit);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(by_logit);

        // Probabilities at temperature.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|c| ((c.1 - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);

        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cumulative += q;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let kept = &probs[..keep];
        let total: f32 = kept.iter().sum();
        let mut r = self.rng.uniform() * total;
        for (i, q) in kept.iter().enumerate() {
            if r < *q {
                return candidates[i].0;
            }
            r -= q;
        }
        candidates[keep - 1].0
    }
}

/// Index of the largest logit (the lowest index among ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

/// The most alternatives [`logprob`] reports (OpenAI's `top_logprobs`
/// allows as many).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability under the model (the log-softmax
/// of its raw logits: before penalties, temperature or truncation), and
/// the most likely tokens at that position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// At most `top` (token, log-probability), most likely first; ties go
    /// to the lower token id.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` given `logits`, with the `top` most
/// likely tokens (at most [`MAX_TOP_LOGPROBS`]). The sum runs in f64 from
/// the largest logit, so the values equal a log-softmax in any precision
/// to about 1e-6.
pub fn logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let of = |l: f32| (l as f64 - log_z) as f32;
    let top = top.min(MAX_TOP_LOGPROBS).min(logits.len());
    // The `top` largest in one pass: a small sorted list.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() || best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| of(l)),
        top: best.into_iter().map(|(t, l)| (t, of(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let params = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[1]), 3);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 3,
            "high temperature should vary"
        );
        let top1 = SamplingParams { top_k: 1, ..params };
        assert!(draw(&top1).iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn min_p_and_top_p_drop_unlikely_tokens() {
        let logits = [10.0, 9.5, 0.0, -5.0];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
                min_p: 0.0,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..200 {
                assert!(s.sample(&logits, &[]) < 2);
            }
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_largest_first() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = logprob(&logits, 4, 3);
        assert!((lp.logprob as f64 - (0.5 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(logprob(&logits, 0, 0).top, vec![]);
        assert_eq!(logprob(&logits, 0, 99).top.len(), logits.len());
    }
}
