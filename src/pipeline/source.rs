//! Where a pipeline's parts come from: a diffusers folder, or a single `.safetensors` file in
//! the original layout (what AUTOMATIC1111, ComfyUI and model-sharing sites use), with the
//! configs and tokenizers of its architecture built in or taken from a diffusers folder.

use super::{check_model_index, weights_file, PipelineKind};
use crate::diffusion::schedule::PredictionType;
use crate::error::file_error;
use crate::error::{Error, Result};
use crate::model::config::{read_json, ClipTextConfig, UNetConfig, VaeConfig};
use crate::sampler::SchedulerConfig;
use crate::single_file::{clip_map, open_clip_map, unet_map, vae_map, NameMap};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{tensor_shapes, ComponentWeights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything a pipeline is built from, wherever it is stored.
pub struct PipelineParts {
    pub kind: PipelineKind,
    pub force_zeros_for_empty_prompt: bool,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder: (ClipTextConfig, ComponentWeights),
    pub text_encoder_2: Option<(ClipTextConfig, ComponentWeights)>,
    pub unet: (UNetConfig, ComponentWeights),
    pub vae: (VaeConfig, ComponentWeights),
    pub scheduler: SchedulerConfig,
}

/// The parts of a diffusers pipeline folder.
pub fn folder_parts(root: &Path) -> Result<PipelineParts> {
    let (kind, force_zeros_for_empty_prompt) = check_model_index(&root.join("model_index.json"))?;
    let component = |name: &str, stem: &str| -> Result<ComponentWeights> {
        Ok(ComponentWeights::File(weights_file(
            &root.join(name),
            stem,
        )?))
    };
    let config = |name: &str| root.join(name).join("config.json");
    let second = match kind {
        PipelineKind::StableDiffusion => None,
        PipelineKind::StableDiffusionXl => Some((
            ClipTokenizer::from_dir(&root.join("tokenizer_2"))?,
            (
                read_json(&config("text_encoder_2"))?,
                component("text_encoder_2", "model")?,
            ),
        )),
    };
    let (tokenizer_2, text_encoder_2) = match second {
        Some((tokenizer, encoder)) => (Some(tokenizer), Some(encoder)),
        None => (None, None),
    };
    Ok(PipelineParts {
        kind,
        force_zeros_for_empty_prompt,
        tokenizer: ClipTokenizer::from_dir(&root.join("tokenizer"))?,
        tokenizer_2,
        text_encoder: (
            read_json(&config("text_encoder"))?,
            component("text_encoder", "model")?,
        ),
        text_encoder_2,
        unet: (
            read_json(&config("unet"))?,
            component("unet", "diffusion_pytorch_model")?,
        ),
        vae: (
            read_json(&config("vae"))?,
            component("vae", "diffusion_pytorch_model")?,
        ),
        scheduler: SchedulerConfig::from_file(
            &root.join("scheduler").join("scheduler_config.json"),
        )?,
    })
}

/// The model families a single file is recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: CLIP ViT-L text encoder (`cond_stage_model.transformer.`).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder (`cond_stage_model.model.`).
    Sd2,
    /// SDXL: two text encoders (`conditioner.embedders.0/1.`) and added size conditions.
    Sdxl,
}

/// What a single file was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recognised {
    pub architecture: Architecture,
    /// A 9-channel U-Net input: latents, the mask and the masked image's latents.
    pub inpainting: bool,
}

impl Recognised {
    pub fn name(&self) -> String {
        let family = match self.architecture {
            Architecture::Sd1 => "SD 1.x",
            Architecture::Sd2 => "SD 2.x",
            Architecture::Sdxl => "SDXL",
        };
        match self.inpainting {
            true => format!("{family} inpainting"),
            false => family.to_string(),
        }
    }
}

pub(crate) const UNET_PREFIX: &str = "model.diffusion_model.";
pub(crate) const VAE_PREFIX: &str = "first_stage_model.";
pub(crate) const SD1_TEXT_PREFIX: &str = "cond_stage_model.transformer.";
pub(crate) const SD2_TEXT_PREFIX: &str = "cond_stage_model.model.";
pub(crate) const SDXL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub(crate) const SDXL_TEXT_2_PREFIX: &str = "conditioner.embedders.1.model.";

/// The architecture of a checkpoint from its keys and the U-Net's input shape.
pub fn recognise(path: &Path, shapes: &HashMap<String, Vec<usize>>) -> Result<Recognised> {
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    if !has(UNET_PREFIX) {
        return Err(file_error(
            path,
            "has no U-Net (model.diffusion_model.*): not a Stable Diffusion checkpoint in the \
             original layout (a diffusers folder loads as a folder; a LoRA goes to --lora)",
        ));
    }
    let architecture = if has(SDXL_TEXT_2_PREFIX) {
        Architecture::Sdxl
    } else if has(SD2_TEXT_PREFIX) {
        Architecture::Sd2
    } else if has(SD1_TEXT_PREFIX) {
        Architecture::Sd1
    } else {
        return Err(file_error(
            path,
            "has a U-Net but no text encoder this crate knows (cond_stage_model.transformer.* \
             for SD 1.x, cond_stage_model.model.* for SD 2.x, conditioner.embedders.* for SDXL)",
        ));
    };
    let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    let inpainting = match shapes.get(&conv_in).map(Vec::as_slice) {
        Some([_, 4, _, _]) => false,
        Some([_, 9, _, _]) => true,
        other => {
            return Err(file_error(
                path,
                format!(
                    "{conv_in} has shape {other:?}; expected [C, 4, 3, 3] (text to image) or \
                     [C, 9, 3, 3] (inpainting)"
                ),
            ))
        }
    };
    Ok(Recognised {
        architecture,
        inpainting,
    })
}

/// How to read a single file beyond its own tensors.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose configs, tokenizers and scheduler are used instead of the
    /// built-in ones.
    pub config_dir: Option<PathBuf>,
    /// A VAE to use instead of the file's: a diffusers `vae/` folder or a single file.
    pub vae: Option<PathBuf>,
    /// Overrides the scheduler's prediction type (SD 2.x files do not say which they have).
    pub prediction_type: Option<PredictionType>,
}

/// The built-in config text of a component of each architecture (the published diffusers
/// configs, `configs/`).
pub(crate) fn builtin_text(architecture: Architecture, component: &str) -> Result<&'static str> {
    Ok(match (architecture, component) {
        (Architecture::Sd1, "unet") => include_str!("../../configs/sd15/unet.json"),
        (Architecture::Sd1, "vae") => include_str!("../../configs/sd15/vae.json"),
        (Architecture::Sd1, "text_encoder") => include_str!("../../configs/sd15/text_encoder.json"),
        (Architecture::Sd1, "scheduler") => include_str!("../../configs/sd15/scheduler.json"),
        (Architecture::Sd2, "unet") => include_str!("../../configs/sd21/unet.json"),
        (Architecture::Sd2, "vae") => include_str!("../../configs/sd21/vae.json"),
        (Architecture::Sd2, "text_encoder") => include_str!("../../configs/sd21/text_encoder.json"),
        (Architecture::Sd2, "scheduler") => include_str!("../../configs/sd21/scheduler.json"),
        (Architecture::Sdxl, "unet") => include_str!("../../configs/sdxl/unet.json"),
        (Architecture::Sdxl, "vae") => include_str!("../../configs/sdxl/vae.json"),
        (Architecture::Sdxl, "text_encoder") => {
            include_str!("../../configs/sdxl/text_encoder.json")
        }
        (Architecture::Sdxl, "text_encoder_2") => {
            include_str!("../../configs/sdxl/text_encoder_2.json")
        }
        (Architecture::Sdxl, "scheduler") => include_str!("../../configs/sdxl/scheduler.json"),
        _ => return Err(Error::Msg(format!("no built-in {component} config"))),
    })
}

fn builtin_config<T: serde::de::DeserializeOwned>(
    architecture: Architecture,
    component: &str,
) -> Result<T> {
    serde_json::from_str(builtin_text(architecture, component)?)
        .map_err(|e| Error::Msg(format!("built-in {component} config: {e}")))
}

/// The CLIP tokenizer shipped with the project (the embedded model's), padded with `pad`.
pub(crate) fn shipped_tokenizer(pad: &str) -> Result<ClipTokenizer> {
    ClipTokenizer::from_dir(&crate::embedded::model_dir()?.join("tokenizer"))?.padded_with(pad)
}

/// Configs, tokenizers and scheduler for a file of `recognised`: from `config_dir` when given
/// (its pipeline class must agree with the file), else built in.
struct Described {
    kind: PipelineKind,
    force_zeros_for_empty_prompt: bool,
    tokenizer: ClipTokenizer,
    tokenizer_2: Option<ClipTokenizer>,
    text_encoder: ClipTextConfig,
    text_encoder_2: Option<ClipTextConfig>,
    unet: UNetConfig,
    vae: VaeConfig,
    scheduler: SchedulerConfig,
}

fn describe(path: &Path, recognised: Recognised, config_dir: Option<&Path>) -> Result<Described> {
    let xl = recognised.architecture == Architecture::Sdxl;
    if let Some(dir) = config_dir {
        let (kind, force_zeros_for_empty_prompt) =
            check_model_index(&dir.join("model_index.json"))?;
        if (kind == PipelineKind::StableDiffusionXl) != xl {
            return Err(file_error(
                path,
                format!(
                    "is {}, but --config {} is a {kind:?} pipeline",
                    recognised.name(),
                    dir.display()
                ),
            ));
        }
        let config = |name: &str| dir.join(name).join("config.json");
        return Ok(Described {
            kind,
            force_zeros_for_empty_prompt,
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            tokenizer_2: xl
                .then(|| ClipTokenizer::from_dir(&dir.join("tokenizer_2")))
                .transpose()?,
            text_encoder: read_json(&config("text_encoder"))?,
            text_encoder_2: xl
                .then(|| read_json(&config("text_encoder_2")))
                .transpose()?,
            unet: read_json(&config("unet"))?,
            vae: read_json(&config("vae"))?,
            scheduler: SchedulerConfig::from_file(
                &dir.join("scheduler").join("scheduler_config.json"),
            )?,
        });
    }
    let architecture = recognised.architecture;
    let mut unet: UNetConfig = builtin_config(architecture, "unet")?;
    if recognised.inpainting {
        unet.in_channels = 9;
    }
    // SD 1.x pads with the end token; SD 2.x and SDXL's second tokenizer with "!".
    let (tokenizer, tokenizer_2) = match architecture {
        Architecture::Sd1 => (shipped_tokenizer("<|endoftext|>")?, None),
        Architecture::Sd2 => (shipped_tokenizer("!")?, None),
        Architecture::Sdxl => (
            shipped_tokenizer("<|endoftext|>")?,
            Some(shipped_tokenizer("!")?),
        ),
    };
    Ok(Described {
        kind: if xl {
            PipelineKind::StableDiffusionXl
        } else {
            PipelineKind::StableDiffusion
        },
        force_zeros_for_empty_prompt: xl,
        tokenizer,
        tokenizer_2,
        text_encoder: builtin_config(architecture, "text_encoder")?,
        text_encoder_2: xl
            .then(|| builtin_config(architecture, "text_encoder_2"))
            .transpose()?,
        unet,
        vae: builtin_config(architecture, "vae")?,
        scheduler: SchedulerConfig::from_json_str(builtin_text(architecture, "scheduler")?)?,
    })
}

/// The parts of a single-file checkpoint, and what it was recognised as.
pub fn single_file_parts(
    path: &Path,
    options: &SingleFileOptions,
) -> Result<(PipelineParts, Recognised)> {
    let shapes = tensor_shapes(path)?;
    let recognised = recognise(path, &shapes)?;
    let mut described = describe(path, recognised, options.config_dir.as_deref())?;
    if let Some(prediction_type) = options.prediction_type {
        described.scheduler.prediction_type = prediction_type;
    }
    if described.unet.in_channels != if recognised.inpainting { 9 } else { 4 } {
        return Err(file_error(
            path,
            format!(
                "is {} but the U-Net config takes {} input channels",
                recognised.name(),
                described.unet.in_channels
            ),
        ));
    }
    let keys: Vec<&str> = shapes.keys().map(String::as_str).collect();
    let mapped = |names: NameMap| ComponentWeights::Mapped {
        path: path.to_path_buf(),
        names: Arc::new(names),
    };
    let mut claimed: Vec<&str> = vec![UNET_PREFIX, VAE_PREFIX];
    let unet = mapped(unet_map(
        keys.iter().copied(),
        UNET_PREFIX,
        &described.unet,
    )?);
    let (text_encoder, text_encoder_2) = match recognised.architecture {
        Architecture::Sd1 => {
            claimed.push(SD1_TEXT_PREFIX);
            (clip_map(keys.iter().copied(), SD1_TEXT_PREFIX)?, None)
        }
        Architecture::Sd2 => {
            claimed.push(SD2_TEXT_PREFIX);
            let map = open_clip_map(
                keys.iter().copied(),
                SD2_TEXT_PREFIX,
                &described.text_encoder,
                false,
            )?;
            (map, None)
        }
        Architecture::Sdxl => {
            claimed.extend([SDXL_TEXT_PREFIX, SDXL_TEXT_2_PREFIX]);
            let config_2 = described
                .text_encoder_2
                .as_ref()
                .ok_or_else(|| Error::Msg("an SDXL config without text_encoder_2".into()))?;
            (
                clip_map(keys.iter().copied(), SDXL_TEXT_PREFIX)?,
                Some(open_clip_map(
                    keys.iter().copied(),
                    SDXL_TEXT_2_PREFIX,
                    config_2,
                    true,
                )?),
            )
        }
    };
    if let Some(stray) = keys
        .iter()
        .find(|k| !claimed.iter().any(|p| k.starts_with(p)) && !crate::single_file::is_ignored(k))
    {
        return Err(file_error(
            path,
            format!(
                "tensor {stray} belongs to no component of {} (U-Net, VAE, text encoders)",
                recognised.name()
            ),
        ));
    }
    let vae =
        match &options.vae {
            Some(vae) => vae_parts(vae, &described.vae)?,
            None if keys.iter().any(|k| k.starts_with(VAE_PREFIX)) => (
                described.vae.clone(),
                mapped(vae_map(keys.iter().copied(), VAE_PREFIX, &described.vae)?),
            ),
            None => return Err(file_error(
                path,
                "has no VAE (first_stage_model.*); give one with --vae (a diffusers vae folder or \
                 a VAE .safetensors file)",
            )),
        };
    let parts = PipelineParts {
        kind: described.kind,
        force_zeros_for_empty_prompt: described.force_zeros_for_empty_prompt,
        tokenizer: described.tokenizer,
        tokenizer_2: described.tokenizer_2,
        text_encoder: (described.text_encoder, mapped(text_encoder)),
        text_encoder_2: match (described.text_encoder_2, text_encoder_2) {
            (Some(config), Some(names)) => Some((config, mapped(names))),
            _ => None,
        },
        unet: (described.unet, unet),
        vae,
        scheduler: described.scheduler,
    };
    Ok((parts, recognised))
}

/// A `--vae`: a diffusers `vae/` folder (its own config), or a single file in the diffusers
/// layout or the original one (with or without `first_stage_model.`), read with `config`.
fn vae_parts(path: &Path, config: &VaeConfig) -> Result<(VaeConfig, ComponentWeights)> {
    if path.is_dir() {
        return Ok((
            read_json(&path.join("config.json"))?,
            ComponentWeights::File(weights_file(path, "diffusion_pytorch_model")?),
        ));
    }
    let shapes = tensor_shapes(path)?;
    if shapes.keys().any(|k| k.starts_with("encoder.down_blocks.")) {
        return Ok((config.clone(), ComponentWeights::File(path.to_path_buf())));
    }
    let prefix = if shapes.keys().any(|k| k.starts_with(VAE_PREFIX)) {
        VAE_PREFIX
    } else {
        ""
    };
    let keys = shapes
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with(prefix) && !k.starts_with("loss."));
    let names = vae_map(keys, prefix, config)?;
    if names.is_empty() {
        return Err(file_error(path, "holds no VAE weights"));
    }
    Ok((
        config.clone(),
        ComponentWeights::Mapped {
            path: path.to_path_buf(),
            names: Arc::new(names),
        },
    ))
}

/// What `--model` named, loaded: its parts, where they are, and for a single file what it was
/// recognised as.
pub struct ModelParts {
    pub parts: PipelineParts,
    pub location: PathBuf,
    pub recognised: Option<Recognised>,
}

/// The parts of what `--model` names: a single `.safetensors` file in the original layout, a
/// diffusers folder, a hub id or a short name. `--vae` and `--prediction-type` apply to every
/// kind; `--config` only to single files (a folder has its own configs).
pub fn model_parts(spec: &str, fp16: bool, options: &SingleFileOptions) -> Result<ModelParts> {
    let path = Path::new(spec);
    if path.is_file() {
        let (parts, recognised) = single_file_parts(path, options)?;
        return Ok(ModelParts {
            parts,
            location: path.to_path_buf(),
            recognised: Some(recognised),
        });
    }
    if let Some(dir) = &options.config_dir {
        return Err(Error::Msg(format!(
            "--config {} is for single-file checkpoints; --model {spec} is a folder or hub id \
             with configs of its own",
            dir.display()
        )));
    }
    let root = crate::hub::resolve(spec, fp16)?;
    let mut parts = folder_parts(&root)?;
    if let Some(vae) = &options.vae {
        parts.vae = vae_parts(vae, &parts.vae.0)?;
    }
    if let Some(prediction_type) = options.prediction_type {
        parts.scheduler.prediction_type = prediction_type;
    }
    Ok(ModelParts {
        parts,
        location: root,
        recognised: None,
    })
}
