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

use super::config::{DiffusionConfig, OptimConfig, ScheduleKind};
use super::optim::AdamWParams;
use super::state::{TrainerKind, TrainerState, UpdateRule};
use super::vae::pad_to;
use super::{named_vars, seeded_init};
use crate::checkpoint;
use crate::data::captions::{ClassCaptions, EXTRA_TEMPLATES};
use crate::data::idx::{LabelledImages, Split};
use crate::error::{Error, Result};
use crate::model::config::{read_json, ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::text::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::model::vae::AutoencoderKL;
use crate::pipeline::weights_file;
use crate::sampler::noise::SeededNoise;
use crate::sampler::SchedulerConfig;
use crate::schedule::{q_sample, NoiseSchedule, PredictionType};
use crate::tokenizer::ClipTokenizer;
use crate::weights::load_checked;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Prefixes of the two trained components inside the checkpoint.
const TEXT_PREFIX: &str = "text_encoder.";
const UNET_PREFIX: &str = "unet.";

/// `diffuse train`'s TOML config for a text-to-image latent model (`model.autoencoder = "vae"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmTrainConfig {
    pub data: LdmDataConfig,
    pub model: LdmModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    pub train: OptimConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmDataConfig {
    /// MNIST-layout IDX folders, each with a `classes.json`; their classes are numbered on.
    pub paths: Vec<PathBuf>,
    /// Images are padded with black to this square size before encoding.
    pub image_size: usize,
    /// The fraction of examples trained with the empty caption (classifier-free guidance).
    #[serde(default = "caption_dropout")]
    pub caption_dropout: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LatentAutoencoder {
    /// A trained `AutoencoderKL` folder (diffusers layout), frozen.
    Vae,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TextConditioning {
    /// Captions through a CLIP-architecture text encoder into the U-Net's cross-attention.
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmModelConfig {
    pub autoencoder: LatentAutoencoder,
    pub conditioning: TextConditioning,
    /// The frozen autoencoder: a diffusers `vae/` folder (from `diffuse train-vae`).
    pub vae: PathBuf,
    /// A CLIP tokenizer folder (`tokenizer.json`, ...).
    pub tokenizer: PathBuf,
    pub text_hidden_size: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// The text encoder's MLP width (4x the hidden size when left out, as CLIP).
    #[serde(default)]
    pub text_intermediate_size: Option<usize>,
    /// The U-Net's channels per level; every level has cross-attention.
    pub block_out_channels: Vec<usize>,
    #[serde(default = "layers_per_block_default")]
    pub layers_per_block: usize,
    /// Attention heads per transformer (diffusers' SD 1.x `attention_head_dim`).
    #[serde(default = "attention_heads_default")]
    pub attention_heads: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
}

fn caption_dropout() -> f64 {
    0.1
}
fn groups() -> usize {
    32
}

impl LdmTrainConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = super::config::parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Takes the config's relative paths (data, autoencoder, tokenizer, output) from `base`,
    /// the config file's folder.
    pub fn rebase(&mut self, base: &Path) {
        use super::config::relative_to;
        for data in &mut self.data.paths {
            relative_to(base, data);
        }
        relative_to(base, &mut self.model.vae);
        relative_to(base, &mut self.model.tokenizer);
        relative_to(base, &mut self.train.out_dir);
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an LdmTrainConfig always serialises")
    }

    /// Settings that parse but cannot be honoured together.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if self.data.paths.is_empty() {
            return Err(Error::bad_value("data.paths", "[]", "at least one folder"));
        }
        if !(0.0..1.0).contains(&self.data.caption_dropout) {
            return Err(Error::bad_value(
                "data.caption_dropout",
                self.data.caption_dropout,
                "a fraction in [0, 1)",
            ));
        }
        if m.text_heads == 0 || !m.text_hidden_size.is_multiple_of(m.text_heads) {
            return Err(Error::Contradiction(format!(
                "model.text_hidden_size = {} is not a multiple of model.text_heads = {}",
                m.text_hidden_size, m.text_heads
            )));
        }
        if let Some(c) = m
            .block_out_channels
            .iter()
            .find(|c| *c % m.norm_num_groups != 0 || *c % m.attention_heads != 0)
        {
            return Err(Error::Contradiction(format!(
                "model.block_out_channels entry {c} is not a multiple of model.norm_num_groups = {} \
                 and model.attention_heads = {}",
                m.norm_num_groups, m.attention_heads
            )));
        }
        if self.diffusion.loss != super::config::Loss::Simple {
            return Err(Error::Contradiction(
                "a text-to-image latent model trains with diffusion.loss = \"simple\" only".into(),
            ));
        }
        PredictionType::parse(&self.diffusion.prediction_type)?;
        let t = &self.train;
        if t.batch_size == 0 || t.steps == 0 || t.checkpoint_every == 0 {
            return Err(Error::bad_value(
                "train.batch_size / train.steps / train.checkpoint_every",
                0,
                "positive integers",
            ));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return Err(Error::bad_value("train.ema_decay", t.ema_decay, "[0, 1)"));
        }
        serde_json::from_value::<UNetConfig>(self.unet_config_json(4, 8))
            .map_err(|e| Error::Msg(format!("model section: {e}")))?
            .validate()?;
        Ok(())
    }

    /// transformers' `CLIPTextModel` config of the text encoder (the real CLIP vocabulary).
    pub fn text_config_json(&self) -> serde_json::Value {
        let m = &self.model;
        serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": 49408,
            "hidden_size": m.text_hidden_size,
            "intermediate_size": m.text_intermediate_size.unwrap_or(4 * m.text_hidden_size),
            "num_hidden_layers": m.text_layers,
            "num_attention_heads": m.text_heads,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": m.text_hidden_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            "torch_dtype": "float32",
        })
    }

    /// diffusers' `UNet2DConditionModel` config for latents of `channels`, `latent_size` square: cross-attention
    /// at every level, SD 1.x's block layout.
    pub fn unet_config_json(&self, channels: usize, latent_size: usize) -> serde_json::Value {
        let m = &self.model;
        let n = m.block_out_channels.len();
        let mut down = vec!["CrossAttnDownBlock2D"; n];
        let mut up = vec!["CrossAttnUpBlock2D"; n];
        if n > 1 {
            // The deepest level of SD 1.x has no attention; at a 2x2 latent it would be moot.
            down[n - 1] = "DownBlock2D";
            up[0] = "UpBlock2D";
        }
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": latent_size,
            "in_channels": channels,
            "out_channels": channels,
            "block_out_channels": m.block_out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": m.layers_per_block,
            "attention_head_dim": m.attention_heads,
            "cross_attention_dim": m.text_hidden_size,
            "norm_num_groups": m.norm_num_groups,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "act_fn": "silu",
            "downsample_padding": 1,
            "center_input_sample": false,
            "use_linear_projection": false,
        })
    }

    /// The diffusion section as the pipeline's scheduler config (DDIM by default at sampling,
    /// with SD's offset of one).
    pub fn scheduler_json(&self) -> serde_json::Value {
        let d = &self.diffusion;
        let beta_schedule = match d.schedule {
            ScheduleKind::Linear => "linear",
            ScheduleKind::ScaledLinear => "scaled_linear",
            ScheduleKind::Cosine => "squaredcos_cap_v2",
        };
        serde_json::json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": d.num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": d.beta_start,
            "beta_end": d.beta_end,
            "prediction_type": d.prediction_type,
            "clip_sample": false,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        })
    }
}

/// The frozen parts and the cached training set: scaled latents of every image, each image's
/// class, and the token ids of every caption of every class.
pub struct LatentData {
    /// (N, C, h, w) posterior means times the VAE's scaling factor.
    pub latents: Tensor,
    pub classes: Vec<usize>,
    /// `caption_ids[class][k]`: the `max_length` ids of the k-th caption of `class`.
    pub caption_ids: Vec<Vec<Vec<u32>>>,
    /// The captions themselves, for the pipeline's evaluation prompts.
    pub captions: Vec<Vec<String>>,
    /// The ids of the empty caption (the unconditional input).
    pub empty_ids: Vec<u32>,
}

impl LatentData {
    /// Reads every folder's training split and `classes.json`, and encodes the images with the
    /// autoencoder in `config.model.vae` (posterior means, scaled), `batch` at a time.
    ///
    /// With `cache`, the latents are read from that file when it was written for the same
    /// autoencoder (weights and config), folders, image size and split, and written there
    /// otherwise: encoding every image takes minutes on a CPU.
    pub fn load(
        config: &LdmTrainConfig,
        split: Split,
        cache: Option<&Path>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let vae_dir = &config.model.vae;
        let vae_config: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        let vae_weights = weights_file(vae_dir, "diffusion_pytorch_model")?;
        let vae = load_checked(&vae_weights, DType::F32, &Device::Cpu, |vb| {
            AutoencoderKL::new(vae_config.clone(), vb)
        })?;
        let cache_key = latent_cache_key(config, split, &vae_weights)?;
        let cached = cache
            .filter(|path| path.exists())
            .and_then(|path| checkpoint::load(path, &Device::Cpu).ok())
            .filter(|loaded| loaded.metadata.get(CACHE_KEY) == Some(&cache_key))
            .and_then(|mut loaded| loaded.tensors.remove("latents"));
        let tokenizer = ClipTokenizer::from_dir(&config.model.tokenizer)?;
        let mut datasets = Vec::new();
        let mut captions: Vec<Vec<String>> = Vec::new();
        for path in &config.data.paths {
            let images = LabelledImages::load(path, split)?;
            let own = ClassCaptions::load(&path.join("classes.json"), EXTRA_TEMPLATES)?;
            if let Some(bad) = images
                .labels
                .iter()
                .find(|l| **l as usize >= own.num_classes())
            {
                return Err(Error::File {
                    path: path.display().to_string(),
                    message: format!(
                        "label {bad} has no class in classes.json ({} classes)",
                        own.num_classes()
                    ),
                });
            }
            datasets.push((captions.len(), images));
            captions.extend(own.captions);
        }
        let total: usize = datasets.iter().map(|(_, d)| d.len()).sum();
        let classes: Vec<usize> = datasets
            .iter()
            .flat_map(|(offset, images)| images.labels.iter().map(move |l| offset + *l as usize))
            .collect();
        let latents = match cached.filter(|l| l.dim(0).ok() == Some(total)) {
            Some(latents) => latents,
            None => {
                let mut chunks = Vec::new();
                let mut done = 0;
                for (_, images) in &datasets {
                    for start in (0..images.len()).step_by(500) {
                        let indices: Vec<usize> = (start..images.len().min(start + 500)).collect();
                        let x = pad_to(
                            &images.batch(&indices, &Device::Cpu)?,
                            config.data.image_size,
                        )?;
                        let mean = vae.encode(&x)?.mean;
                        chunks.push(mean.affine(vae_config.scaling_factor, 0.0)?);
                        done += indices.len();
                        progress(done, total);
                    }
                }
                let latents = Tensor::cat(&chunks, 0)?;
                if let Some(path) = cache {
                    checkpoint::save(
                        path,
                        &[("latents".to_string(), latents.clone())],
                        &BTreeMap::from([(CACHE_KEY.to_string(), cache_key)]),
                    )?;
                }
                latents
            }
        };
        let encode = |text: &str| tokenizer.encode(text).map(|e| e.ids);
        let caption_ids = captions
            .iter()
            .map(|own| own.iter().map(|c| encode(c)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            latents,
            classes,
            caption_ids,
            captions,
            empty_ids: encode("")?,
        })
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.caption_ids.len()
    }

    /// (C, h, w) of one latent.
    pub fn latent_dims(&self) -> Result<(usize, usize, usize)> {
        let (_, c, h, w) = self.latents.dims4()?;
        Ok((c, h, w))
    }
}

/// Metadata key of the latent cache: what the latents were computed from.
const CACHE_KEY: &str = "diffuse.latents_of";

/// A digest of everything the cached latents depend on.
fn latent_cache_key(config: &LdmTrainConfig, split: Split, vae_weights: &Path) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    read(vae_weights)?.hash(&mut hasher);
    read(&config.model.vae.join("config.json"))?.hash(&mut hasher);
    config.data.paths.hash(&mut hasher);
    config.data.image_size.hash(&mut hasher);
    split.stem().hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

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
        let t = &config.train;
        let rule = UpdateRule {
            learning_rate: t.learning_rate,
            warmup_steps: t.warmup_steps,
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
        let loaded = checkpoint::load(path, device)?;
        let header = super::state::read_header(&loaded, path, TrainerKind::Latent)?;
        let saved = LdmTrainConfig::from_toml_str(&header.config).map_err(|e| {
            crate::error::file_error(path, format!("its training config is not valid: {e}"))
        })?;
        super::state::check_same_sections(
            path,
            &saved.to_toml(),
            &trainer.config.to_toml(),
            &["data", "model", "diffusion"],
        )?;
        trainer.state.restore(&loaded, path, header.step)?;
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
        let mut rng = SeededNoise::new(super::step_seed(cfg.train.seed, self.state.step));
        let (indices, timesteps) =
            super::draw_examples_and_timesteps(&mut rng, batch, data.len(), n_train);
        let mut ids: Vec<u32> = Vec::with_capacity(batch * data.empty_ids.len());
        for &i in &indices {
            let dropped = rng.rng().random_bool(cfg.data.caption_dropout);
            let phrasing: u64 = rng.rng().random();
            if dropped {
                ids.extend(&data.empty_ids);
            } else {
                let own = &data.caption_ids[data.classes[i]];
                ids.extend(&own[(phrasing % own.len() as u64) as usize]);
            }
        }
        let device = self.device.clone();
        let index = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            batch,
            &Device::Cpu,
        )?;
        let x0 = data.latents.index_select(&index, 0)?.to_device(&device)?;
        let eps = rng.randn(x0.dims())?.to_device(&device)?;
        let xt = q_sample(&self.schedule, &x0, &timesteps, &eps)?;
        let ids = Tensor::from_vec(ids, (batch, data.empty_ids.len()), &device)?;
        let context = self.text_encoder.forward(&ids)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            batch,
            &device,
        )?;
        let prediction = self
            .unet
            .forward(&xt, &t, &UNetConditioning::text(context))?;
        let target = crate::schedule::training_target(
            &self.schedule,
            PredictionType::parse(&cfg.diffusion.prediction_type)?,
            &x0,
            &eps,
            &timesteps,
        )?;
        let loss = (prediction - &target)?.sqr()?.mean_all()?;
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
    /// `model_index.json`, `scheduler/`, `tokenizer/` and `vae/` (copied from the config's),
    /// `text_encoder/`, `unet/`. Each file is written atomically.
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
        for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
            let from = self.config.model.vae.join(name);
            let bytes = std::fs::read(&from).map_err(|e| io(&from, e))?;
            checkpoint::write_atomically(&dir.join("vae").join(name), &bytes)?;
        }
        let pt = BTreeMap::from([("format".to_string(), "pt".to_string())]);
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

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn layers_per_block_default() -> usize {
    2
}

fn attention_heads_default() -> usize {
    4
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
        self.trainer
            .write_pipeline(&out_dir.join(PIPELINE_DIR), self.pipeline_dtype)
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
