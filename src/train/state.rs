//! What every trainer keeps between steps: the trainable variables, AdamW with its moments, the
//! optional weight average, and the step count; applying one step's gradients; and the one
//! checkpoint layout all trainers write and read.
//!
//! The layout: tensors `model.<name>` (the weights), `ema.<name>` (their average, when kept),
//! `optim.m.<name>` and `optim.v.<name>` (AdamW's moments); metadata `format` =
//! [`CHECKPOINT_FORMAT`], `diffuse.trainer` (which trainer wrote it), `diffuse.step` and
//! `diffuse.config` (the run's config as TOML). A trainer with more than one optimiser (the VAE's
//! discriminator) gives the second one a name prefix.

use super::optim::{clip_factor, AdamW, AdamWParams, LrSchedule};
use super::Ema;
use crate::checkpoint::{self, Loaded};
use crate::error::{file_error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;

/// The `format` metadata value of a training checkpoint.
pub const CHECKPOINT_FORMAT: &str = "diffuse-training-checkpoint";
const TRAINER_KEY: &str = "diffuse.trainer";
const STEP_KEY: &str = "diffuse.step";
const CONFIG_KEY: &str = "diffuse.config";

/// Which trainer wrote a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerKind {
    Pixel,
    Latent,
    Vae,
    Finetune,
    Judge,
}

impl TrainerKind {
    pub fn name(self) -> &'static str {
        match self {
            TrainerKind::Pixel => "pixel",
            TrainerKind::Latent => "latent",
            TrainerKind::Vae => "vae",
            TrainerKind::Finetune => "finetune",
            TrainerKind::Judge => "judge",
        }
    }

    /// The command that trains this kind, for messages.
    fn command(self) -> &'static str {
        match self {
            TrainerKind::Pixel | TrainerKind::Latent => "diffuse train",
            TrainerKind::Vae => "diffuse train-vae",
            TrainerKind::Finetune => "diffuse finetune",
            TrainerKind::Judge => "diffuse train-judge",
        }
    }

    /// The `format` and config key of the layouts written before [`CHECKPOINT_FORMAT`]: the
    /// same tensors under another format name and config key (fine-tuning's is refused, see
    /// [`read_header`]).
    fn earlier_layout(self) -> Option<(&'static str, &'static str)> {
        match self {
            TrainerKind::Pixel => Some(("diffuse-pixel-ddpm", "diffuse.train_config")),
            TrainerKind::Latent => Some(("diffuse-ldm", "diffuse.ldm_train_config")),
            TrainerKind::Vae => Some(("diffuse-vae", "diffuse.vae_train_config")),
            TrainerKind::Finetune | TrainerKind::Judge => None,
        }
    }
}

/// The learning rate of each step, clipping and AdamW: what turns gradients into an update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRule {
    pub learning_rate: LrSchedule,
    /// Global gradient-norm clipping; 0 turns it off.
    pub grad_clip: f64,
    pub adamw: AdamWParams,
}

/// What applying one step's gradients measured.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub grad_norm: f64,
    pub learning_rate: f64,
}

/// Trainable variables (sorted by name), their optimiser and average, and the step.
pub struct TrainerState {
    named: Vec<(String, Var)>,
    vars: Vec<Var>,
    optimizer: AdamW,
    ema: Option<Ema>,
    rule: UpdateRule,
    /// Checkpoint name prefix of these variables ("" for the model itself).
    prefix: String,
    /// Completed optimiser steps.
    pub step: usize,
}

impl TrainerState {
    /// A state over `named` starting at step 0; `ema_decay` keeps a weight average
    /// (DDPM appendix B) when given.
    pub fn new(
        named: Vec<(String, Var)>,
        rule: UpdateRule,
        ema_decay: Option<f64>,
    ) -> Result<Self> {
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = AdamW::new(&vars, rule.adamw)?;
        let ema = match ema_decay {
            Some(decay) => Some(Ema::new(decay, &named)?),
            None => None,
        };
        Ok(Self {
            named,
            vars,
            optimizer,
            ema,
            rule,
            prefix: String::new(),
            step: 0,
        })
    }

    /// The same state whose checkpoint names start with `prefix` (a second optimiser's).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    pub fn named(&self) -> &[(String, Var)] {
        &self.named
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The learning rate of the current step.
    pub fn learning_rate(&self) -> f64 {
        self.rule.learning_rate.at(self.step)
    }

    /// One update from `grads`: the global norm (an error when it is not finite, before anything
    /// changes), the step's learning rate, clipping, AdamW, the average; then the step counts.
    pub fn apply(&mut self, grads: &GradStore) -> Result<Applied> {
        let grad_norm = super::checked_grad_norm(&self.vars, grads, self.step)?;
        let learning_rate = self.learning_rate();
        self.optimizer.step(
            &self.vars,
            grads,
            learning_rate,
            clip_factor(grad_norm, self.rule.grad_clip),
        )?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.named, self.step)?;
        }
        self.step += 1;
        Ok(Applied {
            grad_norm,
            learning_rate,
        })
    }

    /// The weights as they are now (copies: the variables change in place).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.named
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?.detach())))
            .collect()
    }

    /// What a trained model is made of: the average when there is one, else the weights.
    pub fn output_weights(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.ema {
            Some(ema) => Ok(self
                .named
                .iter()
                .zip(&ema.average)
                .map(|((name, _), average)| (name.clone(), average.clone()))
                .collect()),
            None => self.weights(),
        }
    }

    /// Runs `f` with the output weights in the variables, then puts the trained ones back.
    pub fn with_output_weights<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(ema) = &self.ema else {
            return f();
        };
        let trained = self.weights()?;
        for ((_, var), average) in self.named.iter().zip(&ema.average) {
            var.set(average)?;
        }
        let result = f();
        for ((_, var), (_, value)) in self.named.iter().zip(&trained) {
            var.set(value)?;
        }
        result
    }

    /// This state's checkpoint tensors: weights, average, moments.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let names: Vec<String> = self
            .named
            .iter()
            .map(|(name, _)| format!("{}{name}", self.prefix))
            .collect();
        let mut tensors = Vec::with_capacity(4 * names.len());
        for (i, (name, (_, var))) in names.iter().zip(&self.named).enumerate() {
            tensors.push((format!("model.{name}"), var.as_tensor().detach()));
            if let Some(ema) = &self.ema {
                tensors.push((format!("ema.{name}"), ema.average[i].clone()));
            }
        }
        tensors.extend(
            self.optimizer
                .moment_tensors(names.iter().map(String::as_str)),
        );
        tensors
    }

    /// Reads back what [`Self::checkpoint_tensors`] wrote, at step `step`; errors name the file
    /// and the tensor.
    pub fn restore(&mut self, loaded: &Loaded, path: &Path, step: usize) -> Result<()> {
        let names: Vec<String> = self
            .named
            .iter()
            .map(|(name, _)| format!("{}{name}", self.prefix))
            .collect();
        for (i, (name, (_, var))) in names.iter().zip(&self.named).enumerate() {
            var.set(&loaded.tensor_like(path, &format!("model.{name}"), var.dims())?)?;
            if let Some(ema) = &mut self.ema {
                ema.average[i] = loaded.tensor_like(path, &format!("ema.{name}"), var.dims())?;
            }
        }
        self.optimizer.restore(
            loaded,
            path,
            names.iter().map(String::as_str),
            &self.vars,
            step,
        )?;
        self.step = step;
        Ok(())
    }
}

/// What a checkpoint says of itself.
#[derive(Debug, Clone)]
pub struct CheckpointHeader {
    pub step: usize,
    /// The config of the run that wrote it, as TOML.
    pub config: String,
}

/// The metadata a checkpoint of `kind` at `step` with `config` (TOML) carries.
pub fn checkpoint_metadata(
    kind: TrainerKind,
    step: usize,
    config: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
        (TRAINER_KEY.to_string(), kind.name().to_string()),
        (STEP_KEY.to_string(), step.to_string()),
        (CONFIG_KEY.to_string(), config.to_string()),
    ])
}

/// Writes `tensors` with the metadata of `kind` at `step` atomically.
pub fn save_checkpoint(
    path: &Path,
    kind: TrainerKind,
    step: usize,
    config: &str,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    checkpoint::save(path, tensors, &checkpoint_metadata(kind, step, config))
}

/// The step and config of a checkpoint that `kind` may resume. The layouts the pixel, latent and
/// VAE trainers wrote before this one (same tensors, their own format name and config key) are
/// read; fine-tuning's earlier layout (`param.` tensors and a settings line) and checkpoints of
/// another trainer are refused, naming what differs.
pub fn read_header(loaded: &Loaded, path: &Path, kind: TrainerKind) -> Result<CheckpointHeader> {
    let format = loaded.meta(path, "format")?;
    let config_key = if format == CHECKPOINT_FORMAT {
        let written_by = loaded.meta(path, TRAINER_KEY)?;
        if written_by != kind.name() {
            return Err(file_error(
                path,
                format!(
                    "is a checkpoint of the {written_by} trainer; {} resumes {} checkpoints only",
                    kind.command(),
                    kind.name()
                ),
            ));
        }
        CONFIG_KEY
    } else if format == "diffuse-finetune" && kind == TrainerKind::Finetune {
        return Err(file_error(
            path,
            "is a fine-tuning checkpoint of the earlier layout (`param.` tensors and a one-line \
             settings string); this version writes `model.` tensors with the settings as TOML, \
             like every trainer. Resume it with the diffuse that wrote it, or start again"
                .to_string(),
        ));
    } else {
        match kind.earlier_layout() {
            Some((earlier_format, earlier_key)) if format == earlier_format => earlier_key,
            _ => {
                return Err(file_error(
                    path,
                    format!(
                        "has format \"{format}\"; {} resumes \"{CHECKPOINT_FORMAT}\" files of \
                         the {} trainer",
                        kind.command(),
                        kind.name()
                    ),
                ))
            }
        }
    };
    Ok(CheckpointHeader {
        step: loaded.step(path, STEP_KEY)?,
        config: loaded.meta(path, config_key)?.to_string(),
    })
}

/// Opens the checkpoint at `path` for a `kind` run whose config is `current` (TOML): its layout
/// read (see [`read_header`]), its saved config passed through `normalise` (parsed and written
/// again as the trainer writes it, so that spacing and defaults are not differences), and the
/// two configs required to agree on `sections`. Returns the file's tensors and its step.
pub fn open_for_resume(
    path: &Path,
    device: &candle_core::Device,
    kind: TrainerKind,
    current: &str,
    sections: &[&str],
    normalise: impl Fn(&str) -> Result<String>,
) -> Result<(Loaded, usize)> {
    let loaded = checkpoint::load(path, device)?;
    let header = read_header(&loaded, path, kind)?;
    let saved = normalise(&header.config)
        .map_err(|e| file_error(path, format!("its training config is not valid: {e}")))?;
    check_same_sections(path, &saved, current, sections)?;
    Ok((loaded, header.step))
}

/// Settings that only say where a run starts (the weights it starts from): a resumed run
/// starts from its checkpoint, so they may differ.
const STARTING_ONLY: [&str; 1] = ["model.init"];

/// The values of `sections` that differ between two TOML configs, each as
/// `section.key (checkpoint: saved, this run: current)`: what a refusal to resume names.
pub fn differences(saved: &str, current: &str, sections: &[&str]) -> Vec<String> {
    let parse = |text: &str| text.parse::<toml::Table>().unwrap_or_default();
    let (saved, current) = (parse(saved), parse(current));
    let shown = |value: Option<&toml::Value>| match value {
        Some(v) => v.to_string(),
        None => "unset".to_string(),
    };
    let mut differing = Vec::new();
    for section in sections {
        // A section is a table of keys, or (`images`) one value named by the section itself.
        let entries = |t: &toml::Table| -> toml::Table {
            match t.get(*section) {
                Some(toml::Value::Table(inner)) => inner.clone(),
                Some(other) => toml::Table::from_iter([(String::new(), other.clone())]),
                None => toml::Table::new(),
            }
        };
        let (a, b) = (entries(&saved), entries(&current));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            if a.get(key) != b.get(key) {
                let name = if key.is_empty() {
                    section.to_string()
                } else {
                    format!("{section}.{key}")
                };
                if STARTING_ONLY.contains(&name.as_str()) {
                    continue;
                }
                differing.push(format!(
                    "{name} (checkpoint: {}, this run: {})",
                    shown(a.get(key)),
                    shown(b.get(key))
                ));
            }
        }
    }
    differing
}

/// An error unless the saved and current configs agree on `sections`.
pub fn check_same_sections(
    path: &Path,
    saved: &str,
    current: &str,
    sections: &[&str],
) -> Result<()> {
    let differing = differences(saved, current, sections);
    if differing.is_empty() {
        return Ok(());
    }
    Err(file_error(
        path,
        format!(
            "was trained with other settings than this run: {}; resume with the same ones (the \
             step count, logging and checkpoint cadence may change)",
            differing.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn header(entries: &[(&str, &str)]) -> Loaded {
        Loaded {
            tensors: HashMap::new(),
            metadata: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn earlier_layouts_are_read_or_refused_by_name() {
        let path = Path::new("run/checkpoint.safetensors");
        // This layout, and the pixel, latent and VAE layouts before it (their own format name
        // and config key, the same tensors), are read.
        let current = header(&[
            ("format", CHECKPOINT_FORMAT),
            (TRAINER_KEY, "vae"),
            (STEP_KEY, "7"),
            (CONFIG_KEY, "[model]"),
        ]);
        let read = read_header(&current, path, TrainerKind::Vae).unwrap();
        assert_eq!((read.step, read.config.as_str()), (7, "[model]"));
        for (kind, format, key) in [
            (
                TrainerKind::Pixel,
                "diffuse-pixel-ddpm",
                "diffuse.train_config",
            ),
            (
                TrainerKind::Latent,
                "diffuse-ldm",
                "diffuse.ldm_train_config",
            ),
            (TrainerKind::Vae, "diffuse-vae", "diffuse.vae_train_config"),
        ] {
            let earlier = header(&[("format", format), (STEP_KEY, "3"), (key, "[data]")]);
            let read = read_header(&earlier, path, kind).unwrap();
            assert_eq!((read.step, read.config.as_str()), (3, "[data]"), "{format}");
        }
        // Fine-tuning's earlier layout is refused, saying what changed.
        let finetune = header(&[("format", "diffuse-finetune"), ("step", "3")]);
        let err = read_header(&finetune, path, TrainerKind::Finetune)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checkpoint.safetensors") && err.contains("`param.`"),
            "{err}"
        );
        // Another trainer's checkpoint, of either layout, is refused naming the trainer.
        let err = read_header(&current, path, TrainerKind::Pixel)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vae trainer") && err.contains("diffuse train"),
            "{err}"
        );
        let earlier_vae = header(&[("format", "diffuse-vae"), (STEP_KEY, "3")]);
        let err = read_header(&earlier_vae, path, TrainerKind::Latent)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"diffuse-vae\""), "{err}");
    }

    #[test]
    fn differences_name_each_changed_value_with_both_sides() {
        let saved = "images = 4\n[model]\na = 1\nb = [1, 2]\n[train]\nsteps = 5\n";
        let current = "images = 4\n[model]\na = 1\nb = [1, 3]\nc = true\n[train]\nsteps = 9\n";
        assert_eq!(
            differences(saved, current, &["images", "model"]),
            vec![
                "model.b (checkpoint: [1, 2], this run: [1, 3])".to_string(),
                "model.c (checkpoint: unset, this run: true)".to_string()
            ]
        );
        assert_eq!(
            differences("images = 4", "images = 5", &["images"]),
            vec!["images (checkpoint: 4, this run: 5)".to_string()]
        );
        assert!(differences(saved, saved, &["model", "train"]).is_empty());
        // Where a run started from does not bind its resumption.
        let started = "[model]\na = 1\ninit = \"earlier/pipeline\"\n";
        assert!(differences("[model]\na = 1\n", started, &["model"]).is_empty());
    }
}
