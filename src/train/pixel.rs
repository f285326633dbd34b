//! The pixel-space DDPM training step (Ho et al. 2020, Algorithm 1; with the learned variance
//! and hybrid loss of Nichol & Dhariwal 2021 when configured), and its checkpoints.
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k): the batch, the timesteps,
//! the noise and the flips. A run resumed from step k's checkpoint therefore takes exactly the
//! steps the uninterrupted run would have taken.

use super::config::TrainConfig;
use super::optim::AdamWParams;
use super::state::{TrainerKind, TrainerState, UpdateRule};
use super::{named_vars, seeded_init, NoisedBatch};
use crate::checkpoint;
use crate::data::idx::LabelledImages;
use crate::diffusion::config::Loss;
use crate::diffusion::likelihood::DiffusionTables;
use crate::diffusion::schedule::NoiseSchedule;
use crate::error::Result;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::pipeline::pixel::{PixelDiffusion, CONFIG_KEY};
use crate::sampler::noise::SeededNoise;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    pub mse: f64,
    pub vb_bits: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

pub struct PixelTrainer {
    pub config: TrainConfig,
    pub schedule: NoiseSchedule,
    tables: DiffusionTables,
    unet: UNet2DConditionModel,
    _varmap: VarMap,
    state: TrainerState,
    device: Device,
}

/// Residual branches' last convs and the output conv start at zero (improved-diffusion's
/// `zero_module`), so that the untrained network is the identity plus a zero prediction.
fn zero_init(name: &str) -> bool {
    name == "conv_out.weight" || name == "conv_out.bias" || name.ends_with("conv2.weight")
}

impl PixelTrainer {
    /// A fresh model on `device`, initialised from `config.train.seed` (the same draws on every
    /// device: they are made on the CPU).
    pub fn new(config: TrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let device = device.clone();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let unet = UNet2DConditionModel::new(config.description().unet_config()?, vb)?;
        let named = named_vars(&varmap);
        seeded_init(&named, &mut SeededNoise::new(config.train.seed), &zero_init)?;
        let t = &config.train;
        let rule = UpdateRule {
            learning_rate: t.learning_rate_schedule(),
            grad_clip: t.grad_clip,
            adamw: AdamWParams {
                weight_decay: t.weight_decay,
                ..Default::default()
            },
        };
        let state = TrainerState::new(named, rule, Some(t.ema_decay))?;
        let schedule = config.description().scheduler_config().noise_schedule()?;
        Ok(Self {
            tables: DiffusionTables::new(&schedule),
            schedule,
            unet,
            _varmap: varmap,
            state,
            device,
            config,
        })
    }

    /// Continues from a checkpoint written by [`PixelTrainer::save`]. The checkpoint's config
    /// must describe the same model and diffusion process as `config`; the `[data]` and `[train]`
    /// sections may differ (more steps, other logging, data without flips), which makes the
    /// resumed run a continuation rather than a replay.
    pub fn resume(config: TrainConfig, path: &Path, device: &Device) -> Result<Self> {
        let mut trainer = Self::new(config, device)?;
        let (loaded, step) = super::state::open_for_resume(
            path,
            device,
            TrainerKind::Pixel,
            &trainer.config.to_toml(),
            &["model", "diffusion"],
            |saved| Ok(TrainConfig::from_toml_str(saved)?.to_toml()),
        )?;
        trainer.state.restore(&loaded, path, step)?;
        Ok(trainer)
    }

    /// Completed optimiser steps.
    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn parameter_count(&self) -> usize {
        self.state.parameter_count()
    }

    /// One optimiser step on a batch drawn from `data`.
    pub fn train_step(&mut self, data: &LabelledImages) -> Result<StepStats> {
        let cfg = &self.config;
        let batch = cfg.train.batch_size;
        let n_train = self.schedule.num_train_timesteps();
        let (mut rng, indices, timesteps) = super::draw_examples_and_timesteps(
            cfg.train.seed,
            self.state.step,
            batch,
            data.len(),
            n_train,
        );
        let device = self.device.clone();
        // The batch is assembled (and flipped) on the CPU, then moved once.
        let mut x0 = data.batch(&indices, &Device::Cpu)?;
        if cfg.data.random_flip {
            let flips: Vec<bool> = (0..batch).map(|_| rng.rng().random_bool(0.5)).collect();
            let rows = (0..batch)
                .map(|i| {
                    let row = x0.narrow(0, i, 1)?;
                    if flips[i] {
                        row.flip(&[3])
                    } else {
                        Ok(row)
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            x0 = Tensor::cat(&rows, 0)?;
        }
        let x0 = x0.to_device(&device)?;
        let eps = rng.randn(x0.dims())?.to_device(&device)?;
        let noised = NoisedBatch::new(
            &self.schedule,
            cfg.diffusion.prediction_type,
            &x0,
            &timesteps,
            &eps,
        )?;
        let (xt, target) = (&noised.xt, &noised.target);
        let labels = match cfg.model.num_classes {
            Some(_) => Some(data.label_batch(&indices, &device)?),
            None => None,
        };
        let output = self
            .unet
            .forward(xt, &noised.t, &UNetConditioning::classes(labels))?;
        let channels = x0.dim(1)?;
        let prediction = output.narrow(1, 0, channels)?;
        let mse = super::denoising_loss(
            &prediction,
            target,
            (&self.schedule, cfg.diffusion.prediction_type),
            &timesteps,
            cfg.train.min_snr_gamma,
        )?;
        let (loss, vb_value) = if cfg.diffusion.loss == Loss::Hybrid {
            // The bound's term with the mean's gradient stopped: it trains only the variance
            // (Nichol & Dhariwal, section 3.1). lambda T L_t estimates lambda L_vlb.
            let frozen = Tensor::cat(
                &[
                    output.narrow(1, 0, channels)?.detach(),
                    output.narrow(1, channels, channels)?,
                ],
                1,
            )?;
            let (mean, log_variance) = self.tables.p_mean_variance(
                &frozen,
                xt,
                &timesteps,
                self.config.diffusion.variance,
                false,
            )?;
            let vb = self
                .tables
                .vb_term_bits(&x0, xt, &timesteps, &mean, &log_variance)?
                .mean_all()?;
            let weight = cfg.diffusion.vlb_weight * n_train as f64;
            let value = vb.to_scalar::<f32>()? as f64;
            ((&mse + vb.affine(weight, 0.0)?)?, value)
        } else {
            (mse.clone(), 0.0)
        };
        let (loss_value, grads) = super::checked_loss_backward(&loss, self.state.step)?;
        let applied = self.state.apply(&grads)?;
        Ok(StepStats {
            loss: loss_value,
            mse: mse.to_scalar::<f32>()? as f64,
            vb_bits: vb_value,
            grad_norm: applied.grad_norm,
            learning_rate: applied.learning_rate,
        })
    }

    /// The full training state: weights, their average, AdamW's moments, the step.
    pub fn save(&self, path: &Path) -> Result<()> {
        super::state::save_checkpoint(
            path,
            TrainerKind::Pixel,
            self.state.step,
            &self.config.to_toml(),
            &self.state.checkpoint_tensors(),
        )
    }

    /// The averaged weights alone, in `dtype` (what `diffuse sample` and `eval` load).
    pub fn save_weights(&self, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .state
            .output_weights()?
            .into_iter()
            .map(|(name, t)| Ok((format!("ema.{name}"), t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let metadata = BTreeMap::from([
            (CONFIG_KEY.to_string(), self.config.to_toml()),
            ("diffuse.step".to_string(), self.state.step.to_string()),
            ("format".to_string(), "diffuse-pixel-ddpm".to_string()),
        ]);
        checkpoint::save(path, &tensors, &metadata)
    }

    /// The averaged weights as a model to sample from.
    pub fn ema_model(&self) -> Result<PixelDiffusion> {
        let weights: HashMap<String, Tensor> = self.state.output_weights()?.into_iter().collect();
        PixelDiffusion::from_tensors(self.config.description(), weights, &self.device)
    }

    /// The current raw weights by name (for tests and comparisons).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.state.weights()
    }
}

/// The weights file beside the checkpoint (the averaged weights, for `diffuse sample`).
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A pixel-space run in a training session: the trainer and its images.
pub struct PixelRun {
    pub trainer: PixelTrainer,
    pub data: LabelledImages,
}

impl super::session::Trainer for PixelRun {
    fn step(&self) -> usize {
        self.trainer.step()
    }

    fn columns(&self) -> &'static [&'static str] {
        &["loss", "mse", "vb_bits", "grad_norm", "learning_rate"]
    }

    fn train_step(&mut self) -> Result<Vec<f64>> {
        let s = self.trainer.train_step(&self.data)?;
        Ok(vec![s.loss, s.mse, s.vb_bits, s.grad_norm, s.learning_rate])
    }

    fn save(&mut self, out_dir: &Path) -> Result<()> {
        self.trainer
            .save(&out_dir.join(super::session::CHECKPOINT_FILE))?;
        self.trainer
            .save_weights(&out_dir.join(WEIGHTS_FILE), DType::F32)
    }

    /// 64 samples from the averaged weights (DDIM, 50 steps, fixed seed), labelled 0, 1, 2, ...
    /// for class-conditional models, as one grid `samples-<step>.png`.
    fn sample(&mut self, out_dir: &Path, step: usize) -> Result<()> {
        let model = self.trainer.ema_model()?;
        let n = 64;
        let labels: Option<Vec<u32>> = model
            .num_classes()
            .map(|k| (0..n).map(|i| (i % k) as u32).collect());
        let images = model.sample(
            crate::sampler::SamplerKind::Ddim,
            &crate::sampler::SamplerOptions::default(),
            50,
            n,
            labels.as_deref(),
            0,
            &mut |_, _| {},
        )?;
        let cols = model.num_classes().unwrap_or(8);
        crate::image_io::save_png(
            &crate::pipeline::pixel::grid(&images, cols)?,
            &out_dir.join(format!("samples-{step:07}.png")),
            None,
        )
    }
}
