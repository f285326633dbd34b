//! `diffuse convert`: a single-file checkpoint to a diffusers folder and back. Weights are
//! copied bit for bit (the layouts differ only by names, 1x1-convolution reshapes, a
//! transpose and OpenCLIP's fused q/k/v), in their stored dtype. A folder can also be written
//! with 8-bit text encoder and U-Net weights (`--dtype q8`, [`quantize_folder`]).

use super::source::{
    builtin_text, folder_parts, shipped_tokenizer, single_file_parts, Architecture, PipelineParts,
    Recognised, SingleFileOptions, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_2_PREFIX,
    SDXL_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use super::PipelineKind;
use crate::error::file_error;
use crate::error::{Error, Result};
use crate::single_file::{
    open_clip_destination, unapply, unet_original_name, vae_original_name, Destination,
};
use crate::weights::read_all;
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What a conversion wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Converted {
    pub tensors: usize,
    pub bytes: usize,
    /// For a single file read: what it was recognised as.
    pub recognised: Option<String>,
}

fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(file_error(
            out,
            "already exists; give a new path (nothing is overwritten)",
        ));
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, format!("{value:#}\n"))
        .map_err(|e| file_error(path, format!("cannot be written: {e}")))
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<usize> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| file_error(path, format!("cannot be written: {e}")))?;
    Ok(tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum())
}

/// The JSON of a component's config: the `--config` folder's, else the built-in one of the
/// architecture (a 9-channel U-Net for inpainting files).
fn config_json(
    recognised: Recognised,
    config_dir: Option<&Path>,
    component: &str,
) -> Result<serde_json::Value> {
    let file = match (config_dir, component) {
        (Some(dir), "scheduler") => dir.join("scheduler").join("scheduler_config.json"),
        (Some(dir), _) => dir.join(component).join("config.json"),
        (None, _) => {
            let mut value: serde_json::Value =
                serde_json::from_str(builtin_text(recognised.architecture, component)?)
                    .map_err(|e| Error::Msg(format!("built-in {component} config: {e}")))?;
            if component == "unet" && recognised.inpainting {
                value["in_channels"] = 9.into();
            }
            return Ok(value);
        }
    };
    crate::model::config::read_json(&file)
}

/// Writes the single file at `file` as a diffusers folder at `out`.
pub fn single_file_to_folder(
    file: &Path,
    options: &SingleFileOptions,
    out: &Path,
) -> Result<Converted> {
    refuse_existing(out)?;
    let (parts, recognised) = single_file_parts(file, options)?;
    check_parts(&parts)?;
    let config_dir = options.config_dir.as_deref();
    let xl = parts.kind == PipelineKind::StableDiffusionXl;
    let staging = out.with_extension("partial");
    std::fs::create_dir_all(&staging).map_err(|e| file_error(&staging, e.to_string()))?;
    let mut components: Vec<(&str, &str, &crate::weights::ComponentWeights)> = vec![
        ("unet", "diffusion_pytorch_model", &parts.unet.1),
        ("vae", "diffusion_pytorch_model", &parts.vae.1),
        ("text_encoder", "model", &parts.text_encoder.1),
    ];
    if let Some((_, weights)) = &parts.text_encoder_2 {
        components.push(("text_encoder_2", "model", weights));
    }
    let (mut tensors, mut bytes) = (0, 0);
    for (component, stem, weights) in components {
        let dir = staging.join(component);
        std::fs::create_dir_all(&dir).map_err(|e| file_error(&dir, e.to_string()))?;
        let read: HashMap<String, Tensor> = read_all(weights)?.into_iter().collect();
        tensors += read.len();
        bytes += save(&read, &dir.join(format!("{stem}.safetensors")))?;
        let config = match (component, &options.vae) {
            // A --vae folder brings its own config.
            ("vae", Some(vae)) if vae.is_dir() => {
                crate::model::config::read_json(&vae.join("config.json"))?
            }
            _ => config_json(recognised, config_dir, component)?,
        };
        write_json(&dir.join("config.json"), &config)?;
    }
    let mut scheduler = config_json(recognised, config_dir, "scheduler")?;
    if let Some(prediction_type) = options.prediction_type {
        scheduler["prediction_type"] = prediction_type.config_name().into();
    }
    std::fs::create_dir_all(staging.join("scheduler"))
        .map_err(|e| file_error(&staging, e.to_string()))?;
    write_json(
        &staging.join("scheduler").join("scheduler_config.json"),
        &scheduler,
    )?;
    let tokenizers = match (config_dir, recognised.architecture) {
        (Some(dir), _) => {
            let mut found = vec![crate::tokenizer::ClipTokenizer::from_dir(
                &dir.join("tokenizer"),
            )?];
            if xl {
                found.push(crate::tokenizer::ClipTokenizer::from_dir(
                    &dir.join("tokenizer_2"),
                )?);
            }
            found
        }
        (None, Architecture::Sd1) => vec![shipped_tokenizer("<|endoftext|>")?],
        (None, Architecture::Sd2) => vec![shipped_tokenizer("!")?],
        (None, Architecture::Sdxl) => {
            vec![shipped_tokenizer("<|endoftext|>")?, shipped_tokenizer("!")?]
        }
    };
    for (tokenizer, name) in tokenizers.iter().zip(["tokenizer", "tokenizer_2"]) {
        tokenizer.save_dir(&staging.join(name))?;
    }
    write_json(
        &staging.join("model_index.json"),
        &model_index(&parts, recognised),
    )?;
    std::fs::rename(&staging, out).map_err(|e| file_error(out, e.to_string()))?;
    Ok(Converted {
        tensors,
        bytes,
        recognised: Some(recognised.name()),
    })
}

/// Every component's weights against its config, names and shapes, without reading them: a
/// file that does not fit the configs is refused before anything is written.
fn check_parts(parts: &PipelineParts) -> Result<()> {
    use crate::model::{text::ClipTextModel, unet::UNet2DConditionModel, vae::AutoencoderKL};
    use crate::weights::check_component;
    let (unet_config, unet) = &parts.unet;
    check_component(unet, |vb| {
        UNet2DConditionModel::new(unet_config.clone(), vb)
    })?;
    let (vae_config, vae) = &parts.vae;
    check_component(vae, |vb| AutoencoderKL::new(vae_config.clone(), vb))?;
    for (config, weights) in std::iter::once(&parts.text_encoder).chain(&parts.text_encoder_2) {
        check_component(weights, |vb| ClipTextModel::new(config.clone(), vb))?;
    }
    Ok(())
}

/// A diffusers folder of the single file `file` in the cache (converted once, then reused while
/// the file's length and modification time stay the same): for the commands that work on
/// folders, such as fine-tuning.
pub fn cached_folder(file: &Path, options: &SingleFileOptions) -> Result<std::path::PathBuf> {
    let meta = std::fs::metadata(file).map_err(|e| file_error(file, e.to_string()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let options_tag = options.config_dir.as_ref().map_or(0, |d| {
        crate::embedded::fnv1a([d.display().to_string().as_bytes()])
    });
    let dir = crate::embedded::cache_root()
        .join("converted")
        .join(format!(
            "{stem}-{}-{modified}-{options_tag:016x}",
            meta.len()
        ));
    if !dir.join("model_index.json").is_file() {
        std::fs::create_dir_all(dir.parent().unwrap_or(&dir))
            .map_err(|e| file_error(&dir, e.to_string()))?;
        single_file_to_folder(file, options, &dir)?;
    }
    Ok(dir)
}

/// diffusers' `model_index.json` for the pipeline class of `parts`.
fn model_index(parts: &PipelineParts, recognised: Recognised) -> serde_json::Value {
    let xl = parts.kind == PipelineKind::StableDiffusionXl;
    let class = match (xl, recognised.inpainting) {
        (false, false) => "StableDiffusionPipeline",
        (false, true) => "StableDiffusionInpaintPipeline",
        (true, false) => "StableDiffusionXLPipeline",
        (true, true) => "StableDiffusionXLInpaintPipeline",
    };
    let scheduler = parts
        .scheduler
        .class_name
        .clone()
        .unwrap_or_else(|| "DDIMScheduler".into());
    let mut index = serde_json::json!({
        "_class_name": class,
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if xl {
        index["text_encoder_2"] =
            serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = parts.force_zeros_for_empty_prompt.into();
    } else {
        index["safety_checker"] = serde_json::Value::Null;
        index["feature_extractor"] = serde_json::Value::Null;
        index["requires_safety_checker"] = false.into();
    }
    index
}

/// Adds one component's weights to `out` under their original names.
fn add_original(
    out: &mut HashMap<String, Tensor>,
    weights: &crate::weights::ComponentWeights,
    destination: &dyn Fn(&str) -> Option<Destination>,
) -> Result<()> {
    let mut fused: BTreeMap<String, Vec<Option<Tensor>>> = BTreeMap::new();
    for (name, tensor) in read_all(weights)? {
        if name.ends_with("position_ids") {
            continue;
        }
        match destination(&name) {
            Some(Destination::Whole(key, transform)) => {
                out.insert(key, unapply(transform, tensor)?);
            }
            Some(Destination::Part(key, index, parts)) => {
                let slots = fused.entry(key).or_insert_with(|| vec![None; parts]);
                slots[index] = Some(tensor);
            }
            None => {
                return Err(file_error(
                    weights.path(),
                    format!("weight {name} has no place in the original layout"),
                ))
            }
        }
    }
    for (key, slots) in fused {
        let parts: Option<Vec<Tensor>> = slots.into_iter().collect();
        let parts = parts
            .ok_or_else(|| file_error(weights.path(), format!("{key}: q, k or v is missing")))?;
        out.insert(key, Tensor::cat(&parts, 0)?);
    }
    Ok(())
}

/// Where a weight of a transformers-named CLIP text model goes under `prefix`.
fn clip_destination(name: &str, prefix: &str) -> Option<Destination> {
    let rest = name.strip_prefix("text_model.").unwrap_or(name);
    Some(Destination::Whole(
        format!("{prefix}text_model.{rest}"),
        crate::single_file::Transform::Same,
    ))
}

/// Writes the diffusers folder at `dir` as one file in the original layout at `out`: SD 1.x
/// (CLIP text encoder), SD 2.x (an OpenCLIP-style one: `gelu`), or SDXL.
pub fn folder_to_single_file(dir: &Path, out: &Path) -> Result<Converted> {
    refuse_existing(out)?;
    let parts = folder_parts(dir)?;
    let mut tensors = HashMap::new();
    let unet_config = parts.unet.0.clone();
    add_original(&mut tensors, &parts.unet.1, &|name| {
        let key = unet_original_name(name, &unet_config)?;
        Some(Destination::Whole(
            format!("{UNET_PREFIX}{key}"),
            crate::single_file::Transform::Same,
        ))
    })?;
    let vae_config = parts.vae.0.clone();
    add_original(&mut tensors, &parts.vae.1, &|name| {
        let (key, transform) = vae_original_name(name, &vae_config)?;
        Some(Destination::Whole(format!("{VAE_PREFIX}{key}"), transform))
    })?;
    match &parts.text_encoder_2 {
        Some((_, weights_2)) => {
            add_original(&mut tensors, &parts.text_encoder.1, &|name| {
                clip_destination(name, SDXL_TEXT_PREFIX)
            })?;
            add_original(&mut tensors, weights_2, &|name| {
                open_clip_destination(name, SDXL_TEXT_2_PREFIX)
            })?;
        }
        None if parts.text_encoder.0.hidden_act == "gelu" => {
            add_original(&mut tensors, &parts.text_encoder.1, &|name| {
                open_clip_destination(name, SD2_TEXT_PREFIX)
            })?;
        }
        None => {
            add_original(&mut tensors, &parts.text_encoder.1, &|name| {
                clip_destination(name, SD1_TEXT_PREFIX)
            })?;
        }
    }
    let count = tensors.len();
    let staging = out.with_extension("partial");
    let bytes = save(&tensors, &staging)?;
    std::fs::rename(&staging, out).map_err(|e| file_error(out, e.to_string()))?;
    Ok(Converted {
        tensors: count,
        bytes,
        recognised: None,
    })
}

/// Writes the diffusers folder at `dir` to the new folder `out` with its text encoders' and
/// U-Net's weights as `--dtype q8` holds them: the linear and convolution weights it quantizes
/// as q8 (`ops::q8`: i8 `weight` and f32 `weight_scale`), the rest bf16; every other file is
/// copied. The folder loads directly, at about a quarter of those weights' f32 size.
pub fn quantize_folder(dir: &Path, out: &Path) -> Result<Converted> {
    use crate::model::{text::ClipTextModel, unet::UNet2DConditionModel};
    use crate::weights::quantized_tensors;
    refuse_existing(out)?;
    let parts = folder_parts(dir)?;
    let mut rewritten: Vec<(std::path::PathBuf, BTreeMap<String, Tensor>)> = Vec::new();
    let (unet_config, unet) = &parts.unet;
    let q8 = quantized_tensors(unet, |vb| {
        UNet2DConditionModel::new(unet_config.clone(), vb).map(|_| ())
    })?;
    rewritten.push((unet.path().to_path_buf(), q8));
    for (config, weights) in std::iter::once(&parts.text_encoder).chain(&parts.text_encoder_2) {
        let q8 = quantized_tensors(weights, |vb| {
            ClipTextModel::new(config.clone(), vb).map(|_| ())
        })?;
        rewritten.push((weights.path().to_path_buf(), q8));
    }
    let staging = out.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| file_error(&staging, e.to_string()))?;
    }
    let skip: Vec<&Path> = rewritten.iter().map(|(path, _)| path.as_path()).collect();
    copy_tree(dir, &staging, &skip)?;
    let (mut tensors, mut bytes) = (0, 0);
    for (path, q8) in &rewritten {
        let stored = read_all(&crate::weights::ComponentWeights::File(path.clone()))?;
        // The float weights as `--dtype q8` holds them: bf16.
        let mut all: BTreeMap<String, Tensor> = stored
            .into_iter()
            .map(|(name, t)| {
                let t = match t.dtype() {
                    DType::F32 | DType::F16 | DType::F64 => t.to_dtype(DType::BF16)?,
                    _ => t,
                };
                Ok((name, t))
            })
            .collect::<Result<_>>()?;
        all.extend(q8.iter().map(|(name, t)| (name.clone(), t.clone())));
        let q8_names = q8
            .iter()
            .filter(|(_, t)| t.dtype() == DType::U8)
            .map(|(name, _)| name.clone())
            .collect();
        let relative = path
            .strip_prefix(dir)
            .map_err(|_| file_error(path, format!("is not inside the folder {}", dir.display())))?;
        let target = staging.join(relative);
        let list: Vec<(String, Tensor)> = all.into_iter().collect();
        tensors += list.len();
        bytes += list
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>();
        crate::checkpoint::save_with_q8(&target, &list, &Default::default(), &q8_names)?;
    }
    std::fs::rename(&staging, out).map_err(|e| file_error(out, e.to_string()))?;
    Ok(Converted {
        tensors,
        bytes,
        recognised: None,
    })
}

/// Copies the folder `from` to `to` (files and folders, links followed), leaving out `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &[&Path]) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| file_error(to, e.to_string()))?;
    let entries = std::fs::read_dir(from).map_err(|e| file_error(from, e.to_string()))?;
    for entry in entries {
        let path = entry.map_err(|e| file_error(from, e.to_string()))?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        if skip.contains(&path.as_path()) {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &target, skip)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| file_error(&path, e.to_string()))?;
        }
    }
    Ok(())
}
