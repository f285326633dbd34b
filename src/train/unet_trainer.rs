//! The U-Net side of fine-tuning: its trainable weights (LoRA adapters on the attention
//! projections, Hu et al. 2021, or every weight), the denoising loss of the model's own
//! prediction type (DDPM eq. 14, or v), the step with gradient accumulation, min-SNR weighting
//! and offset noise, its checkpoints, and the written LoRA file or model folder. It knows
//! nothing of images or text, so the benchmark runs it on random latents.

pub use super::config::FinetuneSettings;
use super::finetune_data::TrainingData;
use super::optim::{AdamWParams, LrSchedule};
use super::state::{TrainerKind, TrainerState, UpdateRule};
use crate::checkpoint;
use crate::diffusion::schedule::{NoiseSchedule, PredictionType};
use crate::error::{Error, Result};
use crate::model::config::UNetConfig;
use crate::model::lora::{DOWN, META_ALPHA, META_RANK, UP};
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::sampler::SeededNoise;
use crate::weights::{load_checked_with, tensor_shapes, Attachments};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The trainable U-Net: its LoRA adapters, or all its weights.
#[derive(Debug, Clone, Copy)]
enum Trainable {
    Lora { rank: usize },
    Full,
}

/// One optimiser step's figures.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The (weighted) loss, averaged over the accumulated passes.
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

/// The U-Net, its trainable variables, the optimiser and the weight average: everything a
/// training step needs apart from the data. It knows nothing of images, text or files of
/// images, so the benchmark runs it on random latents.
pub struct UnetTrainer {
    pub unet: UNet2DConditionModel,
    /// Trainable variables by name (`<module>.lora_A.weight`/`lora_B.weight`, or weight
    /// names), their optimiser, optional average and the step.
    pub(super) state: TrainerState,
    trainable: Trainable,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    pub(super) settings: FinetuneSettings,
}

/// Whether a U-Net weight gets a LoRA adapter: the transformer blocks' attention projections
/// (diffusers' and kohya's default targets), and with `feed_forward` their feed-forward layers.
pub fn is_lora_target(weight_name: &str, feed_forward: bool) -> bool {
    let attention = ["to_q", "to_k", "to_v", "to_out.0"];
    let ff = ["ff.net.0.proj", "ff.net.2"];
    let ends = |names: &[&str]| {
        names
            .iter()
            .any(|p| weight_name.ends_with(&format!(".{p}.weight")))
    };
    weight_name.contains(".transformer_blocks.")
        && (ends(&attention) || (feed_forward && ends(&ff)))
}

/// One step's random draws for `count` images, in a fixed order from the step's own seed.
struct StepDraws {
    indices: Vec<usize>,
    timesteps: Vec<usize>,
    flips: Vec<bool>,
    noise: Tensor,
}

impl UnetTrainer {
    /// The U-Net of `config` from the weights file `weights`, with LoRA adapters (A uniform,
    /// B zero, so it starts as the base model) or every weight trainable.
    pub fn new(
        config: UNetConfig,
        weights: &Path,
        settings: FinetuneSettings,
        schedule: NoiseSchedule,
        prediction: PredictionType,
        device: &Device,
    ) -> Result<Self> {
        settings.validate()?;
        let mut rng = SeededNoise::new(settings.seed);
        let (unet, named, trainable) = match settings.lora_rank {
            Some(rank) => {
                let named =
                    init_adapters(weights, rank, settings.lora_feed_forward, &mut rng, device)?;
                let attachments = Attachments {
                    deltas: Default::default(),
                    adapters: named
                        .iter()
                        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                        .collect(),
                };
                let unet = load_checked_with(weights, DType::F32, device, attachments, |vb| {
                    UNet2DConditionModel::new(config, vb)
                })?;
                (unet, named, Trainable::Lora { rank })
            }
            None => {
                let mut varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
                let unet = UNet2DConditionModel::new(config, vb)?;
                varmap.load(weights).map_err(|e| Error::File {
                    path: weights.display().to_string(),
                    message: e.to_string(),
                })?;
                (unet, super::named_vars(&varmap), Trainable::Full)
            }
        };
        let rule = UpdateRule {
            learning_rate: LrSchedule::constant(settings.learning_rate, settings.warmup_steps),
            grad_clip: settings.grad_clip,
            adamw: AdamWParams::default(),
        };
        Ok(Self {
            unet,
            state: TrainerState::new(named, rule, settings.ema_decay)?,
            trainable,
            schedule,
            prediction,
            settings,
        })
    }

    /// Completed optimiser steps.
    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn trainable_parameters(&self) -> usize {
        self.state.parameter_count()
    }

    /// The denoising loss of latents `x0` under captions `context` at the given timesteps and
    /// noise: the mean squared error against the prediction type's target, min-SNR weighted
    /// when `min_snr_gamma` is given.
    fn loss(
        &self,
        x0: &Tensor,
        context: &Tensor,
        timesteps: &[usize],
        noise: &Tensor,
        min_snr_gamma: Option<f64>,
    ) -> Result<Tensor> {
        let noised =
            super::NoisedBatch::new(&self.schedule, self.prediction, x0, timesteps, noise)?;
        let prediction = self.unet.forward(
            &noised.xt,
            &noised.t,
            &UNetConditioning::text(context.clone()),
        )?;
        super::denoising_loss(
            &prediction,
            &noised.target,
            (&self.schedule, self.prediction),
            timesteps,
            min_snr_gamma,
        )
    }

    /// The unweighted denoising loss on every training image at four fixed timesteps (spread
    /// over the schedule) with fixed noise, the same draws whenever it is called: the
    /// before/after figure of a run.
    pub fn denoising_loss(&self, data: &TrainingData) -> Result<f64> {
        let n_train = self.schedule.num_train_timesteps();
        let n = data.len();
        let mut total = 0.0;
        let quantiles = [0.1, 0.35, 0.6, 0.85];
        for (k, q) in quantiles.iter().enumerate() {
            let timesteps = vec![((q * n_train as f64) as usize).min(n_train - 1); n];
            let mut rng = SeededNoise::new(0x5eed_0000 + k as u64);
            let noise = rng
                .randn(data.latents.dims())?
                .to_device(data.latents.device())?;
            total += self
                .loss(&data.latents, &data.text, &timesteps, &noise, None)?
                .detach()
                .to_scalar::<f32>()? as f64;
        }
        Ok(total / quantiles.len() as f64)
    }

    /// The images, timesteps, flips and noise of this step's `count` images.
    fn draw(&self, data: &TrainingData, count: usize) -> Result<StepDraws> {
        let s = &self.settings;
        let n_train = self.schedule.num_train_timesteps();
        let (mut rng, indices, timesteps) =
            super::draw_examples_and_timesteps(s.seed, self.state.step, count, data.len(), n_train);
        let mut shape = data.latents.dims().to_vec();
        shape[0] = count;
        let mut noise = rng.randn(&shape)?;
        let flips = if data.latents_flipped.is_some() {
            (0..count).map(|_| rng.rng().random_bool(0.5)).collect()
        } else {
            vec![false; count]
        };
        if s.noise_offset > 0.0 {
            noise = offset_noise(
                &noise,
                &rng.randn(&[count, shape[1], 1, 1])?,
                s.noise_offset,
            )?;
        }
        Ok(StepDraws {
            indices,
            timesteps,
            flips,
            noise: noise.to_device(data.latents.device())?,
        })
    }

    /// One optimiser step: `gradient_accumulation` passes of `batch_size` images each, their
    /// gradients summed (each pass's loss divided by the number of passes, so the step equals
    /// one pass over all the images at once).
    pub fn train_step(&mut self, data: &TrainingData) -> Result<StepStats> {
        let (batch, passes) = (
            self.settings.batch_size,
            self.settings.gradient_accumulation,
        );
        let draws = self.draw(data, batch * passes)?;
        let mut total_loss = 0.0;
        let mut summed: Option<candle_core::backprop::GradStore> = None;
        for pass in 0..passes {
            let range = pass * batch..(pass + 1) * batch;
            let rows = |source: &Tensor, flipped: Option<&Tensor>| -> Result<Tensor> {
                let mut picked = Vec::with_capacity(batch);
                for i in range.clone() {
                    let from = match flipped {
                        Some(f) if draws.flips[i] => f,
                        _ => source,
                    };
                    picked.push(from.narrow(0, draws.indices[i], 1)?);
                }
                Ok(Tensor::cat(&picked, 0)?)
            };
            let x0 = rows(&data.latents, data.latents_flipped.as_ref())?;
            let context = rows(&data.text, None)?;
            let timesteps = &draws.timesteps[range.clone()];
            let noise = draws.noise.narrow(0, range.start, batch)?;
            let gamma = self.settings.min_snr_gamma;
            let loss = self
                .loss(&x0, &context, timesteps, &noise, gamma)?
                .affine(1.0 / passes as f64, 0.0)?;
            let (value, grads) = super::checked_loss_backward(&loss, self.state.step)?;
            total_loss += value;
            summed = Some(match summed {
                None => grads,
                Some(mut sum) => {
                    for var in self.state.vars() {
                        if let Some(g) = grads.get(var) {
                            let added = match sum.get(var) {
                                Some(s) => (s + g)?,
                                None => g.clone(),
                            };
                            sum.insert(var, added);
                        }
                    }
                    sum
                }
            });
        }
        let applied = self.state.apply(&summed.expect("at least one pass"))?;
        Ok(StepStats {
            loss: total_loss,
            grad_norm: applied.grad_norm,
            learning_rate: applied.learning_rate,
        })
    }

    /// The run's settings as TOML, with the number of training images: what a resumed run
    /// must share with the one that saved (the step count may grow).
    fn config_toml(&self, examples: usize) -> String {
        #[derive(serde::Serialize)]
        struct Saved<'a> {
            images: usize,
            finetune: &'a FinetuneSettings,
        }
        toml::to_string(&Saved {
            images: examples,
            finetune: &self.settings,
        })
        .expect("fine-tuning settings serialise")
    }

    /// Writes the trainable weights, their average, AdamW's moments and the step to `path`
    /// atomically.
    pub fn save_checkpoint(&self, path: &Path, examples: usize) -> Result<()> {
        super::state::save_checkpoint(
            path,
            TrainerKind::Finetune,
            self.state.step,
            &self.config_toml(examples),
            &self.state.checkpoint_tensors(),
        )
    }

    /// Continues from [`Self::save_checkpoint`]'s file. Every step draws from (seed, step), so a
    /// resumed run ends with the weights of an uninterrupted one. A checkpoint of other settings
    /// or another model is refused, naming what differs.
    pub fn resume_from(&mut self, path: &Path, examples: usize) -> Result<()> {
        let device = self.state.vars()[0].device().clone();
        let (loaded, step) = super::state::open_for_resume(
            path,
            &device,
            TrainerKind::Finetune,
            &self.config_toml(examples),
            &["images", "finetune"],
            |saved| Ok(saved.to_string()),
        )?;
        self.state.restore(&loaded, path, step)
    }

    /// A copy of the trainable weights by name (a copy: the variables change in place).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.state.weights()
    }

    /// What the output holds: the weight average when there is one, else the weights.
    pub fn output_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.state.output_weights()
    }

    /// Writes the result where `txt2img` takes it: the LoRA as one safetensors file in the
    /// diffusers/PEFT layout (`<out>/pytorch_lora_weights.safetensors`, for `--lora`), or the
    /// whole model as a diffusers folder with the U-Net replaced (`<out>`, for `--model`).
    pub fn write_output(&self, model_root: &Path, out: &Path) -> Result<PathBuf> {
        let weights = self.output_weights()?;
        match self.trainable {
            Trainable::Lora { rank } => {
                let path = out.join("pytorch_lora_weights.safetensors");
                let tensors: Vec<(String, Tensor)> = weights
                    .into_iter()
                    .map(|(name, value)| (format!("unet.{name}"), value))
                    .collect();
                // alpha = rank: the adapters were trained at scale 1.
                let metadata = BTreeMap::from([
                    (META_ALPHA.to_string(), rank.to_string()),
                    (META_RANK.to_string(), rank.to_string()),
                    ("format".to_string(), "pt".to_string()),
                ]);
                checkpoint::save(&path, &tensors, &metadata)?;
                Ok(path)
            }
            Trainable::Full => {
                copy_model_folder(model_root, out)?;
                checkpoint::save(
                    &out.join("unet").join("diffusion_pytorch_model.safetensors"),
                    &weights,
                    &BTreeMap::from([("format".to_string(), "pt".to_string())]),
                )?;
                Ok(out.to_path_buf())
            }
        }
    }
}

/// Noise plus `scale` times a per-image, per-channel constant: `noise + scale * offsets`, the
/// (B, C, 1, 1) `offsets` broadcast over each channel's pixels.
pub fn offset_noise(noise: &Tensor, offsets: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(noise.broadcast_add(&offsets.affine(scale, 0.0)?)?)
}

/// A (r, in) A initialised uniform in +-1/sqrt(in) (PEFT's Kaiming-uniform default) and a zero
/// (out, r) B for every LoRA target of the U-Net weights file, so training starts at the base
/// model exactly.
fn init_adapters(
    weights: &Path,
    rank: usize,
    feed_forward: bool,
    rng: &mut SeededNoise,
    device: &Device,
) -> Result<Vec<(String, Var)>> {
    let mut targets: Vec<(String, Vec<usize>)> = tensor_shapes(weights)?
        .into_iter()
        .filter(|(name, shape)| is_lora_target(name, feed_forward) && shape.len() == 2)
        .collect();
    targets.sort();
    if targets.is_empty() {
        return Err(Error::File {
            path: weights.display().to_string(),
            message: "has no attention projections to put LoRA adapters on".into(),
        });
    }
    let mut named = Vec::with_capacity(2 * targets.len());
    for (name, shape) in targets {
        let module = name.trim_end_matches(".weight");
        let (out_dim, in_dim) = (shape[0], shape[1]);
        let bound = 1.0 / (in_dim as f64).sqrt();
        let values: Vec<f32> = (0..rank * in_dim)
            .map(|_| ((rng.rng().random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let down = Var::from_tensor(&Tensor::from_vec(values, (rank, in_dim), device)?)?;
        let up = Var::zeros((out_dim, rank), DType::F32, device)?;
        named.push((format!("{module}.{DOWN}"), down));
        named.push((format!("{module}.{UP}"), up));
    }
    Ok(named)
}

/// Copies a diffusers folder's files except the U-Net weights, which the caller writes.
fn copy_model_folder(from: &Path, to: &Path) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        if source.is_dir() {
            copy_model_folder(&source, &target)?;
        } else {
            let is_unet_weights = source.parent().and_then(|p| p.file_name())
                == Some(std::ffi::OsStr::new("unet"))
                && source.extension().is_some_and(|e| e != "json");
            if !is_unet_weights {
                std::fs::copy(&source, &target).map_err(|e| io(&source, e))?;
            }
        }
    }
    Ok(())
}
