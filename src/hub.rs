//! Models by Hugging Face hub id (or a short name), resolved to a diffusers folder in the
//! standard cache: only the files the pipeline reads are fetched, with a progress bar, and
//! `HF_HUB_OFFLINE=1` reads the cache without touching the network.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A well-known model with the settings its authors recommend.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub repo: &'static str,
    pub size: usize,
    pub steps: usize,
    /// Classifier-free guidance scale (at or below 1: off).
    pub guidance: f64,
    /// The noise levels (sigma) where guidance applies, when not all of them.
    pub guidance_interval: Option<(f64, f64)>,
}

pub const PRESETS: [Preset; 4] = [
    Preset {
        name: "sd15",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        size: 512,
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd21",
        repo: "stabilityai/stable-diffusion-2-1",
        size: 768,
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd21-base",
        repo: "stabilityai/stable-diffusion-2-1-base",
        size: 512,
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        size: 512,
        steps: 1,
        guidance: 0.0,
        guidance_interval: None,
    },
];

/// The embedded default model in `weights/` (trained by `configs/tiny-ldm.toml`): 32x32, 20
/// DDIM steps, guidance 3 on the steps with sigma in (0.3, 2] (the settings its model card
/// measures: guidance at every step made the images of a caption near copies of each other).
pub const EMBEDDED: Preset = Preset {
    name: "embedded",
    repo: "weights/",
    size: 32,
    steps: 20,
    guidance: 3.0,
    guidance_interval: Some((0.3, 2.0)),
};

pub fn preset(name_or_repo: &str) -> Option<&'static Preset> {
    PRESETS
        .iter()
        .find(|p| p.name == name_or_repo || p.repo == name_or_repo)
}

/// The files of a diffusers SD pipeline that the loader reads; `required` ones must exist.
fn pipeline_files(fp16: bool) -> Vec<(String, bool)> {
    let weights = |stem: &str| {
        if fp16 {
            format!("{stem}.fp16.safetensors")
        } else {
            format!("{stem}.safetensors")
        }
    };
    vec![
        ("model_index.json".into(), true),
        ("scheduler/scheduler_config.json".into(), true),
        ("tokenizer/tokenizer_config.json".into(), false),
        ("tokenizer/special_tokens_map.json".into(), false),
        // Repos ship the slow tokenizer files, the fast tokenizer.json, or both; the loader
        // says which are missing.
        ("tokenizer/tokenizer.json".into(), false),
        ("tokenizer/vocab.json".into(), false),
        ("tokenizer/merges.txt".into(), false),
        ("text_encoder/config.json".into(), true),
        (format!("text_encoder/{}", weights("model")), true),
        ("unet/config.json".into(), true),
        (format!("unet/{}", weights("diffusion_pytorch_model")), true),
        ("vae/config.json".into(), true),
        (format!("vae/{}", weights("diffusion_pytorch_model")), true),
    ]
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// A local folder as is; otherwise a short name or `owner/name` repo id, fetched (or, offline,
/// found) in the Hugging Face cache. Returns the snapshot folder.
pub fn resolve(spec: &str, fp16: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let repo = preset(spec).map_or(spec, |p| p.repo);
    let valid_id = repo.split('/').count() == 2 && !repo.starts_with('/') && !repo.ends_with('/');
    if !valid_id {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        return Err(Error::bad_value(
            "--model",
            spec,
            &format!(
                "a diffusers folder, a hub id (owner/name) or one of {}",
                names.join(", ")
            ),
        ));
    }
    let mut index = None;
    if offline() {
        let cache = hf_hub::Cache::from_env().model(repo.to_string());
        for (file, required) in pipeline_files(fp16) {
            match cache.get(&file) {
                Some(p) if file == "model_index.json" => index = Some(p),
                Some(_) => {}
                None if required => {
                    return Err(Error::Msg(format!(
                        "--model {spec}: {repo}/{file} is not in the local Hugging Face cache and \
                         HF_HUB_OFFLINE is set; download it once with the network on"
                    )))
                }
                None => {}
            }
        }
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| Error::Msg(format!("cannot reach the Hugging Face hub: {e}")))?
            .model(repo.to_string());
        for (file, required) in pipeline_files(fp16) {
            match api.get(&file) {
                Ok(p) if file == "model_index.json" => index = Some(p),
                Ok(_) => {}
                Err(e) if required => {
                    return Err(Error::Msg(format!(
                        "--model {spec}: cannot download {repo}/{file}: {e} (an unknown id, a \
                         gated model without a token, or no network; HF_HUB_OFFLINE=1 uses the cache)"
                    )))
                }
                Err(_) => {}
            }
        }
    }
    let index = index.expect("model_index.json is required");
    Ok(index
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}
