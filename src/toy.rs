//! The 2-D swiss roll of Sohl-Dickstein et al. 2015 (figure 1): a small MLP noise predictor
//! trained with DDPM's L_simple, sampled with any sampler, and scored by the sliced Wasserstein
//! distance to fresh data.

use crate::diffusion::schedule::{q_sample, NoiseSchedule};
use crate::sampler::{
    build_sampler, Denoiser, PredictionType, SamplerKind, SamplerOptions, SchedulerConfig,
    SeededNoise, StepEvent,
};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::Rng;
use std::f64::consts::PI;

/// `n` points of the swiss roll: r = 1.5 pi (1 + 2u), (r cos r, r sin r) / 10, plus N(0, 0.02^2)
/// jitter, so the roll spans about [-1.4, 1.4].
pub fn swiss_roll(n: usize, noise: &mut SeededNoise) -> Vec<[f32; 2]> {
    let jitter = noise.normals(2 * n);
    (0..n)
        .map(|i| {
            let u: f64 = noise.rng().random();
            let r = 1.5 * PI * (1.0 + 2.0 * u);
            [
                (r * r.cos() / 10.0) as f32 + 0.02 * jitter[2 * i],
                (r * r.sin() / 10.0) as f32 + 0.02 * jitter[2 * i + 1],
            ]
        })
        .collect()
}

pub fn points_tensor(points: &[[f32; 2]]) -> Result<Tensor> {
    let flat: Vec<f32> = points.iter().flat_map(|p| *p).collect();
    Tensor::from_vec(flat, (points.len(), 2), &Device::Cpu)
}

/// Sliced 2-Wasserstein distance between two equal-size point sets: the root mean, over
/// `projections` random directions, of the squared W2 distance of the 1-D projections (sorted
/// projections pair up optimally in 1-D).
pub fn sliced_wasserstein(a: &[[f32; 2]], b: &[[f32; 2]], projections: usize, seed: u64) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "sliced Wasserstein needs equal sample sizes"
    );
    let mut rng = SeededNoise::new(seed);
    let mut total = 0.0;
    for _ in 0..projections {
        let angle: f64 = rng.rng().random::<f64>() * PI;
        let (c, s) = (angle.cos(), angle.sin());
        let project = |p: &[[f32; 2]]| {
            let mut v: Vec<f64> = p
                .iter()
                .map(|x| c * x[0] as f64 + s * x[1] as f64)
                .collect();
            v.sort_by(|x, y| x.total_cmp(y));
            v
        };
        let (pa, pb) = (project(a), project(b));
        total += pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            / a.len() as f64;
    }
    (total / projections as f64).sqrt()
}

/// Sinusoidal embedding of the timestep (Vaswani et al. 2017, section 3.5, as DDPM uses it).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .unsqueeze(1)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.sin()?, args.cos()?], D::Minus1)
}

/// Fourier features [x, sin(2^k x), cos(2^k x)] for k < `octaves`: a plain MLP on 2-D inputs
/// is too smooth to fit a thin spiral (Tancik et al. 2020).
fn fourier_features(x: &Tensor, octaves: usize) -> Result<Tensor> {
    let freqs: Vec<f32> = (0..octaves).map(|k| 2f32.powi(k as i32)).collect();
    let freqs = Tensor::from_vec(freqs, (1, 1, octaves), x.device())?;
    let scaled = x.unsqueeze(2)?.broadcast_mul(&freqs)?.flatten_from(1)?;
    Tensor::cat(&[x, &scaled.sin()?, &scaled.cos()?], D::Minus1)
}

/// epsilon_theta(x_t, t): a residual MLP on Fourier features of x_t, with the timestep
/// embedding added to every block (as DDPM's U-Net adds it to every residual block).
pub struct ToyMlp {
    input: Linear,
    /// The timestep embedding's projection for all blocks at once (one matmul, not `depth`).
    time: Linear,
    blocks: Vec<(Linear, Linear)>,
    output: Linear,
    hidden: usize,
    embedding_dim: usize,
    octaves: usize,
}

impl ToyMlp {
    pub fn new(vb: VarBuilder, hidden: usize, depth: usize, embedding_dim: usize) -> Result<Self> {
        let octaves = 6;
        let input = linear(2 + 4 * octaves, hidden, vb.pp("input"))?;
        let time = linear(embedding_dim, hidden * depth, vb.pp("time"))?;
        let blocks = (0..depth)
            .map(|i| {
                let b = vb.pp(format!("blocks.{i}"));
                Ok((
                    linear(hidden, hidden, b.pp("fc1"))?,
                    linear(hidden, hidden, b.pp("fc2"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let output = linear(hidden, 2, vb.pp("output"))?;
        Ok(Self {
            input,
            time,
            blocks,
            hidden,
            output,
            embedding_dim,
            octaves,
        })
    }

    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let time = self
            .time
            .forward(&timestep_embedding(t, self.embedding_dim)?)?;
        let mut h = self.input.forward(&fourier_features(x, self.octaves)?)?;
        for (i, (fc1, fc2)) in self.blocks.iter().enumerate() {
            let time_i = time.narrow(1, i * self.hidden, self.hidden)?;
            let inner = (fc1.forward(&h.silu()?)? + time_i)?;
            h = (h + fc2.forward(&inner.silu()?)?)?;
        }
        self.output.forward(&h.silu()?)
    }
}

impl Denoiser for &ToyMlp {
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }

    /// Detached: the weights are training variables, and a sampler's chain of outputs would
    /// otherwise keep every step's activations alive for a backward pass that never comes.
    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let t = Tensor::full(t as f32, x.dim(0)?, x.device())?;
        Ok(self.forward(x, &t)?.detach())
    }
}

#[derive(Debug, Clone)]
pub struct ToyConfig {
    pub train_steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub ema_decay: f64,
    pub hidden: usize,
    pub depth: usize,
    pub seed: u64,
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            train_steps: 4000,
            batch_size: 256,
            learning_rate: 3e-3,
            ema_decay: 0.995,
            hidden: 128,
            depth: 3,
            seed: 0,
        }
    }
}

/// The diffusion the toy uses: DDPM's linear betas over T = 1000, no clipping.
pub fn toy_scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        clip_sample: Some(false),
        ..Default::default()
    }
}

const EMA_EVERY: usize = 10;

pub struct TrainedToy {
    pub model: ToyMlp,
    pub varmap: VarMap,
    pub final_loss: f64,
    pub losses: Vec<f64>,
}

/// Trains the MLP with L_simple = E ||eps - eps_theta(x_t, t)||^2 (DDPM eq. 14, Algorithm 1).
pub fn train(
    config: &ToyConfig,
    schedule: &NoiseSchedule,
    mut progress: impl FnMut(usize, f64),
) -> Result<TrainedToy> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut noise = SeededNoise::new(config.seed);
    // candle's initialisers draw from its own unseeded RNG; re-initialise from ours, visiting
    // the parameters by name (the VarMap is a HashMap, whose order changes between runs).
    let model = ToyMlp::new(vb, config.hidden, config.depth, 32)?;
    let named = crate::ops::tensor::named_vars(&varmap);
    crate::train::seeded_init(&named, &mut noise, &|_| false)?;
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n_train = schedule.num_train_timesteps();
    let vars: Vec<candle_core::Var> = named.into_iter().map(|(_, v)| v).collect();
    // Exponential moving average of the weights (DDPM appendix B uses 0.9999 over 800k steps;
    // this run is 1000x shorter).
    let mut ema: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
    let mut losses = Vec::with_capacity(config.train_steps);
    let mut smoothed = f64::NAN;
    for step in 0..config.train_steps {
        // Cosine decay to a tenth of the rate stabilises the last steps.
        let progress_frac = step as f64 / config.train_steps as f64;
        let lr = config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (PI * progress_frac).cos()));
        optimizer.set_learning_rate(lr);
        let x0 = points_tensor(&swiss_roll(config.batch_size, &mut noise))?;
        let timesteps: Vec<usize> = (0..config.batch_size)
            .map(|_| noise.rng().random_range(0..n_train))
            .collect();
        let eps = noise.randn(&[config.batch_size, 2])?;
        let x_t = q_sample(schedule, &x0, &timesteps, &eps)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            config.batch_size,
            &device,
        )?;
        let loss = (model.forward(&x_t, &t)? - &eps)?.sqr()?.mean_all()?;
        optimizer.backward_step(&loss)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            candle_core::bail!("toy training loss became {value} at step {step}")
        }
        // Updating every EMA_EVERY steps with decay^EMA_EVERY tracks the same average at a
        // tenth of the cost (each update is two tensor ops per parameter).
        if step % EMA_EVERY == EMA_EVERY - 1 {
            let decay = config.ema_decay.powi(EMA_EVERY as i32);
            for (average, var) in ema.iter_mut().zip(&vars) {
                *average = (average.affine(decay, 0.0)?
                    + var.as_tensor().detach().affine(1.0 - decay, 0.0)?)?;
            }
        }
        losses.push(value);
        smoothed = if smoothed.is_nan() {
            value
        } else {
            0.98 * smoothed + 0.02 * value
        };
        progress(step, smoothed);
    }
    for (average, var) in ema.iter().zip(&vars) {
        var.set(average)?;
    }
    Ok(TrainedToy {
        model,
        varmap,
        final_loss: smoothed,
        losses,
    })
}

/// The result of sampling the trained toy.
pub struct ToySamples {
    pub samples: Vec<[f32; 2]>,
    /// Snapshots of the reverse trajectory, noise first.
    pub trajectory: Vec<Vec<[f32; 2]>>,
    pub evaluations: usize,
}

pub fn to_points(x: &Tensor) -> Result<Vec<[f32; 2]>> {
    Ok(x.to_vec2::<f32>()?
        .into_iter()
        .map(|r| [r[0], r[1]])
        .collect())
}

/// Samples `n` points with `kind`, keeping the start, the first state at or below each of
/// `snapshot_timesteps` (largest first), and the result.
pub fn sample(
    model: &ToyMlp,
    kind: SamplerKind,
    options: &SamplerOptions,
    steps: usize,
    n: usize,
    seed: u64,
    snapshot_timesteps: &[f64],
) -> crate::Result<ToySamples> {
    let config = toy_scheduler_config();
    let sampler = build_sampler(kind, &config, options, steps)?;
    let mut noise = SeededNoise::new(seed);
    let x_start = noise
        .randn(&[n, 2])?
        .affine(sampler.init_noise_sigma(), 0.0)?;
    let mut states = vec![x_start.affine(1.0 / sampler.init_noise_sigma(), 0.0)?];
    let mut pending = snapshot_timesteps.iter().peekable();
    let mut counting = CountingDenoiser {
        inner: model,
        evaluations: 0,
    };
    let mut record = |e: &StepEvent| {
        if pending.next_if(|target| e.t <= **target).is_some() {
            states.push(e.sample.clone());
        }
        Ok(())
    };
    let out = sampler.sample(&mut counting, x_start, &mut noise, &mut record)?;
    let evaluations = counting.evaluations;
    states.push(out.clone());
    let trajectory = states.iter().map(to_points).collect::<Result<Vec<_>>>()?;
    Ok(ToySamples {
        samples: to_points(&out)?,
        trajectory,
        evaluations,
    })
}

struct CountingDenoiser<'a> {
    inner: &'a ToyMlp,
    evaluations: usize,
}

impl Denoiser for CountingDenoiser<'_> {
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }

    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.evaluations += 1;
        let mut inner = self.inner;
        inner.predict(x, t)
    }
}

/// The forward process q(x_t | x_0) at the given timesteps, from one draw of data.
pub fn forward_trajectory(
    schedule: &NoiseSchedule,
    data: &[[f32; 2]],
    timesteps: &[usize],
    seed: u64,
) -> Result<Vec<Vec<[f32; 2]>>> {
    let mut noise = SeededNoise::new(seed);
    let x0 = points_tensor(data)?;
    let eps = noise.randn(&[data.len(), 2])?;
    timesteps
        .iter()
        .map(|t| {
            let x_t = q_sample(schedule, &x0, &vec![*t; data.len()], &eps)?;
            to_points(&x_t)
        })
        .collect()
}

/// Draws rows of scatter panels into one RGB image: each panel shows [-2, 2]^2 (the unit of the
/// noise) with a faint frame; the first row in blue (forward), the second in red (reverse).
pub fn scatter_grid(rows: &[Vec<Vec<[f32; 2]>>], panel: u32) -> image::RgbImage {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1) as u32;
    let mut img = image::RgbImage::from_pixel(
        cols * panel,
        rows.len() as u32 * panel,
        image::Rgb([255, 255, 255]),
    );
    let colors = [image::Rgb([30, 80, 200]), image::Rgb([200, 40, 40])];
    for (r, row) in rows.iter().enumerate() {
        for (c, points) in row.iter().enumerate() {
            let (x0, y0) = (c as u32 * panel, r as u32 * panel);
            for i in 0..panel {
                for (px, py) in [
                    (x0 + i, y0),
                    (x0 + i, y0 + panel - 1),
                    (x0, y0 + i),
                    (x0 + panel - 1, y0 + i),
                ] {
                    img.put_pixel(px, py, image::Rgb([190, 190, 190]));
                }
            }
            for p in points {
                let fx = (p[0] as f64 + 2.0) / 4.0;
                let fy = 1.0 - (p[1] as f64 + 2.0) / 4.0;
                if !(0.0..1.0).contains(&fx) || !(0.0..1.0).contains(&fy) {
                    continue;
                }
                let px = x0 + 1 + (fx * (panel - 3) as f64) as u32;
                let py = y0 + 1 + (fy * (panel - 3) as f64) as u32;
                img.put_pixel(px, py, colors[r % 2]);
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliced_wasserstein_is_zero_for_identical_sets_and_grows_with_shift() {
        let mut noise = SeededNoise::new(1);
        let a = swiss_roll(500, &mut noise);
        assert!(sliced_wasserstein(&a, &a, 32, 0) < 1e-12);
        let shifted: Vec<[f32; 2]> = a.iter().map(|p| [p[0] + 0.5, p[1]]).collect();
        let d = sliced_wasserstein(&a, &shifted, 256, 0);
        // A shift by (0.5, 0) projects to 0.5 cos(theta); its RMS over directions is 0.5/sqrt(2).
        assert!((d - 0.5 / 2f64.sqrt()).abs() < 0.02, "{d}");
    }

    #[test]
    fn q_sample_matches_ddpm_eq4_moments() {
        let schedule = toy_scheduler_config().noise_schedule().unwrap();
        let x0 = Tensor::ones((20000, 2), DType::F32, &Device::Cpu).unwrap();
        let eps = SeededNoise::new(2).randn(&[20000, 2]).unwrap();
        let x_t = q_sample(&schedule, &x0, &vec![500; 20000], &eps).unwrap();
        let v: Vec<f32> = x_t.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let ab = schedule.alphas_cumprod[500];
        assert!((mean - ab.sqrt()).abs() < 0.02, "{mean} vs {}", ab.sqrt());
    }
}
