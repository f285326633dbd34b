//! Classifier-free guidance (Ho & Salimans 2022, eq. 6) around the U-Net, with the rescale of
//! Lin et al. 2023 (section 3.4) and the limited guidance interval of Kynkäänniemi et al. 2024,
//! as one `Denoiser`.

use crate::diffusion::schedule::interp;
use crate::model::unet::{UNet2DConditionModel, UNetConditioning};
use crate::sampler::{Denoiser, PredictionType};
use candle_core::{DType, Result, Tensor};

pub struct GuidedUNet<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// Batched 2B: the unconditional rows first, then the conditional (diffusers' order).
    pub conditioning: UNetConditioning,
    /// w in eps = eps_uncond + w (eps_cond - eps_uncond); at or below 1 only the conditional
    /// half runs.
    pub guidance: f64,
    /// phi of Lin et al. 2023, eq. 15/16 (0 = off).
    pub guidance_rescale: f64,
    /// Guide only where the noise level is inside this interval (None: everywhere).
    pub interval: Option<GuidanceInterval>,
    pub prediction_type: PredictionType,
    pub dtype: DType,
    /// Channels appended to every U-Net input, (B, C, h, w): an inpainting U-Net's downsampled
    /// mask and masked-image latents.
    pub extra_channels: Option<Tensor>,
    /// Inpainting with an ordinary U-Net: the known region put back after every update.
    pub blend: Option<KnownRegion>,
}

/// Inpainting with a U-Net that knows nothing of masks (diffusers' blend for 4-channel models;
/// Lugmayr et al. 2022 without resampling): after update i the sample outside the mask is
/// replaced by the image's latents noised to the level of the next step (unnoised after the
/// last).
#[derive(Debug, Clone)]
pub struct KnownRegion {
    /// 1 where the model draws, 0 where the image is kept; (1, 1, h, w).
    pub mask: Tensor,
    /// The image's latents at the noise level after each update, in the sampler's form.
    pub targets: Vec<Tensor>,
}

/// Kynkäänniemi et al. 2024 (eq. 3): guidance at high noise pulls every sample of a prompt
/// towards the same few modes, and at low noise it only sharpens, so guiding only in a middle
/// band of noise levels keeps the prompt following and most of the variety. The band is in
/// VE-form sigma (`sqrt((1 - alpha_bar) / alpha_bar)`), so it does not depend on the schedule.
#[derive(Debug, Clone)]
pub struct GuidanceInterval {
    /// Guidance applies where `sigma_low < sigma(t) <= sigma_high`.
    pub sigma_low: f64,
    pub sigma_high: f64,
    /// sigma of each training timestep, to read sigma(t) off the sampler's time labels.
    pub sigmas: Vec<f64>,
}

impl GuidanceInterval {
    pub fn contains(&self, t: f64) -> bool {
        let sigma = interp(t, &self.sigmas);
        sigma > self.sigma_low && sigma <= self.sigma_high
    }
}

impl GuidedUNet<'_> {
    pub fn uses_guidance(&self) -> bool {
        self.guidance > 1.0
    }

    fn guides_at(&self, t: f64) -> bool {
        self.uses_guidance() && self.interval.as_ref().is_none_or(|i| i.contains(t))
    }
}

/// Per-sample standard deviation over all but the batch dimension, shaped (B, 1, 1, 1).
fn sample_std(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let flat = x.flatten_from(1)?;
    let mean = flat.mean_keepdim(1)?;
    let n = flat.dim(1)? as f64;
    let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0).max(1.0))?;
    var.sqrt()?.reshape((b, 1, 1, 1))
}

impl Denoiser for GuidedUNet<'_> {
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn after_step(&mut self, index: usize, sample: Tensor) -> Result<Tensor> {
        let Some(known) = &self.blend else {
            return Ok(sample);
        };
        let Some(target) = known.targets.get(index) else {
            candle_core::bail!("no known-region target for update {index}")
        };
        let mask = known
            .mask
            .to_dtype(sample.dtype())?
            .broadcast_as(sample.shape())?;
        let keep = (1.0 - &mask)?;
        target.to_dtype(sample.dtype())?.broadcast_mul(&keep)? + sample.mul(&mask)?
    }

    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let out_dtype = x.dtype();
        let x = match &self.extra_channels {
            Some(extra) => Tensor::cat(&[x, &extra.to_dtype(x.dtype())?], 1)?,
            None => x.clone(),
        };
        let x = x.to_dtype(self.dtype)?;
        let b = x.dim(0)?;
        if !self.guides_at(t) {
            let cond = self.conditioning.narrow(b, b)?;
            let t = Tensor::full(t as f32, b, x.device())?;
            return self.unet.forward(&x, &t, &cond)?.to_dtype(out_dtype);
        }
        let both = Tensor::cat(&[&x, &x], 0)?;
        let t = Tensor::full(t as f32, 2 * b, x.device())?;
        let out = self
            .unet
            .forward(&both, &t, &self.conditioning)?
            .to_dtype(DType::F32)?;
        let uncond = out.narrow(0, 0, b)?;
        let cond = out.narrow(0, b, b)?;
        let mut guided = (&uncond + ((&cond - &uncond)? * self.guidance)?)?;
        if self.guidance_rescale > 0.0 {
            let ratio = (sample_std(&cond)? / sample_std(&guided)?)?;
            let rescaled = guided.broadcast_mul(&ratio)?;
            guided =
                ((rescaled * self.guidance_rescale)? + (guided * (1.0 - self.guidance_rescale))?)?;
        }
        guided.to_dtype(out_dtype)
    }
}
