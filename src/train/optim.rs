//! AdamW, gradient clipping and the learning-rate schedule.
//!
//! The update is ggml's `opt_step_adamw` (decoupled weight decay, bias
//! correction) done on the host: the trained vectors are small (16k values
//! for q,v of the default model), and holding the moments here lets a
//! checkpoint save and restore them exactly, which `ggml-opt` does not expose.

/// AdamW's state for one flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// First and second moments.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

impl AdamW {
    pub fn new(n: usize, weight_decay: f32) -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `params` with `grad` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 / (1.0 - b1.powi(t));
        let bias2 = 1.0 / (1.0 - b2.powi(t));
        let decay = 1.0 - lr * self.weight_decay;
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = *m * b1 + g * (1.0 - b1);
            *v = *v * b2 + g * g * (1.0 - b2);
            let mh = *m * bias1;
            let vh = *v * bias2;
            *p = *p * decay - lr * mh / (vh.sqrt() + self.eps);
        }
    }
}

/// Scales `grad` down to an L2 norm of at most `max_norm` (0 = no limit);
/// returns the norm before clipping.
pub fn clip(grad: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / norm;
        grad.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

/// Linear warm-up to `peak`, then cosine decay to `peak * min_ratio` at
/// `total` steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f32,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f32,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let mut opt = AdamW::new(2, 0.0);
        let mut p = vec![1.0, -1.0];
        opt.step(&mut p, &[0.5, -2.0], 0.1);
        // Bias-corrected: the first step is lr * sign(g).
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn weight_decay_pulls_to_zero() {
        let mut opt = AdamW::new(1, 0.5);
        let mut p = vec![2.0];
        opt.step(&mut p, &[0.0], 0.1);
        assert!((p[0] - 1.9).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn clip_limits_the_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut g = vec![0.3, 0.4];
        clip(&mut g, 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
            min_ratio: 0.1,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.55).abs() < 1e-6);
        assert!((s.lr(14) - 0.1).abs() < 1e-6);
        assert!(s.lr(20) >= 0.1);
    }
}
