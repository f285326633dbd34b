//! Models by Hugging Face hub id (or a short name), resolved to a diffusers folder in the
//! standard cache: only the files the pipeline reads are fetched, with a progress bar, and
//! `HF_HUB_OFFLINE=1` reads the cache without touching the network.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A well-known model with the settings its authors recommend (its size is the model's own,
/// from its config).
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub repo: &'static str,
    pub steps: usize,
    /// Classifier-free guidance scale (at or below 1: off).
    pub guidance: f64,
    /// The noise levels (sigma) where guidance applies, when not all of them.
    pub guidance_interval: Option<(f64, f64)>,
}

pub const PRESETS: [Preset; 6] = [
    Preset {
        name: "sd15",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd21",
        repo: "stabilityai/stable-diffusion-2-1",
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd21-base",
        repo: "stabilityai/stable-diffusion-2-1-base",
        steps: 50,
        guidance: 7.5,
        guidance_interval: None,
    },
    Preset {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        steps: 1,
        guidance: 0.0,
        guidance_interval: None,
    },
    Preset {
        name: "sdxl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        steps: 50,
        guidance: 5.0,
        guidance_interval: None,
    },
    Preset {
        name: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        steps: 1,
        guidance: 0.0,
        guidance_interval: None,
    },
];

/// The embedded default model in `weights/` (trained by `configs/tiny-ldm.toml`): 20
/// DDIM steps, guidance 3 on the steps with sigma in (0.3, 2] (the settings its model card
/// measures: guidance at every step made the images of a caption near copies of each other).
pub const EMBEDDED: Preset = Preset {
    name: "embedded",
    repo: "weights/",
    steps: 20,
    guidance: 3.0,
    guidance_interval: Some((0.3, 2.0)),
};

pub fn preset(name_or_repo: &str) -> Option<&'static Preset> {
    PRESETS
        .iter()
        .find(|p| p.name == name_or_repo || p.repo == name_or_repo)
}

/// The files of a diffusers SD pipeline that the loader reads besides `model_index.json`;
/// `required` ones must exist. SDXL pipelines (`xl`) add the second tokenizer and encoder.
fn pipeline_files(fp16: bool, xl: bool) -> Vec<(String, bool)> {
    let weights = |stem: &str| {
        if fp16 {
            format!("{stem}.fp16.safetensors")
        } else {
            format!("{stem}.safetensors")
        }
    };
    let mut tokenizers = vec!["tokenizer"];
    let mut encoders = vec!["text_encoder"];
    if xl {
        tokenizers.push("tokenizer_2");
        encoders.push("text_encoder_2");
    }
    let mut files: Vec<(String, bool)> = vec![("scheduler/scheduler_config.json".into(), true)];
    for tokenizer in tokenizers {
        // Repos ship the slow tokenizer files, the fast tokenizer.json, or both; the loader
        // says which are missing.
        for file in [
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
        ] {
            files.push((format!("{tokenizer}/{file}"), false));
        }
    }
    for encoder in encoders {
        files.push((format!("{encoder}/config.json"), true));
        files.push((format!("{encoder}/{}", weights("model")), true));
    }
    for component in ["unet", "vae"] {
        files.push((format!("{component}/config.json"), true));
        files.push((
            format!("{component}/{}", weights("diffusion_pytorch_model")),
            true,
        ));
    }
    files
}

/// Fetches `model_index.json`, then the files its pipeline class needs (an error for a
/// required one that `fetch` cannot give); returns the index's local path.
fn fetch_pipeline(fp16: bool, fetch: impl Fn(&str) -> Result<PathBuf>) -> Result<PathBuf> {
    let index = fetch("model_index.json")?;
    for (file, required) in pipeline_files(fp16, is_xl_index(&index)) {
        match fetch(&file) {
            Err(e) if required => return Err(e),
            _ => {}
        }
    }
    Ok(index)
}

/// Whether a `model_index.json` names an SDXL pipeline (its files decide what else to fetch).
fn is_xl_index(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|index| {
            index
                .get("_class_name")?
                .as_str()
                .map(|c| c.starts_with("StableDiffusionXL"))
        })
        .unwrap_or(false)
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
    let missing =
        |file: &str, why: String| Error::Msg(format!("--model {spec}: {repo}/{file} {why}"));
    let index = if offline() {
        let cache = hf_hub::Cache::from_env().model(repo.to_string());
        let fetch = |file: &str| {
            cache.get(file).ok_or_else(|| {
                missing(
                    file,
                    "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download \
                     it once with the network on"
                        .into(),
                )
            })
        };
        fetch_pipeline(fp16, fetch)?
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| Error::Msg(format!("cannot reach the Hugging Face hub: {e}")))?
            .model(repo.to_string());
        let fetch = |file: &str| {
            api.get(file).map_err(|e| {
                missing(
                    file,
                    format!(
                        "cannot be downloaded: {e} (an unknown id, a gated model without a token, \
                         or no network; HF_HUB_OFFLINE=1 uses the cache)"
                    ),
                )
            })
        };
        fetch_pipeline(fp16, fetch)?
    };
    Ok(index
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}
