//! The settings of `diffuse finetune`, every default resolved (the command line and its
//! `--config` file map onto them).

use crate::error::{Error, Result};

/// How to fine-tune, every default resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FinetuneSettings {
    /// Square training size in pixels.
    pub resolution: u32,
    /// LoRA rank; `None` trains every U-Net weight.
    pub lora_rank: Option<usize>,
    /// LoRA adapters on the transformer feed-forward layers too, not only the attention.
    pub lora_feed_forward: bool,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Images in one forward pass.
    pub batch_size: usize,
    /// Forward passes whose gradients add up to one optimiser step: the effective batch is
    /// `batch_size * gradient_accumulation` at the memory of `batch_size`.
    pub gradient_accumulation: usize,
    pub grad_clip: f64,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice); `None` is plain MSE.
    pub min_snr_gamma: Option<f64>,
    /// Scale of a per-image, per-channel constant added to the noise (Guttenberg 2023's "noise
    /// offset"), which lets the model change an image's mean brightness; 0 is off.
    pub noise_offset: f64,
    /// Decay of an exponential moving average of the trained weights, which is then what the
    /// output and the validation images use; `None` is off.
    pub ema_decay: Option<f64>,
    /// Each step sees every image mirrored left-right with probability 1/2 (both latents are
    /// encoded up front).
    pub random_flip: bool,
    pub seed: u64,
}

impl Default for FinetuneSettings {
    fn default() -> Self {
        Self {
            resolution: 512,
            lora_rank: None,
            lora_feed_forward: false,
            learning_rate: 1e-5,
            warmup_steps: 0,
            batch_size: 1,
            gradient_accumulation: 1,
            grad_clip: 1.0,
            min_snr_gamma: None,
            noise_offset: 0.0,
            ema_decay: None,
            random_flip: false,
            seed: 0,
        }
    }
}

impl FinetuneSettings {
    /// The checks every caller of the trainer needs, naming the flag at fault.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::bad_value("--batch-size", 0, "at least 1"));
        }
        if self.gradient_accumulation == 0 {
            return Err(Error::bad_value("--gradient-accumulation", 0, "at least 1"));
        }
        if self.lora_rank == Some(0) {
            return Err(Error::bad_value("--lora-rank", 0, "at least 1"));
        }
        if let Some(gamma) = self.min_snr_gamma {
            if !(gamma > 0.0 && gamma.is_finite()) {
                return Err(Error::bad_value(
                    "--min-snr-gamma",
                    gamma,
                    "a positive number",
                ));
            }
        }
        if !(self.noise_offset >= 0.0 && self.noise_offset.is_finite()) {
            return Err(Error::bad_value(
                "--noise-offset",
                self.noise_offset,
                "0 or a positive number",
            ));
        }
        if let Some(decay) = self.ema_decay {
            if !(0.0..1.0).contains(&decay) {
                return Err(Error::bad_value("--ema-decay", decay, "a number in [0, 1)"));
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::bad_value(
                "--learning-rate",
                self.learning_rate,
                "a positive number",
            ));
        }
        Ok(())
    }
}
