//! The models and LoRAs a server offers, by name, and the loaded ones. Clients name them from
//! the listings; a name is looked up there and never joined onto a path, so no name can reach
//! outside `--models-dir` or `--lora-dir`.

use super::lock;
use crate::hub::Preset;
use crate::pipeline::concepts::Concepts;
use crate::pipeline::source::SingleFileOptions;
use crate::pipeline::{LoadOptions, StableDiffusion};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The name the embedded default goes by.
pub const EMBEDDED_NAME: &str = "embedded";

/// One model a client can ask for.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    /// What `txt2img --model` would take: a folder, a file, a hub id or a short name.
    pub spec: String,
    #[serde(skip)]
    pub preset: Option<&'static Preset>,
}

impl ModelEntry {
    /// The server's default model: the embedded one, a short name or hub id, or a path named
    /// by its stem.
    pub fn for_model_flag(model: Option<&str>) -> anyhow::Result<Self> {
        Ok(match model {
            None => Self {
                name: EMBEDDED_NAME.into(),
                spec: crate::embedded::model_dir()?.display().to_string(),
                preset: Some(&crate::hub::EMBEDDED),
            },
            Some(spec) => {
                let path = Path::new(spec);
                let name = match path.exists() {
                    true => path
                        .file_stem()
                        .and_then(|n| n.to_str())
                        .unwrap_or(spec)
                        .to_string(),
                    false => spec.to_string(),
                };
                Self {
                    name,
                    spec: spec.to_string(),
                    preset: crate::hub::preset(spec),
                }
            }
        })
    }
}

/// One LoRA file in `--lora-dir`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraEntry {
    pub name: String,
    pub path: PathBuf,
}

/// A model and the LoRAs merged into it, by name, with their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    pub model: String,
    pub loras: Vec<(String, f64)>,
}

/// A model loaded and ready.
pub struct LoadedModel {
    pub choice: ModelChoice,
    pub name: String,
    pub sd: StableDiffusion,
    pub preset: Option<&'static Preset>,
    pub concepts: Option<Concepts>,
}

pub struct ModelStore {
    pub models: Vec<ModelEntry>,
    pub loras: Vec<LoraEntry>,
    load: LoadOptions,
    single_file: SingleFileOptions,
    /// The model requests get when they name none (A1111's `sd_model_checkpoint`).
    current: Mutex<String>,
    /// Loaded models, the most recently used last; at most `keep` of them.
    loaded: Mutex<Vec<Arc<LoadedModel>>>,
    keep: usize,
}

/// `--models-dir`'s entries: diffusers folders (with `model_index.json`) and `.safetensors`
/// files, sorted by name.
pub fn scan_models(dir: &Path) -> anyhow::Result<Vec<ModelEntry>> {
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("--models-dir {}", dir.display()))?
    {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let name = if path.join("model_index.json").is_file() {
            name.to_string()
        } else if path.is_file() && name.ends_with(".safetensors") {
            name.trim_end_matches(".safetensors").to_string()
        } else {
            continue;
        };
        found.push(ModelEntry {
            name,
            spec: path.display().to_string(),
            preset: None,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// `--lora-dir`'s `.safetensors` files, by stem, sorted.
pub fn scan_loras(dir: &Path) -> anyhow::Result<Vec<LoraEntry>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("--lora-dir {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_file() && name.ends_with(".safetensors") {
            found.push(LoraEntry {
                name: name.trim_end_matches(".safetensors").to_string(),
                path: path.clone(),
            });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

impl ModelStore {
    /// A store offering `models` (the first is the default) and `loras`, keeping at most
    /// `keep` loaded at once.
    pub fn new(
        models: Vec<ModelEntry>,
        loras: Vec<LoraEntry>,
        load: LoadOptions,
        single_file: SingleFileOptions,
        keep: usize,
    ) -> anyhow::Result<Self> {
        let Some(first) = models.first() else {
            bail!("the server has no model to offer");
        };
        let current = Mutex::new(first.name.clone());
        Ok(Self {
            models,
            loras,
            load,
            single_file,
            current,
            loaded: Mutex::new(Vec::new()),
            keep: keep.max(1),
        })
    }

    pub fn current(&self) -> String {
        lock(&self.current).clone()
    }

    /// Makes `name` the model of requests that name none.
    pub fn set_current(&self, name: &str) -> Result<String, String> {
        let entry = self.find_model(name)?;
        *lock(&self.current) = entry.name.clone();
        Ok(entry.name.clone())
    }

    /// The model called `name`: its name, or an A1111 title "name [hash]".
    pub fn find_model(&self, name: &str) -> Result<&ModelEntry, String> {
        let bare = strip_title_hash(name);
        self.models
            .iter()
            .find(|m| m.name == bare || m.spec == bare)
            .ok_or_else(|| {
                format!(
                    "no model \"{name}\" on this server; it has: {}",
                    self.models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    pub fn find_lora(&self, name: &str) -> Result<&LoraEntry, String> {
        self.loras.iter().find(|l| l.name == name).ok_or_else(|| {
            if self.loras.is_empty() {
                format!("no LoRA \"{name}\": the server has none (start it with --lora-dir)")
            } else {
                format!(
                    "no LoRA \"{name}\" on this server; it has: {}",
                    self.loras
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        })
    }

    /// The loaded model for `choice`, loading it (and dropping the least recently used beyond
    /// `keep`) when needed. Loading holds the store's lock, so two requests for the same new
    /// model load it once.
    pub fn get(&self, choice: &ModelChoice) -> anyhow::Result<Arc<LoadedModel>> {
        let mut loaded = lock(&self.loaded);
        if let Some(at) = loaded.iter().position(|m| &m.choice == choice) {
            let model = loaded.remove(at);
            loaded.push(model.clone());
            return Ok(model);
        }
        // Free the memory of models about to be dropped before taking more.
        while loaded.len() >= self.keep {
            loaded.remove(0);
        }
        let model = Arc::new(self.load(choice)?);
        loaded.push(model.clone());
        Ok(model)
    }

    fn load(&self, choice: &ModelChoice) -> anyhow::Result<LoadedModel> {
        let entry = self.find_model(&choice.model).map_err(anyhow::Error::msg)?;
        let mut options = self.load.clone();
        for (name, weight) in &choice.loras {
            let lora = self.find_lora(name).map_err(anyhow::Error::msg)?;
            options.loras.push((lora.path.clone(), *weight));
        }
        let started = std::time::Instant::now();
        let (sd, _) = StableDiffusion::load_model(&entry.spec, false, &self.single_file, options)
            .with_context(|| format!("loading model {}", entry.name))?;
        let concepts = Concepts::read(&sd.root)?;
        eprintln!(
            "loaded {}{} in {:.2} s",
            entry.name,
            match choice.loras.is_empty() {
                true => String::new(),
                false => format!(" with LoRA {:?}", choice.loras),
            },
            started.elapsed().as_secs_f64()
        );
        Ok(LoadedModel {
            choice: choice.clone(),
            name: entry.name.clone(),
            sd,
            preset: entry.preset,
            concepts,
        })
    }
}

/// "name [abcdef12]" -> "name": A1111 clients send a model's title.
fn strip_title_hash(title: &str) -> &str {
    match title.rsplit_once(" [") {
        Some((name, hash)) if hash.ends_with(']') => name,
        _ => title,
    }
}

/// `<lora:name:weight>` tags taken out of a prompt, as A1111 reads them: the prompt without
/// them, and each name with its weight (1 when left out).
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<(String, f64)>), String> {
    let mut rest = String::new();
    let mut loras = Vec::new();
    let mut text = prompt;
    while let Some(start) = text.find("<lora:") {
        rest.push_str(&text[..start]);
        let tag_body = &text[start + "<lora:".len()..];
        let Some(end) = tag_body.find('>') else {
            return Err(format!(
                "prompt: \"<lora:{tag_body}\" has no closing '>'; expected <lora:NAME:WEIGHT>"
            ));
        };
        let tag = &tag_body[..end];
        let (name, weight) = match tag.split_once(':') {
            Some((name, weight)) => {
                let weight: f64 = weight
                    .trim()
                    .parse()
                    .ok()
                    .filter(|w: &f64| w.is_finite() && w.abs() <= 10.0)
                    .ok_or_else(|| {
                        format!(
                            "prompt: <lora:{tag}> has weight \"{weight}\"; expected a number \
                             from -10 to 10"
                        )
                    })?;
                (name.trim(), weight)
            }
            None => (tag.trim(), 1.0),
        };
        if name.is_empty() {
            return Err("prompt: <lora:> names no LoRA; expected <lora:NAME:WEIGHT>".into());
        }
        loras.push((name.to_string(), weight));
        text = &tag_body[end + 1..];
    }
    rest.push_str(text);
    let cleaned = rest.split_whitespace().collect::<Vec<_>>().join(" ");
    let cleaned = cleaned.replace(" ,", ",");
    Ok((cleaned, loras))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_come_out_of_the_prompt_with_their_weights() {
        let (prompt, loras) = take_lora_tags("a cat <lora:ink:0.6>, sketch <lora:paper>").unwrap();
        assert_eq!(prompt, "a cat, sketch");
        assert_eq!(
            loras,
            vec![("ink".to_string(), 0.6), ("paper".to_string(), 1.0)]
        );
        for bad in [
            "<lora:ink:lots>",
            "<lora:ink",
            "<lora::0.5>",
            "<lora:x:1e9>",
        ] {
            let message = take_lora_tags(bad).unwrap_err();
            assert!(message.starts_with("prompt:"), "{bad}: {message}");
        }
        assert_eq!(
            take_lora_tags("no tags").unwrap(),
            ("no tags".into(), vec![])
        );
    }

    #[test]
    fn a1111_titles_name_the_model() {
        assert_eq!(strip_title_hash("sd15 [6ce0161689]"), "sd15");
        assert_eq!(strip_title_hash("plain"), "plain");
    }
}
