//! Classifier-free guidance (Ho & Salimans 2022, eq. 6) around the U-Net, with the rescale of
//! Lin et al. 2023 (section 3.4), as one `Denoiser`.

use crate::model::unet::UNet2DConditionModel;
use crate::sampler::{Denoiser, PredictionType};
use candle_core::{DType, Result, Tensor};

pub struct GuidedUNet<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// (2B, tokens, D): the unconditional states first, then the conditional (diffusers' order).
    pub context: Tensor,
    /// w in eps = eps_uncond + w (eps_cond - eps_uncond); at or below 1 only the conditional
    /// half runs.
    pub guidance: f64,
    /// phi of Lin et al. 2023, eq. 15/16 (0 = off).
    pub guidance_rescale: f64,
    pub prediction_type: PredictionType,
    pub dtype: DType,
}

impl GuidedUNet<'_> {
    pub fn uses_guidance(&self) -> bool {
        self.guidance > 1.0
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

    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let out_dtype = x.dtype();
        let x = x.to_dtype(self.dtype)?;
        let b = x.dim(0)?;
        if !self.uses_guidance() {
            let cond = self.context.narrow(0, self.context.dim(0)? - b, b)?;
            let t = Tensor::full(t as f32, b, x.device())?;
            return self
                .unet
                .forward(&x, &t, Some(&cond), None)?
                .to_dtype(out_dtype);
        }
        let both = Tensor::cat(&[&x, &x], 0)?;
        let t = Tensor::full(t as f32, 2 * b, x.device())?;
        let out = self
            .unet
            .forward(&both, &t, Some(&self.context), None)?
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
