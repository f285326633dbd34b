//! Fine-tuning a Stable Diffusion U-Net on a folder of captioned images, fully or through LoRA
//! adapters on the attention projections (Hu et al. 2021). The VAE and text encoder stay frozen,
//! so every image's latent and caption states are computed once; a step is then one U-Net
//! forward and backward on the denoising loss of the model's own prediction type (DDPM eq. 14,
//! or v for v-prediction models).

pub use super::finetune_data::{mirror, TrainingData};
pub use super::unet_trainer::{offset_noise, FinetuneSettings, StepStats, UnetTrainer};
use crate::data::folder::{ImageFolder, Skipped};
use crate::error::{Error, Result};
use crate::model::config::{read_json, UNetConfig};
use crate::pipeline::txt2img::{txt2img, Txt2ImgRequest};
use crate::pipeline::StableDiffusion;
use crate::sampler::{build_sampler, SamplerKind, SamplerOptions};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// A fine-tune of a Stable Diffusion model: the trainer, the encoded folder, and the pipeline
/// (with the trained U-Net in it) for validation images.
pub struct FineTuner {
    pub trainer: UnetTrainer,
    pub data: TrainingData,
    pipeline: StableDiffusion,
}

impl FineTuner {
    /// Encodes every image of `folder` (skipping, and returning, those that fail to decode) and
    /// builds the trainable U-Net from `unet_dir` of the model `sd` was loaded from. The tuner
    /// keeps a copy of `sd` that shares its weights, with the trained U-Net in place of
    /// `sd.unet`: drop `sd` afterwards and its U-Net's memory is returned.
    pub fn new(
        sd: &StableDiffusion,
        unet_dir: &Path,
        folder: &ImageFolder,
        settings: FinetuneSettings,
    ) -> Result<(Self, Vec<Skipped>)> {
        settings.validate()?;
        let (data, skipped) =
            TrainingData::encode(sd, folder, settings.resolution, settings.random_flip)?;
        let config: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        let weights = crate::pipeline::weights_file(unet_dir, "diffusion_pytorch_model")?;
        let trainer = UnetTrainer::new(
            config,
            &weights,
            settings,
            sd.scheduler.noise_schedule()?,
            sd.scheduler.prediction_type,
            &sd.options.device,
        )?;
        let mut pipeline = sd.clone();
        pipeline.unet = trainer.unet.clone();
        Ok((
            Self {
                trainer,
                data,
                pipeline,
            },
            skipped,
        ))
    }

    pub fn step(&self) -> usize {
        self.trainer.step()
    }

    pub fn examples(&self) -> usize {
        self.data.len()
    }

    pub fn train_step(&mut self) -> Result<StepStats> {
        self.trainer.train_step(&self.data)
    }

    pub fn denoising_loss(&self) -> Result<f64> {
        self.trainer.denoising_loss(&self.data)
    }

    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.trainer.save_checkpoint(path, self.examples())
    }

    pub fn resume_from(&mut self, path: &Path) -> Result<()> {
        self.trainer.resume_from(path, self.examples())
    }

    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.trainer.weights()
    }

    pub fn write_output(&self, model_root: &Path, out: &Path) -> Result<PathBuf> {
        self.trainer.write_output(model_root, out)
    }

    /// One image per prompt from the weights the output will hold (the average when there is
    /// one), with the model's own sampler, fixed seed and `steps` steps at `guidance`, written as
    /// `<dir>/step-<step>-<k>.png`.
    pub fn validation_images(
        &self,
        prompts: &[String],
        steps: usize,
        guidance: f64,
        dir: &Path,
    ) -> Result<Vec<PathBuf>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let scheduler = &self.pipeline.scheduler;
        let kind = scheduler.class_kind()?.unwrap_or(SamplerKind::Ddim);
        let sampler = build_sampler(kind, scheduler, &SamplerOptions::default(), steps)?;
        let size = self.trainer.settings.resolution as usize;
        self.trainer.state.with_output_weights(|| {
            let mut paths = Vec::with_capacity(prompts.len());
            for (k, prompt) in prompts.iter().enumerate() {
                let request = Txt2ImgRequest {
                    guidance,
                    seed: self.trainer.settings.seed,
                    ..Txt2ImgRequest::new(prompt.clone(), size, size)
                };
                let output = txt2img(&self.pipeline, sampler.as_ref(), &request, &mut |_| Ok(()))?;
                let path = dir.join(format!("step-{:06}-{k}.png", self.trainer.step()));
                crate::image_io::save_png(&output.images.get(0)?, &path, Some(prompt))?;
                paths.push(path);
            }
            Ok(paths)
        })
    }
}

/// The validation images drawn before training, every N steps and at the end.
#[derive(Debug, Clone)]
pub struct Validation {
    pub prompts: Vec<String>,
    /// Sampler steps of an image.
    pub steps: usize,
    pub guidance: f64,
}

/// A fine-tune in a training session: the tuner and its validation images.
pub struct FinetuneRun {
    pub tuner: FineTuner,
    pub validation: Validation,
}

impl super::session::Trainer for FinetuneRun {
    fn step(&self) -> usize {
        self.tuner.step()
    }

    fn columns(&self) -> &'static [&'static str] {
        &["loss", "grad_norm", "learning_rate"]
    }

    fn train_step(&mut self) -> Result<Vec<f64>> {
        let stats = self.tuner.train_step()?;
        Ok(vec![stats.loss, stats.grad_norm, stats.learning_rate])
    }

    fn save(&mut self, out_dir: &Path) -> Result<()> {
        self.tuner
            .save_checkpoint(&out_dir.join(super::session::CHECKPOINT_FILE))
    }

    /// `validation/step-<step>-<k>.png`, one per prompt.
    fn sample(&mut self, out_dir: &Path, _step: usize) -> Result<()> {
        let v = &self.validation;
        for path in self.tuner.validation_images(
            &v.prompts,
            v.steps,
            v.guidance,
            &out_dir.join("validation"),
        )? {
            eprintln!("validation image {}", path.display());
        }
        Ok(())
    }
}
