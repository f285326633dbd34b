//! AdamW (Loshchilov & Hutter 2019) with its moments exposed, so checkpoints can carry them and a
//! resumed run continues exactly; gradient-norm clipping; the warm-up schedule.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed, ordered list of variables.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub params: AdamWParams,
    /// First and second moment estimates, in the variables' order.
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
    /// Number of updates applied so far (t of the bias correction).
    pub updates: usize,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            first_moments: vars.iter().map(zeros).collect::<Result<_>>()?,
            second_moments: vars.iter().map(zeros).collect::<Result<_>>()?,
            updates: 0,
        })
    }

    /// One update with gradients scaled by `grad_scale` (the clipping factor):
    /// m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2,
    /// theta <- theta (1 - lr wd) - lr m^ / (sqrt(v^) + eps) (Loshchilov & Hutter, Algorithm 2).
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &GradStore,
        learning_rate: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let p = self.params;
        self.updates += 1;
        let t = self.updates as i32;
        let correction1 = 1.0 - p.beta1.powi(t);
        let correction2 = 1.0 - p.beta2.powi(t);
        let coefficients = AdamWUpdate {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            grad_scale: grad_scale as f32,
            inverse_correction1: (1.0 / correction1) as f32,
            inverse_correction2: (1.0 / correction2) as f32,
            learning_rate: learning_rate as f32,
            decay: (1.0 - learning_rate * p.weight_decay) as f32,
        };
        for (i, var) in vars.iter().enumerate() {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let moments = (&self.first_moments[i], &self.second_moments[i]);
            if let Some((m, v)) = coefficients.fused(var, grad, moments)? {
                self.first_moments[i] = m;
                self.second_moments[i] = v;
                continue;
            }
            // A variable's gradient can still hold the op that made it (and through it the step's
            // activations); moments built on it would chain every step's graph to the next.
            let grad = grad.detach().affine(grad_scale, 0.0)?;
            let m =
                (self.first_moments[i].affine(p.beta1, 0.0)? + grad.affine(1.0 - p.beta1, 0.0)?)?;
            let v = (self.second_moments[i].affine(p.beta2, 0.0)?
                + grad.sqr()?.affine(1.0 - p.beta2, 0.0)?)?;
            let m_hat = m.affine(1.0 / correction1, 0.0)?;
            let v_hat = v.affine(1.0 / correction2, 0.0)?;
            let update = (m_hat / v_hat.sqrt()?.affine(1.0, p.eps)?)?;
            let decayed = var
                .as_tensor()
                .affine(1.0 - learning_rate * p.weight_decay, 0.0)?;
            var.set(&(decayed - update.affine(learning_rate, 0.0)?)?)?;
            self.first_moments[i] = m;
            self.second_moments[i] = v;
        }
        Ok(())
    }
}

/// One AdamW update's coefficients, for the fused CPU pass.
#[derive(Debug, Clone, Copy)]
struct AdamWUpdate {
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    inverse_correction1: f32,
    inverse_correction2: f32,
    learning_rate: f32,
    /// 1 - lr wd.
    decay: f32,
}

/// Values per task of the fused update.
const UPDATE_CHUNK: usize = 1 << 14;

impl AdamWUpdate {
    /// The update of [`AdamW::step`] in one pass over f32 CPU tensors (composed, it is thirteen
    /// passes, each with a fresh tensor): sets the variable and returns the new moments, or
    /// `None` for other devices and dtypes.
    fn fused(
        &self,
        var: &Var,
        grad: &Tensor,
        (m, v): (&Tensor, &Tensor),
    ) -> Result<Option<(Tensor, Tensor)>> {
        use crate::ops::tensor::{is_cpu_f32, storage_f32};
        use crate::ops::vector_math::with_wide_vectors;
        use rayon::prelude::*;
        if ![var.as_tensor(), grad, m, v].into_iter().all(is_cpu_f32) {
            return Ok(None);
        }
        let (grad, m, v) = (grad.contiguous()?, m.contiguous()?, v.contiguous()?);
        let weights = var.as_tensor().contiguous()?;
        let count = weights.elem_count();
        let (mut new_w, mut new_m, mut new_v) =
            (vec![0f32; count], vec![0f32; count], vec![0f32; count]);
        {
            let (w_storage, w_layout) = weights.storage_and_layout();
            let (g_storage, g_layout) = grad.storage_and_layout();
            let (m_storage, m_layout) = m.storage_and_layout();
            let (v_storage, v_layout) = v.storage_and_layout();
            let w = storage_f32(&w_storage, w_layout, "adamw", "the weights")?;
            let g = storage_f32(&g_storage, g_layout, "adamw", "the gradient")?;
            let m = storage_f32(&m_storage, m_layout, "adamw", "the first moments")?;
            let v = storage_f32(&v_storage, v_layout, "adamw", "the second moments")?;
            if g.len() != count || m.len() != count || v.len() != count {
                candle_core::bail!(
                    "adamw: gradient or moments do not have the weights' {count} values"
                )
            }
            let c = *self;
            new_w
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(new_m.par_chunks_mut(UPDATE_CHUNK))
                .zip(new_v.par_chunks_mut(UPDATE_CHUNK))
                .enumerate()
                .for_each(|(chunk, ((new_w, new_m), new_v))| {
                    let at = chunk * UPDATE_CHUNK;
                    let len = new_w.len();
                    let (w, g, m, v) = (
                        &w[at..][..len],
                        &g[at..][..len],
                        &m[at..][..len],
                        &v[at..][..len],
                    );
                    with_wide_vectors(
                        #[inline(always)]
                        || {
                            for i in 0..len {
                                let g = g[i] * c.grad_scale;
                                let m = c.beta1 * m[i] + (1.0 - c.beta1) * g;
                                let v = c.beta2 * v[i] + (1.0 - c.beta2) * (g * g);
                                let m_hat = m * c.inverse_correction1;
                                let v_hat = v * c.inverse_correction2;
                                let update = m_hat / (v_hat.sqrt() + c.eps);
                                new_w[i] = w[i] * c.decay - c.learning_rate * update;
                                new_m[i] = m;
                                new_v[i] = v;
                            }
                        },
                    )
                });
        }
        let shape = weights.shape();
        var.set(&Tensor::from_vec(new_w, shape, weights.device())?)?;
        Ok(Some((
            Tensor::from_vec(new_m, shape, weights.device())?,
            Tensor::from_vec(new_v, shape, weights.device())?,
        )))
    }
}

impl AdamW {
    /// The moments as checkpoint entries `optim.m.<name>` and `optim.v.<name>`, `names` in the
    /// variables' order.
    pub fn moment_tensors<'a>(
        &self,
        names: impl Iterator<Item = &'a str>,
    ) -> Vec<(String, Tensor)> {
        names
            .enumerate()
            .flat_map(|(i, name)| {
                [
                    (format!("optim.m.{name}"), self.first_moments[i].clone()),
                    (format!("optim.v.{name}"), self.second_moments[i].clone()),
                ]
            })
            .collect()
    }

    /// Reads back what [`Self::moment_tensors`] wrote, for `names` in the variables' order, and
    /// the update count `step` (the bias corrections depend on it); errors name the file and
    /// tensor.
    pub fn restore<'a>(
        &mut self,
        loaded: &crate::checkpoint::Loaded,
        path: &std::path::Path,
        names: impl Iterator<Item = &'a str>,
        vars: &[Var],
        step: usize,
    ) -> crate::Result<()> {
        for (i, (name, var)) in names.zip(vars).enumerate() {
            self.first_moments[i] =
                loaded.tensor_like(path, &format!("optim.m.{name}"), var.dims())?;
            self.second_moments[i] =
                loaded.tensor_like(path, &format!("optim.v.{name}"), var.dims())?;
        }
        self.updates = step;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars` (absent gradients count as zero).
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    // One read-back for all the parameters: on a GPU each read waits for the queue to drain.
    let gradients: Vec<&Tensor> = vars.iter().filter_map(|var| grads.get(var)).collect();
    if gradients.iter().all(|g| crate::ops::tensor::is_cpu_f32(g)) {
        // f32 CPU gradients: squares summed in f64 in one pass each.
        let mut total = 0f64;
        for g in gradients {
            let g = g.contiguous()?;
            let (storage, layout) = g.storage_and_layout();
            let values =
                crate::ops::tensor::storage_f32(&storage, layout, "grad norm", "a gradient")?;
            total += crate::ops::vector_math::sum_squared_deviations(values, 0.0);
        }
        return Ok(total.sqrt());
    }
    let squares = gradients
        .into_iter()
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&squares, 0)?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// The factor that scales a gradient of norm `norm` down to `max_norm` (1 when under it or when
/// clipping is off).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Linear warm-up to `peak` over `warmup_steps`, then constant (DDPM appendix B: 5000 steps).
pub fn warmup_lr(peak: f64, step: usize, warmup_steps: usize) -> f64 {
    if warmup_steps == 0 {
        peak
    } else {
        peak * ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    }
}

/// The learning rate at each step: warm-up-stable-decay (Hu et al. 2024, MiniCPM, section 4):
/// the linear warm-up of [`warmup_lr`], the peak held, then a linear fall to `final_rate` over
/// the last `decay_steps` of `total_steps`. The cool-down lowers the loss that a constant rate
/// plateaus at, and since the rate is constant until it starts, a run can be continued with
/// `--resume` and cooled down only when it ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// 0: no cool-down, the peak to the end.
    pub decay_steps: usize,
    pub final_rate: f64,
}

impl LrSchedule {
    /// Warm-up, then the peak to the end.
    pub fn constant(peak: f64, warmup_steps: usize) -> Self {
        Self {
            peak,
            warmup_steps,
            total_steps: 0,
            decay_steps: 0,
            final_rate: peak,
        }
    }

    /// The rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let warmed = warmup_lr(self.peak, step, self.warmup_steps);
        let decay_start = self.total_steps.saturating_sub(self.decay_steps);
        if self.decay_steps == 0 || step < decay_start {
            return warmed;
        }
        let progress = ((step - decay_start + 1) as f64 / self.decay_steps as f64).min(1.0);
        warmed * (1.0 - progress) + self.final_rate * progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// In `a @ b` the gradient of `a` is computed from the variable `b` and so carries an op;
    /// moments built on it without detaching would keep every step's graph alive (the judge
    /// trainer grew by 25 MB a step that way).
    #[test]
    fn moments_hold_no_graph_of_the_step() {
        let a = Var::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![0.5f32, -1.0, 2.0, 1.5], (2, 2), &Device::Cpu).unwrap();
        let vars = [a.clone(), b.clone()];
        let mut opt = AdamW::new(&vars, AdamWParams::default()).unwrap();
        for _ in 0..2 {
            let loss = a
                .as_tensor()
                .matmul(b.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(&a).unwrap().track_op());
            opt.step(&vars, &grads, 0.1, 1.0).unwrap();
        }
        for moment in opt.first_moments.iter().chain(&opt.second_moments) {
            assert!(!moment.track_op());
        }
    }

    #[test]
    fn adamw_matches_a_hand_computed_update() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = AdamWParams {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&var), params).unwrap();
        // loss = sum(x^2) -> g = 2x.
        for _ in 0..2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(std::slice::from_ref(&var), &grads, 0.01, 1.0)
                .unwrap();
        }
        // Reference: the same two updates in f64.
        let mut x = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                let g = 2.0 * x[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let m_hat = m[i] / (1.0 - 0.9f64.powi(t));
                let v_hat = v[i] / (1.0 - 0.999f64.powi(t));
                x[i] = x[i] * (1.0 - 0.01 * 0.1) - 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - x[i]).abs() < 1e-6, "{got:?} vs {x:?}");
        }
    }

    /// The fused f32 pass (taken for f32 CPU variables) equals the composed update (taken for
    /// f64 ones) over three steps with clipping and weight decay, on more values than one task;
    /// the gradient norm likewise.
    #[test]
    fn fused_update_matches_the_composed_one() {
        let count = 2 * UPDATE_CHUNK + 77;
        let start = crate::ops::tensor::seeded_randn(&[count], 5);
        let target = crate::ops::tensor::seeded_randn(&[count], 6);
        let params = AdamWParams {
            weight_decay: 0.05,
            ..Default::default()
        };
        let run = |dtype: DType| {
            let var = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
            let target = target.to_dtype(dtype).unwrap();
            let mut opt = AdamW::new(std::slice::from_ref(&var), params).unwrap();
            let mut norms = Vec::new();
            for _ in 0..3 {
                let loss = (var.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                let norm = grad_norm(std::slice::from_ref(&var), &grads).unwrap();
                norms.push(norm);
                opt.step(
                    std::slice::from_ref(&var),
                    &grads,
                    0.01,
                    clip_factor(norm, 50.0),
                )
                .unwrap();
            }
            let as_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            (
                as_f64(var.as_tensor()),
                as_f64(&opt.first_moments[0]),
                as_f64(&opt.second_moments[0]),
                norms,
            )
        };
        let (fused, composed) = (run(DType::F32), run(DType::F64));
        for (name, a, b) in [
            ("weights", &fused.0, &composed.0),
            ("first moments", &fused.1, &composed.1),
            ("second moments", &fused.2, &composed.2),
        ] {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{name} differ by {worst}");
        }
        for (a, b) in fused.3.iter().zip(&composed.3) {
            assert!((a - b).abs() < 1e-5 * b, "gradient norms {a} and {b}");
        }
    }

    #[test]
    fn clipping_and_warmup() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_factor(4.0, 0.0), 1.0);
        assert_eq!(warmup_lr(1.0, 0, 4), 0.25);
        assert_eq!(warmup_lr(1.0, 3, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 100, 4), 1.0);
    }

    #[test]
    fn cool_down_falls_linearly_over_the_last_steps() {
        let schedule = LrSchedule {
            peak: 1.0,
            warmup_steps: 2,
            total_steps: 10,
            decay_steps: 4,
            final_rate: 0.2,
        };
        let rates: Vec<f64> = (0..12).map(|step| schedule.at(step)).collect();
        let expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2];
        for (rate, want) in rates.iter().zip(expected) {
            assert!((rate - want).abs() < 1e-12, "{rates:?}");
        }
        let constant = LrSchedule::constant(3.0, 0);
        assert!((0..100).all(|step| constant.at(step) == 3.0));
    }
}
