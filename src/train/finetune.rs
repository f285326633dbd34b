//! Fine-tuning a Stable Diffusion U-Net on a folder of captioned images, fully or through LoRA
//! adapters on the attention projections (Hu et al. 2021). The VAE and text encoder stay frozen,
//! so every image's latent and caption states are computed once; a step is then one U-Net
//! forward and backward on the denoising loss of the model's own prediction type (DDPM eq. 14,
//! or v for v-prediction models).

use super::checkpoint;
use super::optim::{clip_factor, warmup_lr, AdamW, AdamWParams};
use crate::data::folder::{load_square, ImageFolder, Skipped};
use crate::error::{Error, Result};
use crate::model::config::{read_json, UNetConfig};
use crate::model::lora::{DOWN, META_ALPHA, META_RANK, UP};
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::StableDiffusion;
use crate::sampler::SeededNoise;
use crate::schedule::{q_sample, training_target, NoiseSchedule, PredictionType};
use crate::weights::{load_checked_with, tensor_shapes, Attachments};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How to fine-tune.
#[derive(Debug, Clone)]
pub struct FinetuneSettings {
    /// Square training size in pixels.
    pub resolution: u32,
    /// LoRA rank; `None` trains every U-Net weight.
    pub lora_rank: Option<usize>,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub grad_clip: f64,
    pub seed: u64,
}

/// The trainable U-Net: its LoRA adapters, or all its weights.
enum Trainable {
    Lora { rank: usize },
    Full,
}

pub struct FineTuner {
    unet: UNet2DConditionModel,
    /// Trainable variables by name: `<module>.lora_A.weight`/`lora_B.weight`, or weight names.
    named: Vec<(String, Var)>,
    vars: Vec<Var>,
    trainable: Trainable,
    optimizer: AdamW,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    /// (N, C, h, w) scaled latents and (N, 77, D) caption states of the training images.
    latents: Tensor,
    text: Tensor,
    settings: FinetuneSettings,
    pub step: usize,
}

/// Whether a U-Net weight gets a LoRA adapter: the transformer blocks' attention projections,
/// as diffusers' and kohya's default targets.
pub fn is_lora_target(weight_name: &str) -> bool {
    weight_name.contains(".transformer_blocks.")
        && ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .any(|p| weight_name.ends_with(&format!(".{p}.weight")))
}

impl FineTuner {
    /// Encodes every image of `folder` (skipping, and returning, those that fail to decode) and
    /// builds the trainable U-Net from `unet_dir` of the model `sd` was loaded from.
    pub fn new(
        sd: &StableDiffusion,
        unet_dir: &Path,
        folder: &ImageFolder,
        settings: FinetuneSettings,
    ) -> Result<(Self, Vec<Skipped>)> {
        if settings.batch_size == 0 {
            return Err(Error::bad_value("--batch-size", 0, "at least 1"));
        }
        let device = sd.options.device.clone();
        let factor = sd.vae_scale_factor() as u32;
        if settings.resolution == 0 || !settings.resolution.is_multiple_of(factor) {
            return Err(Error::bad_value(
                "--resolution",
                settings.resolution,
                &format!("a positive multiple of {factor} (the VAE's downsampling)"),
            ));
        }
        let mut skipped = Vec::new();
        let (mut latents, mut text) = (Vec::new(), Vec::new());
        for example in &folder.examples {
            let image = match load_square(&example.path, settings.resolution, &device) {
                Ok(image) => image,
                Err(e) => {
                    skipped.push(Skipped {
                        path: example.path.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            latents.push(sd.encode_image(&image.unsqueeze(0)?, None)?);
            text.push(sd.encode_prompt(&example.caption)?.0);
        }
        if latents.is_empty() {
            return Err(Error::File {
                path: folder.root.display().to_string(),
                message: "no image could be decoded".into(),
            });
        }
        let latents = Tensor::cat(&latents, 0)?.to_dtype(DType::F32)?.detach();
        let text = Tensor::cat(&text, 0)?.to_dtype(DType::F32)?.detach();

        let config: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        let weights = crate::pipeline::weights_file(unet_dir, "diffusion_pytorch_model")?;
        let mut rng = SeededNoise::new(settings.seed);
        let (unet, named, trainable) = match settings.lora_rank {
            Some(0) => return Err(Error::bad_value("--lora-rank", 0, "at least 1")),
            Some(rank) => {
                let named = init_adapters(&weights, rank, &mut rng, &device)?;
                let attachments = Attachments {
                    deltas: Default::default(),
                    adapters: named
                        .iter()
                        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                        .collect(),
                };
                let unet = load_checked_with(&weights, DType::F32, &device, attachments, |vb| {
                    UNet2DConditionModel::new(config, vb)
                })?;
                (unet, named, Trainable::Lora { rank })
            }
            None => {
                let mut varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
                let unet = UNet2DConditionModel::new(config, vb)?;
                varmap.load(&weights).map_err(|e| Error::File {
                    path: weights.display().to_string(),
                    message: e.to_string(),
                })?;
                (unet, super::named_vars(&varmap), Trainable::Full)
            }
        };
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = AdamW::new(&vars, AdamWParams::default())?;
        let schedule = sd.scheduler.noise_schedule()?;
        let prediction = sd.scheduler.prediction_type;
        Ok((
            Self {
                unet,
                named,
                vars,
                trainable,
                optimizer,
                schedule,
                prediction,
                latents,
                text,
                settings,
                step: 0,
            },
            skipped,
        ))
    }

    pub fn examples(&self) -> usize {
        self.latents.dim(0).unwrap_or(0)
    }

    pub fn trainable_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The denoising loss of images `indices` at the given timesteps and noise.
    fn loss(&self, indices: &[usize], timesteps: &[usize], noise: &Tensor) -> Result<Tensor> {
        let ids = Tensor::from_vec(
            indices.iter().map(|i| *i as u32).collect::<Vec<_>>(),
            indices.len(),
            self.latents.device(),
        )?;
        let x0 = self.latents.index_select(&ids, 0)?;
        let context = self.text.index_select(&ids, 0)?;
        let xt = q_sample(&self.schedule, &x0, timesteps, noise)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            timesteps.len(),
            x0.device(),
        )?;
        let prediction = self.unet.forward(&xt, &t, Some(&context), None)?;
        let target = training_target(&self.schedule, self.prediction, &x0, noise, timesteps)?;
        Ok((prediction - target)?.sqr()?.mean_all()?)
    }

    /// The denoising loss on every training image at four fixed timesteps (spread over the
    /// schedule) with fixed noise, the same draws whenever it is called: the before/after
    /// figure of a run.
    pub fn denoising_loss(&self) -> Result<f64> {
        let n_train = self.schedule.num_train_timesteps();
        let n = self.examples();
        let mut total = 0.0;
        let quantiles = [0.1, 0.35, 0.6, 0.85];
        for (k, q) in quantiles.iter().enumerate() {
            let indices: Vec<usize> = (0..n).collect();
            let timesteps = vec![((q * n_train as f64) as usize).min(n_train - 1); n];
            let mut rng = SeededNoise::new(0x5eed_0000 + k as u64);
            let noise = rng
                .randn(self.latents.dims())?
                .to_device(self.latents.device())?;
            total += self
                .loss(&indices, &timesteps, &noise)?
                .detach()
                .to_scalar::<f32>()? as f64;
        }
        Ok(total / quantiles.len() as f64)
    }

    /// One optimiser step on a random batch; returns the batch loss.
    pub fn train_step(&mut self) -> Result<f64> {
        let s = &self.settings;
        let n_train = self.schedule.num_train_timesteps();
        let mut rng = SeededNoise::new(
            s.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(self.step as u64 + 1)),
        );
        let indices: Vec<usize> = (0..s.batch_size)
            .map(|_| rng.rng().random_range(0..self.examples()))
            .collect();
        let timesteps: Vec<usize> = (0..s.batch_size)
            .map(|_| rng.rng().random_range(0..n_train))
            .collect();
        let mut shape = self.latents.dims().to_vec();
        shape[0] = s.batch_size;
        let noise = rng.randn(&shape)?.to_device(self.latents.device())?;
        let loss = self.loss(&indices, &timesteps, &noise)?;
        let (value, grads, norm) = super::checked_backward(&loss, &self.vars, self.step)?;
        let lr = warmup_lr(s.learning_rate, self.step, s.warmup_steps);
        self.optimizer
            .step(&self.vars, &grads, lr, clip_factor(norm, s.grad_clip))?;
        self.step += 1;
        Ok(value)
    }

    /// The settings a resumed run must share with the run that saved (the step count may grow).
    fn identity(&self) -> String {
        let s = &self.settings;
        format!(
            "mode={} resolution={} lr={} warmup={} batch={} clip={} seed={} images={}",
            match self.trainable {
                Trainable::Lora { rank } => format!("lora-{rank}"),
                Trainable::Full => "full".into(),
            },
            s.resolution,
            s.learning_rate,
            s.warmup_steps,
            s.batch_size,
            s.grad_clip,
            s.seed,
            self.examples()
        )
    }

    /// Writes the trainable weights, AdamW's moments and the step to `path` atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .named
            .iter()
            .map(|(name, var)| (format!("param.{name}"), var.as_tensor().detach()))
            .collect();
        tensors.extend(
            self.optimizer
                .moment_tensors(self.named.iter().map(|(n, _)| n.as_str())),
        );
        let metadata = BTreeMap::from([
            ("format".to_string(), "diffuse-finetune".to_string()),
            ("settings".to_string(), self.identity()),
            ("step".to_string(), self.step.to_string()),
        ]);
        checkpoint::save(path, &tensors, &metadata)
    }

    /// Continues from [`Self::save_checkpoint`]'s file. Every step draws from (seed, step), so a
    /// resumed run ends with the weights of an uninterrupted one. A checkpoint of other settings
    /// or another model is refused, naming what differs.
    pub fn resume_from(&mut self, path: &Path) -> Result<()> {
        let loaded = checkpoint::load(path, self.latents.device())?;
        let saved = loaded.meta(path, "settings")?;
        if saved != self.identity() {
            return Err(Error::File {
                path: path.display().to_string(),
                message: format!(
                    "was saved with other settings ({saved}) than this run ({}); resume with the same ones",
                    self.identity()
                ),
            });
        }
        self.step = loaded
            .meta(path, "step")?
            .parse()
            .map_err(|e| Error::File {
                path: path.display().to_string(),
                message: format!("step is not a step count: {e}"),
            })?;
        for (i, (name, var)) in self.named.iter().enumerate() {
            var.set(&loaded.tensor_like(path, &format!("param.{name}"), var.dims())?)?;
            self.optimizer.first_moments[i] =
                loaded.tensor_like(path, &format!("optim.m.{name}"), var.dims())?;
            self.optimizer.second_moments[i] =
                loaded.tensor_like(path, &format!("optim.v.{name}"), var.dims())?;
        }
        self.optimizer.updates = self.step;
        Ok(())
    }

    /// The trainable weights by name (for tests and comparisons).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.named
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect()
    }

    /// Writes the result where `txt2img` takes it: the LoRA as one safetensors file in the
    /// diffusers/PEFT layout (`<out>/pytorch_lora_weights.safetensors`, for `--lora`), or the
    /// whole model as a diffusers folder with the U-Net replaced (`<out>`, for `--model`).
    pub fn write_output(&self, model_root: &Path, out: &Path) -> Result<PathBuf> {
        match self.trainable {
            Trainable::Lora { rank } => {
                let path = out.join("pytorch_lora_weights.safetensors");
                let tensors: Vec<(String, Tensor)> = self
                    .named
                    .iter()
                    .map(|(name, var)| (format!("unet.{name}"), var.as_tensor().detach()))
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
                let tensors: Vec<(String, Tensor)> = self
                    .named
                    .iter()
                    .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
                    .collect();
                checkpoint::save(
                    &out.join("unet").join("diffusion_pytorch_model.safetensors"),
                    &tensors,
                    &BTreeMap::from([("format".to_string(), "pt".to_string())]),
                )?;
                Ok(out.to_path_buf())
            }
        }
    }
}

/// A (r, in) A initialised uniform in +-1/sqrt(in) (PEFT's Kaiming-uniform default) and a zero
/// (out, r) B for every LoRA target of the U-Net weights file, so training starts at the base
/// model exactly.
fn init_adapters(
    weights: &Path,
    rank: usize,
    rng: &mut SeededNoise,
    device: &candle_core::Device,
) -> Result<Vec<(String, Var)>> {
    let mut targets: Vec<(String, Vec<usize>)> = tensor_shapes(weights)?
        .into_iter()
        .filter(|(name, shape)| is_lora_target(name) && shape.len() == 2)
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
