//! The pixel-space DDPM training step (Ho et al. 2020, Algorithm 1; with the learned variance
//! and hybrid loss of Nichol & Dhariwal 2021 when configured), and its checkpoints.
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k): the batch, the timesteps,
//! the noise and the flips. A run resumed from step k's checkpoint therefore takes exactly the
//! steps the uninterrupted run would have taken.

use super::config::{Loss, TrainConfig};
use super::optim::{clip_factor, warmup_lr, AdamW, AdamWParams};
use super::{named_vars, seeded_init, Ema};
use crate::checkpoint;
use crate::data::idx::LabelledImages;
use crate::error::{Error, Result};
use crate::likelihood::DiffusionTables;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::pipeline::pixel::{PixelDiffusion, CONFIG_KEY};
use crate::sampler::noise::SeededNoise;
use crate::schedule::{q_sample, NoiseSchedule, PredictionType};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata key of the number of completed optimiser steps.
pub const STEP_KEY: &str = "diffuse.step";

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
    names: Vec<String>,
    vars: Vec<Var>,
    named: Vec<(String, Var)>,
    optimizer: AdamW,
    ema: Ema,
    device: Device,
    /// Completed optimiser steps.
    pub step: usize,
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
        let unet = UNet2DConditionModel::new(config.unet_config()?, vb)?;
        let named = named_vars(&varmap);
        seeded_init(&named, &mut SeededNoise::new(config.train.seed), &zero_init)?;
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = AdamW::new(
            &vars,
            AdamWParams {
                weight_decay: config.train.weight_decay,
                ..Default::default()
            },
        )?;
        let ema = Ema::new(config.train.ema_decay, &named)?;
        let schedule = config.scheduler_config()?.noise_schedule()?;
        Ok(Self {
            tables: DiffusionTables::new(&schedule),
            schedule,
            unet,
            _varmap: varmap,
            names: named.iter().map(|(n, _)| n.clone()).collect(),
            vars,
            named,
            optimizer,
            ema,
            device,
            step: 0,
            config,
        })
    }

    /// Continues from a checkpoint written by [`PixelTrainer::save`]. The checkpoint's config
    /// must describe the same model and diffusion process as `config`; the `[data]` and `[train]`
    /// sections may differ (more steps, other logging, data without flips), which makes the
    /// resumed run a continuation rather than a replay.
    pub fn resume(config: TrainConfig, path: &Path, device: &Device) -> Result<Self> {
        let mut trainer = Self::new(config, device)?;
        let loaded = checkpoint::load(path, device)?;
        let file_error = |message: String| Error::File {
            path: path.display().to_string(),
            message,
        };
        let saved = TrainConfig::from_toml_str(loaded.meta(path, CONFIG_KEY)?)
            .map_err(|e| file_error(format!("its training config is not valid: {e}")))?;
        if saved.model != trainer.config.model || saved.diffusion != trainer.config.diffusion {
            return Err(file_error(
                "was trained with another [model] or [diffusion] section than this config".into(),
            ));
        }
        trainer.step = loaded.step(path, STEP_KEY)?;
        super::restore_averaged(
            &loaded,
            path,
            &trainer.named,
            &trainer.vars,
            &mut trainer.ema,
            &mut trainer.optimizer,
            trainer.step,
        )?;
        Ok(trainer)
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// One optimiser step on a batch drawn from `data`.
    pub fn train_step(&mut self, data: &LabelledImages) -> Result<StepStats> {
        let cfg = &self.config;
        let batch = cfg.train.batch_size;
        let n_train = self.schedule.num_train_timesteps();
        let mut rng = SeededNoise::new(super::step_seed(cfg.train.seed, self.step));
        let (indices, timesteps) =
            super::draw_examples_and_timesteps(&mut rng, batch, data.len(), n_train);
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
        let xt = q_sample(&self.schedule, &x0, &timesteps, &eps)?;
        let labels = match cfg.model.num_classes {
            Some(_) => Some(data.label_batch(&indices, &device)?),
            None => None,
        };
        let t = Tensor::from_vec(
            timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            batch,
            &device,
        )?;
        let output = self
            .unet
            .forward(&xt, &t, &UNetConditioning::classes(labels))?;
        let channels = x0.dim(1)?;
        let prediction = output.narrow(1, 0, channels)?;
        let target = crate::schedule::training_target(
            &self.schedule,
            PredictionType::parse(&cfg.diffusion.prediction_type)?,
            &x0,
            &eps,
            &timesteps,
        )?;
        // L_simple, DDPM eq. 14.
        let mse = (prediction - &target)?.sqr()?.mean_all()?;
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
                &xt,
                &timesteps,
                self.schedule_variance()?,
                false,
            )?;
            let vb = self
                .tables
                .vb_term_bits(&x0, &xt, &timesteps, &mean, &log_variance)?
                .mean_all()?;
            let weight = cfg.diffusion.vlb_weight * n_train as f64;
            let value = vb.to_scalar::<f32>()? as f64;
            ((&mse + vb.affine(weight, 0.0)?)?, value)
        } else {
            (mse.clone(), 0.0)
        };
        let (loss_value, grads, norm) = super::checked_backward(&loss, &self.vars, self.step)?;
        let lr = warmup_lr(cfg.train.learning_rate, self.step, cfg.train.warmup_steps);
        self.optimizer.step(
            &self.vars,
            &grads,
            lr,
            clip_factor(norm, cfg.train.grad_clip),
        )?;
        self.ema.update(&self.named, self.step)?;
        self.step += 1;
        Ok(StepStats {
            loss: loss_value,
            mse: mse.to_scalar::<f32>()? as f64,
            vb_bits: vb_value,
            grad_norm: norm,
            learning_rate: lr,
        })
    }

    fn schedule_variance(&self) -> Result<crate::sampler::ddpm::VarianceType> {
        Ok(self.config.scheduler_config()?.variance_type)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (CONFIG_KEY.to_string(), self.config.to_toml()),
            (STEP_KEY.to_string(), self.step.to_string()),
            ("format".to_string(), "diffuse-pixel-ddpm".to_string()),
        ])
    }

    /// The full training state: weights, their average, AdamW's moments, the step.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(4 * self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            tensors.push((format!("model.{name}"), self.vars[i].as_tensor().detach()));
            tensors.push((format!("ema.{name}"), self.ema.average[i].clone()));
        }
        tensors.extend(
            self.optimizer
                .moment_tensors(self.names.iter().map(String::as_str)),
        );
        checkpoint::save(path, &tensors, &self.metadata())
    }

    /// The averaged weights alone, in `dtype` (what `diffuse sample` and `eval` need).
    pub fn save_weights(&self, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .names
            .iter()
            .zip(&self.ema.average)
            .map(|(name, t)| Ok((format!("ema.{name}"), t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        checkpoint::save(path, &tensors, &self.metadata())
    }

    /// The averaged weights as a model to sample from.
    pub fn ema_model(&self) -> Result<PixelDiffusion> {
        let weights: HashMap<String, Tensor> = self
            .names
            .iter()
            .cloned()
            .zip(self.ema.average.iter().cloned())
            .collect();
        PixelDiffusion::from_tensors(self.config.clone(), weights, &self.device)
    }

    /// The current raw weights by name (for tests and comparisons).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().detach()))
            .collect()
    }
}
