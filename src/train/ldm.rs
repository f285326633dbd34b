//! Training a small text-to-image latent diffusion model from scratch (Rombach et al. 2022,
//! section 3.3): a frozen KL autoencoder's latents, a CLIP-architecture text encoder trained
//! jointly with a cross-attention U-Net (as the paper's text-to-image model trained its
//! transformer), and the caption dropped for a fraction of the examples so that one network
//! learns both the conditional and the unconditional prediction (classifier-free guidance,
//! Ho & Salimans 2022, section 3.2).
//!
//! The data are labelled IDX datasets (MNIST, Fashion-MNIST): each image is captioned from its
//! class with one of several phrasings (`data::captions`). The classes of later folders follow
//! those of earlier ones (MNIST 0-9, Fashion-MNIST 10-19).
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k), so a resumed run takes the
//! steps an uninterrupted one would have taken.

use super::config::LdmTrainConfig;
use super::latent_data::LatentData;
use super::optim::AdamWParams;
use super::state::{TrainerKind, TrainerState, UpdateRule};
use super::{named_vars, seeded_init, NoisedBatch};
use crate::checkpoint;
use crate::diffusion::schedule::NoiseSchedule;
use crate::error::{Error, Result};
use crate::model::config::{ClipTextConfig, UNetConfig};
use crate::model::text::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::sampler::noise::SeededNoise;
use crate::sampler::SchedulerConfig;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Prefixes of the two trained components inside the checkpoint.
const TEXT_PREFIX: &str = "text_encoder.";
const UNET_PREFIX: &str = "unet.";
/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct LdmStepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

pub struct LdmTrainer {
    pub config: LdmTrainConfig,
    pub schedule: NoiseSchedule,
    text_config: ClipTextConfig,
    unet_config: serde_json::Value,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    _varmap: VarMap,
    state: TrainerState,
    device: Device,
}

/// Residual branches' last convs, the transformers' output projections and the U-Net's output
/// conv start at zero, so that the untrained U-Net is the identity plus a zero prediction.
fn zero_init(name: &str) -> bool {
    name.starts_with(UNET_PREFIX)
        && (name.ends_with("conv2.weight")
            || name.ends_with("proj_out.weight")
            || name.starts_with("unet.conv_out."))
}

/// Sets every variable from a pipeline folder's `text_encoder/model.safetensors` and
/// `unet/diffusion_pytorch_model.safetensors` (any float dtype); a missing tensor or another
/// shape is an error naming the file and tensor.
fn start_from_pipeline(named: &[(String, Var)], dir: &Path, device: &Device) -> Result<()> {
    let parts = [
        (TEXT_PREFIX, dir.join("text_encoder/model.safetensors")),
        (
            UNET_PREFIX,
            dir.join("unet/diffusion_pytorch_model.safetensors"),
        ),
    ];
    for (prefix, path) in parts {
        let loaded = checkpoint::load(&path, device)?;
        for (name, var) in named.iter().filter(|(n, _)| n.starts_with(prefix)) {
            let key = &name[prefix.len()..];
            let tensor = loaded.tensor_like(&path, key, var.dims())?;
            var.set(&tensor.to_dtype(DType::F32)?)?;
        }
    }
    Ok(())
}

impl LdmTrainer {
    /// A fresh text encoder and U-Net for latents of `latent_dims` (C, h, w), initialised from
    /// `config.train.seed`.
    pub fn new(
        config: LdmTrainConfig,
        latent_dims: (usize, usize, usize),
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let (channels, size, _) = latent_dims;
        let unet_json = config.unet_config_json(channels, size);
        let unet_config: UNetConfig = serde_json::from_value(unet_json.clone())
            .map_err(|e| Error::Msg(format!("model section: {e}")))?;
        let text_config: ClipTextConfig = serde_json::from_value(config.text_config_json())
            .map_err(|e| Error::Msg(format!("model section: {e}")))?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let text_encoder = ClipTextModel::new(
            text_config.clone(),
            vb.pp(TEXT_PREFIX.trim_end_matches('.')),
        )?;
        let unet =
            UNet2DConditionModel::new(unet_config, vb.pp(UNET_PREFIX.trim_end_matches('.')))?;
        let named = named_vars(&varmap);
        seeded_init(&named, &mut SeededNoise::new(config.train.seed), &zero_init)?;
        if let Some(dir) = &config.model.init {
            start_from_pipeline(&named, dir, device)?;
        }
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
        let schedule = SchedulerConfig::from_json_str(&config.scheduler_json().to_string())?
            .noise_schedule()?;
        Ok(Self {
            schedule,
            text_config,
            unet_config: unet_json,
            text_encoder,
            unet,
            _varmap: varmap,
            state,
            device: device.clone(),
            config,
        })
    }

    /// Continues from [`Self::save`]'s file; a checkpoint of another model is refused.
    pub fn resume(
        config: LdmTrainConfig,
        latent_dims: (usize, usize, usize),
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let mut trainer = Self::new(config, latent_dims, device)?;
        let (loaded, step) = super::state::open_for_resume(
            path,
            device,
            TrainerKind::Latent,
            &trainer.config.to_toml(),
            &["data", "model", "diffusion"],
            |saved| Ok(LdmTrainConfig::from_toml_str(saved)?.to_toml()),
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

    /// One optimiser step: L_simple (DDPM eq. 14) on a batch of cached latents, each captioned
    /// with a random phrasing of its class, or with the empty caption at the dropout rate.
    pub fn train_step(&mut self, data: &LatentData) -> Result<LdmStepStats> {
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
        let mut ids: Vec<u32> = Vec::with_capacity(batch * data.empty_ids.len());
        for &i in &indices {
            let dropped = rng.rng().random_bool(cfg.data.caption_dropout);
            let phrasing: u64 = rng.rng().random();
            if dropped {
                ids.extend(&data.empty_ids);
            } else {
                let own = &data.caption_ids[data.classes[data.pool[i]]];
                ids.extend(&own[(phrasing % own.len() as u64) as usize]);
            }
        }
        let device = self.device.clone();
        let index = Tensor::from_vec(
            indices
                .iter()
                .map(|&i| data.pool[i] as u32)
                .collect::<Vec<_>>(),
            batch,
            &Device::Cpu,
        )?;
        let x0 = data.latents.index_select(&index, 0)?.to_device(&device)?;
        let eps = rng.randn(x0.dims())?.to_device(&device)?;
        let noised = NoisedBatch::new(
            &self.schedule,
            cfg.diffusion.prediction_type,
            &x0,
            &timesteps,
            &eps,
        )?;
        let ids = Tensor::from_vec(ids, (batch, data.empty_ids.len()), &device)?;
        let context = self.text_encoder.forward(&ids)?;
        let prediction =
            self.unet
                .forward(&noised.xt, &noised.t, &UNetConditioning::text(context))?;
        let loss = super::denoising_loss(
            &prediction,
            &noised.target,
            (&self.schedule, cfg.diffusion.prediction_type),
            &timesteps,
            cfg.train.min_snr_gamma,
        )?;
        let (value, grads) = super::checked_loss_backward(&loss, self.state.step)?;
        let applied = self.state.apply(&grads)?;
        Ok(LdmStepStats {
            loss: value,
            grad_norm: applied.grad_norm,
            learning_rate: applied.learning_rate,
        })
    }

    /// Weights, their average, AdamW's moments and the step, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        super::state::save_checkpoint(
            path,
            TrainerKind::Latent,
            self.state.step,
            &self.config.to_toml(),
            &self.state.checkpoint_tensors(),
        )
    }

    /// The averaged weights of one component (its prefix stripped), in `dtype`.
    fn component(&self, prefix: &str, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        self.state
            .output_weights()?
            .into_iter()
            .filter_map(|(name, average)| {
                name.strip_prefix(prefix)
                    .map(|short| Ok((short.to_string(), average.to_dtype(dtype)?)))
            })
            .collect()
    }

    /// The whole pipeline as a diffusers folder from the averaged weights in `dtype`:
    /// `model_index.json`, `scheduler/`, `tokenizer/` (copied from the config's), `vae/` (the
    /// config's, its weights in `dtype`), `text_encoder/`, `unet/`. Each file is written
    /// atomically.
    pub fn write_pipeline(&self, dir: &Path, dtype: DType) -> Result<()> {
        let io = |path: &Path, e: std::io::Error| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let json = |value: &serde_json::Value| {
            serde_json::to_string_pretty(value).expect("JSON values serialise")
        };
        for sub in ["scheduler", "tokenizer", "text_encoder", "unet", "vae"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| io(&dir.join(sub), e))?;
        }
        let index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        });
        checkpoint::write_atomically(&dir.join("model_index.json"), json(&index).as_bytes())?;
        checkpoint::write_atomically(
            &dir.join("scheduler/scheduler_config.json"),
            json(&self.config.scheduler_json()).as_bytes(),
        )?;
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let from = self.config.model.tokenizer.join(name);
            if from.exists() {
                let bytes = std::fs::read(&from).map_err(|e| io(&from, e))?;
                checkpoint::write_atomically(&dir.join("tokenizer").join(name), &bytes)?;
            }
        }
        let vae_config = self.config.model.vae.join("config.json");
        let bytes = std::fs::read(&vae_config).map_err(|e| io(&vae_config, e))?;
        checkpoint::write_atomically(&dir.join("vae/config.json"), &bytes)?;
        let pt = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        checkpoint::save(
            &dir.join("vae/diffusion_pytorch_model.safetensors"),
            &vae_weights_in(&self.config.model.vae, dtype)?,
            &pt,
        )?;
        let mut text_json = self.config.text_config_json();
        text_json["torch_dtype"] = dtype_name(dtype).into();
        checkpoint::write_atomically(
            &dir.join("text_encoder/config.json"),
            json(&text_json).as_bytes(),
        )?;
        checkpoint::save(
            &dir.join("text_encoder/model.safetensors"),
            &self.component(TEXT_PREFIX, dtype)?,
            &pt,
        )?;
        checkpoint::write_atomically(
            &dir.join("unet/config.json"),
            json(&self.unet_config).as_bytes(),
        )?;
        checkpoint::save(
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
            &self.component(UNET_PREFIX, dtype)?,
            &pt,
        )
    }

    /// The text encoder's config (for tests and reports).
    pub fn text_config(&self) -> &ClipTextConfig {
        &self.text_config
    }

    /// The current raw weights by name (copies).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self.state.weights()?.into_iter().collect())
    }
}

/// The autoencoder's weights from its folder `vae_dir`, floating-point tensors in `dtype`, so
/// that an f16 export stores the whole pipeline at half the bytes.
fn vae_weights_in(vae_dir: &Path, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let path = vae_dir.join("diffusion_pytorch_model.safetensors");
    checkpoint::load(&path, &Device::Cpu)?
        .tensors
        .into_iter()
        .map(|(name, tensor)| {
            let tensor = if tensor.dtype().is_float() {
                tensor.to_dtype(dtype)?
            } else {
                tensor
            };
            Ok((name, tensor))
        })
        .collect()
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// The pipeline folder inside the output folder.
pub const PIPELINE_DIR: &str = "pipeline";
/// Guidance and steps of the sample grids.
const GRID_GUIDANCE: f64 = 4.0;
const GRID_STEPS: usize = 20;

/// A latent text-to-image run in a training session: the trainer, its cached latents, and the
/// dtype of the pipeline folder it writes.
pub struct LdmRun {
    pub trainer: LdmTrainer,
    pub data: LatentData,
    pub pipeline_dtype: DType,
}

impl LdmRun {
    /// `out_dir/pipeline/` from the averaged weights, with the caption sets it was trained on
    /// (`concepts.json`, which `txt2img` checks prompts against).
    pub fn write_pipeline(&self, out_dir: &Path) -> Result<()> {
        let dir = out_dir.join(PIPELINE_DIR);
        self.trainer.write_pipeline(&dir, self.pipeline_dtype)?;
        crate::pipeline::concepts::Concepts {
            concepts: self.data.captions.clone(),
        }
        .write(&dir)
    }
}

impl super::session::Trainer for LdmRun {
    fn step(&self) -> usize {
        self.trainer.step()
    }

    fn columns(&self) -> &'static [&'static str] {
        &["loss", "grad_norm", "learning_rate"]
    }

    fn train_step(&mut self) -> Result<Vec<f64>> {
        let stats = self.trainer.train_step(&self.data)?;
        Ok(vec![stats.loss, stats.grad_norm, stats.learning_rate])
    }

    fn save(&mut self, out_dir: &Path) -> Result<()> {
        self.trainer
            .save(&out_dir.join(super::session::CHECKPOINT_FILE))?;
        self.write_pipeline(out_dir)
    }

    /// Four samples of every class's own caption, one class a column, from the pipeline folder
    /// just written (DDIM, fixed seed), as `samples-<step>.png`.
    fn sample(&mut self, out_dir: &Path, step: usize) -> Result<()> {
        use crate::pipeline::txt2img::{sample_prompts, PromptGuidance};
        use crate::pipeline::{LoadOptions, StableDiffusion};
        use crate::sampler::{build_sampler, SamplerKind, SamplerOptions};
        let captions: Vec<String> = self.data.captions.iter().map(|c| c[0].clone()).collect();
        let per_class = 4;
        let sd = StableDiffusion::load_dir(&out_dir.join(PIPELINE_DIR), LoadOptions::default())?;
        let sampler = build_sampler(
            SamplerKind::Ddim,
            &sd.scheduler,
            &SamplerOptions::default(),
            GRID_STEPS,
        )?;
        let images = sample_prompts(
            &sd,
            sampler.as_ref(),
            &captions,
            per_class,
            PromptGuidance {
                scale: GRID_GUIDANCE,
                interval: None,
            },
            0,
            &mut |_, _| {},
        )?;
        crate::image_io::save_png(
            &crate::pipeline::pixel::class_columns_grid(
                &images.affine(2.0, -1.0)?,
                captions.len(),
            )?,
            &out_dir.join(format!("samples-{step:07}.png")),
            None,
        )
    }
}
