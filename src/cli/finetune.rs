//! `diffuse finetune`: fine-tunes a Stable Diffusion U-Net on a folder of captioned images,
//! fully or with LoRA, and writes what `txt2img --model` or `--lora` loads.

use super::session_args::{report, Cadence, SessionArgs};
use crate::data::folder::{FolderOptions, ImageFolder, MissingCaption};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::train::finetune::{FineTuner, FinetuneRun, FinetuneSettings, Validation};
use crate::train::session::{check_out_dir, run_session, LOSS_CSV};
use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every option is a flag and a key of the `--config` TOML file (the flag's name with
/// underscores; `validation_prompts` is a list); a flag given on the command line wins.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneArgs {
    /// A TOML file holding any of these options (configs/finetune-example.toml); its relative
    /// paths are taken from its folder.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The model to start from: a diffusers folder, a hub id or a short name (sd15, sd-turbo...).
    #[arg(long)]
    pub model: Option<String>,
    /// With a single-file --model: a diffusers folder whose configs and tokenizers to use
    /// instead of the built-in ones (the file is converted to a folder in the cache first).
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    /// Where to train: auto (the GPU when this binary has CUDA and the machine a GPU, else the
    /// CPU), cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    pub device: Option<String>,
    /// The folder of images with captions (metadata.jsonl or <stem>.txt).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where the result goes: OUT_DIR/pytorch_lora_weights.safetensors for LoRA, a whole
    /// diffusers folder for a full fine-tune; loss.csv, loss.png, validation/ and the checkpoint
    /// beside.
    #[arg(long, alias = "out")]
    #[serde(alias = "out")]
    pub out_dir: Option<PathBuf>,
    /// Train LoRA adapters of this rank on the attention projections instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA adapters on the transformer feed-forward layers too.
    #[arg(long)]
    pub lora_feed_forward: bool,
    /// Training size in pixels, square (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Mirror each image left-right with probability 1/2 at every step.
    #[arg(long)]
    pub random_flip: bool,
    /// Optimiser steps [default: 200].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate [default: 1e-4 for LoRA, 1e-5 for a full fine-tune].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Linear learning-rate warm-up steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Images per forward pass [default: 1].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Forward passes per optimiser step (effective batch = batch size x this) [default: 1].
    #[arg(long)]
    pub gradient_accumulation: Option<usize>,
    /// Gradient-norm clipping, 0 turns it off [default: 1].
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Min-SNR-gamma loss weighting (5 is the paper's choice) [default: off].
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (0.05 to 0.1 is usual) [default: 0].
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999) and write
    /// it as the output [default: off].
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// One caption for every image (DreamBooth-style instance prompt), instead of their own.
    #[arg(long)]
    pub caption: Option<String>,
    /// Skip images without a caption instead of stopping.
    #[arg(long)]
    pub skip_uncaptioned: bool,
    /// Save OUT_DIR/checkpoint.safetensors (trainable weights, optimiser state, step) this
    /// often, and on Ctrl-C and at --time-limit [default: 100].
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Write a loss.csv row (the means since the last) this often [default: 10].
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Stop after this many minutes of training, saving as at the last step; --resume goes on.
    #[arg(long)]
    #[serde(skip)]
    pub time_limit: Option<f64>,
    /// A prompt to draw a validation image of, before training, every --validation-every steps
    /// and at the end (OUT_DIR/validation/step-<step>-<k>.png); repeatable.
    #[arg(long = "validation-prompt")]
    pub validation_prompts: Vec<String>,
    /// [default: --checkpoint-every]
    #[arg(long)]
    pub validation_every: Option<usize>,
    /// Sampler steps of a validation image [default: 20].
    #[arg(long)]
    pub validation_steps: Option<usize>,
    /// Guidance scale of a validation image [default: 7.5].
    #[arg(long)]
    pub validation_guidance: Option<f64>,
    /// Continue from OUT_DIR/checkpoint.safetensors (same settings) up to --steps.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

impl FinetuneArgs {
    /// Takes the relative paths of a config file from its folder `base`: the data, output and
    /// config folders always, the model when it names something there (else it is a hub id or
    /// short name).
    fn rebase(&mut self, base: &std::path::Path) {
        use crate::train::config::relative_to;
        for path in [&mut self.data, &mut self.out_dir, &mut self.model_config]
            .into_iter()
            .flatten()
        {
            relative_to(base, path);
        }
        if let Some(model) = &mut self.model {
            let local = base.join(&*model);
            if std::path::Path::new(model.as_str()).is_relative() && local.exists() {
                *model = local.display().to_string();
            }
        }
    }

    /// The options of the `--config` file with the command line's on top (a flag counts as
    /// given when it is set, true, or names at least one value).
    pub fn merged(self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut file: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        file.rebase(crate::train::config::config_dir(&path));
        let mut merged = serde_json::to_value(file)?;
        let given = serde_json::to_value(&self)?;
        if let (Some(merged), Some(given)) = (merged.as_object_mut(), given.as_object()) {
            for (key, value) in given {
                let unset = value.is_null()
                    || *value == serde_json::Value::Bool(false)
                    || value.as_array().is_some_and(|a| a.is_empty());
                if !unset {
                    merged.insert(key.clone(), value.clone());
                }
            }
        }
        let mut merged: Self = serde_json::from_value(merged)?;
        merged.config = self.config;
        merged.resume = self.resume;
        merged.json = self.json;
        merged.time_limit = self.time_limit;
        Ok(merged)
    }
}

/// A required option: the flag or the config key.
fn required<T: Clone>(value: &Option<T>, flag: &str) -> anyhow::Result<T> {
    value.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "--{flag} is required (or `{}` in the --config file)",
            flag.replace('-', "_")
        )
    })
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    let model = required(&args.model, "model")?;
    let data_dir = required(&args.data, "data")?;
    let out_dir = required(&args.out_dir, "out-dir")?;
    let checkpoint_every = args.checkpoint_every.unwrap_or(100);
    let session = SessionArgs {
        device: args.device.clone().unwrap_or_else(|| "auto".into()),
        out_dir: Some(out_dir.clone()),
        steps: args.steps,
        resume: args.resume,
        time_limit: args.time_limit,
        json: args.json,
    };
    let settings = session.settings(
        out_dir.clone(),
        200,
        Cadence {
            log_every: args.log_every.unwrap_or(10),
            checkpoint_every,
            sample_every: if args.validation_prompts.is_empty() {
                0
            } else {
                args.validation_every.unwrap_or(checkpoint_every)
            },
        },
    )?;
    let validation = Validation {
        prompts: args.validation_prompts.clone(),
        steps: args.validation_steps.unwrap_or(20),
        guidance: args.validation_guidance.unwrap_or(7.5),
    };
    anyhow::ensure!(
        validation.steps > 0,
        "--validation-steps = 0 is not allowed; expected at least 1"
    );
    let folder = ImageFolder::scan(
        &data_dir,
        &FolderOptions {
            caption: args.caption.clone(),
            missing_caption: if args.skip_uncaptioned {
                MissingCaption::Skip
            } else {
                MissingCaption::Fail
            },
        },
    )?;
    let root = model_folder(&model, args.model_config.clone())?;
    let options = LoadOptions {
        device: session.device()?,
        ..Default::default()
    };
    let sd = StableDiffusion::load_dir(&root, options)
        .with_context(|| format!("loading {}", root.display()))?;
    let resolution = match args.resolution {
        Some(r) => r,
        None => (sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor()) as u32,
    };
    let lora = args.lora_rank.is_some();
    anyhow::ensure!(
        lora || !args.lora_feed_forward,
        "--lora-feed-forward needs --lora-rank (a full fine-tune trains the feed-forward anyway)"
    );
    let finetune = FinetuneSettings {
        resolution,
        lora_rank: args.lora_rank,
        lora_feed_forward: args.lora_feed_forward,
        learning_rate: args.learning_rate.unwrap_or(if lora { 1e-4 } else { 1e-5 }),
        warmup_steps: args.warmup_steps.unwrap_or(0),
        batch_size: args.batch_size.unwrap_or(1),
        gradient_accumulation: args.gradient_accumulation.unwrap_or(1),
        grad_clip: args.grad_clip.unwrap_or(1.0),
        min_snr_gamma: args.min_snr_gamma,
        noise_offset: args.noise_offset.unwrap_or(0.0),
        ema_decay: args.ema_decay,
        random_flip: args.random_flip,
        seed: args.seed.unwrap_or(0),
    };
    let checkpoint = check_out_dir(&out_dir, settings.resume)?;
    eprintln!(
        "encoding {} images at {resolution}x{resolution} ({} skipped while scanning, {} other files ignored)",
        folder.examples.len(),
        folder.skipped.len(),
        folder.ignored
    );
    let (mut tuner, decode_skipped) = FineTuner::new(&sd, &root.join("unet"), &folder, finetune)?;
    // The tuner holds the pipeline with its own U-Net; the loaded one is no longer needed.
    drop(sd);
    let skipped: Vec<_> = folder.skipped.iter().chain(&decode_skipped).collect();
    for s in &skipped {
        eprintln!("skipped {}: {}", s.path.display(), s.reason);
    }
    eprintln!(
        "{} fine-tuning: {:.2} M trainable parameters on {} images",
        if lora { "LoRA" } else { "full" },
        tuner.trainer.trainable_parameters() as f64 / 1e6,
        tuner.examples()
    );
    let loss_before = tuner.denoising_loss()?;
    if settings.resume {
        tuner.resume_from(&checkpoint)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), tuner.step());
    }
    let mut run = FinetuneRun { tuner, validation };
    if !settings.resume {
        use crate::train::session::Trainer;
        run.sample(&out_dir, 0)?;
    }
    let summary = run_session(&mut run, &settings)?;
    let tuner = run.tuner;
    let loss_after = tuner.denoising_loss()?;
    let output = tuner.write_output(&root, &out_dir)?;
    let mut json = report(
        &summary,
        &format!(
            "denoising loss {loss_before:.5} -> {loss_after:.5} ({:+.1}%); wrote {}{}",
            100.0 * (loss_after / loss_before - 1.0),
            output.display(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; {} files skipped", skipped.len())
            }
        ),
    );
    if args.json {
        for (key, value) in [
            ("loss_before", serde_json::json!(loss_before)),
            ("loss_after", serde_json::json!(loss_after)),
            (
                "seconds_per_step",
                serde_json::json!(summary.seconds / summary.steps_run.max(1) as f64),
            ),
            ("images", serde_json::json!(tuner.examples())),
            (
                "trainable_parameters",
                serde_json::json!(tuner.trainer.trainable_parameters()),
            ),
            (
                "mode",
                serde_json::json!(if lora { "lora" } else { "full" }),
            ),
            (
                "skipped",
                serde_json::json!(skipped
                    .iter()
                    .map(|s| serde_json::json!({
                        "file": s.path.display().to_string(),
                        "reason": s.reason,
                    }))
                    .collect::<Vec<_>>()),
            ),
            ("output", serde_json::json!(output.display().to_string())),
            (
                "loss_csv",
                serde_json::json!(out_dir.join(LOSS_CSV).display().to_string()),
            ),
        ] {
            json.insert(key.into(), value);
        }
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}

/// The diffusers folder to fine-tune: a single file converted once into the cache (with the
/// configs of `model_config` when given), or a folder or hub id resolved.
fn model_folder(model: &str, model_config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if Path::new(model).is_file() {
        let options = crate::pipeline::source::SingleFileOptions {
            config_dir: model_config,
            ..Default::default()
        };
        let dir = crate::pipeline::convert::cached_folder(Path::new(model), &options)?;
        eprintln!(
            "{model}: a single file, fine-tuned from its diffusers folder {}",
            dir.display()
        );
        Ok(dir)
    } else {
        anyhow::ensure!(
            model_config.is_none(),
            "--model-config is for a single-file --model; {model} is a folder or hub id"
        );
        Ok(crate::hub::resolve(model, false)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_holds_only_known_keys() {
        let config: FinetuneArgs =
            toml::from_str(include_str!("../../configs/finetune-example.toml")).unwrap();
        assert_eq!(config.lora_rank, Some(4));
        assert_eq!(config.validation_prompts.len(), 1);
    }

    #[test]
    fn flags_override_the_file_and_unset_flags_keep_it() {
        let dir = std::env::temp_dir().join(format!("diffuse-ft-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "steps = 50\nseed = 3\nrandom_flip = true\n").unwrap();
        let given = FinetuneArgs {
            config: Some(path),
            steps: Some(7),
            json: true,
            ..Default::default()
        };
        let merged = given.merged().unwrap();
        assert_eq!(merged.steps, Some(7));
        assert_eq!(merged.seed, Some(3));
        assert!(merged.random_flip && merged.json);
        std::fs::remove_dir_all(&dir).ok();
    }
}
