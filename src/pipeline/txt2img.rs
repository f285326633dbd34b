//! Text to image: encode the prompt and the negative prompt, draw (or take) latents, run any
//! sampler on the guided U-Net, decode with the VAE.

use super::guidance::{GuidanceInterval, GuidedUNet, KnownRegion};
use super::{PromptEmbeds, StableDiffusion};
use crate::error::{Error, Result};
use crate::model::unet::{TextTimeConditioning, UNetConditioning};
use crate::sampler::{Callback, Sampler, SeededNoise, StepEvent};
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Txt2ImgRequest {
    pub prompt: String,
    /// None: no negative prompt; the empty string is encoded, or for SDXL pipelines with
    /// `force_zeros_for_empty_prompt` the negative conditioning is zeros (as diffusers).
    pub negative: Option<String>,
    pub guidance: f64,
    pub guidance_rescale: f64,
    /// Guide only where sigma(t) is in (low, high] (Kynkäänniemi et al. 2024); None: at every
    /// step.
    pub guidance_interval: Option<(f64, f64)>,
    pub width: usize,
    pub height: usize,
    pub num_images: usize,
    pub seed: u64,
    /// Unscaled starting latents (B, C, h, w), as diffusers' `latents=`: multiplied by the
    /// sampler's init noise sigma. They fix the batch and the size.
    pub latents: Option<Tensor>,
    /// SDXL's micro-conditioning.
    pub size_conditioning: SizeConditioning,
}

/// SDXL's size and crop conditions (Podell et al. 2023, sections 2.2 and 2.3), in pixels,
/// (width, height) and (left, top) as given on the command line. None: the output size.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizeConditioning {
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
}

impl SizeConditioning {
    /// diffusers' `add_time_ids` for an image of `width` x `height`: (original height, width,
    /// crop top, left, target height, width).
    pub fn time_ids(&self, width: usize, height: usize) -> [f32; 6] {
        let (ow, oh) = self.original_size.unwrap_or((width, height));
        let (left, top) = self.crops_coords_top_left;
        let (tw, th) = self.target_size.unwrap_or((width, height));
        [oh, ow, top, left, th, tw].map(|v| v as f32)
    }
}

impl Txt2ImgRequest {
    /// One image of `prompt` at width x height with diffusers' defaults otherwise: no negative
    /// prompt, guidance 7.5 at every step without rescaling, seed 0, fresh latents.
    pub fn new(prompt: impl Into<String>, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.into(),
            negative: None,
            guidance: 7.5,
            guidance_rescale: 0.0,
            guidance_interval: None,
            width,
            height,
            num_images: 1,
            seed: 0,
            latents: None,
            size_conditioning: SizeConditioning::default(),
        }
    }
}

pub struct Txt2ImgOutput {
    /// (B, 3, H, W) in [0, 1].
    pub images: Tensor,
    /// Final latents, before the VAE scaling is undone.
    pub latents: Tensor,
    pub prompt_truncated: bool,
    pub text_time: Duration,
    pub step_times: Vec<Duration>,
    pub decode_time: Duration,
}

/// Checks the size: positive multiples of 8 (the VAE's factor in SD).
pub fn check_size(width: usize, height: usize, factor: usize) -> Result<()> {
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || v % factor != 0 {
            return Err(Error::bad_value(
                &format!("--{name}"),
                v,
                &format!("a positive multiple of {factor}"),
            ));
        }
    }
    Ok(())
}

/// Fails on the first non-finite value in the latents, naming the step.
fn check_finite(event: &StepEvent) -> candle_core::Result<()> {
    let total = event
        .sample
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !total.is_finite() {
        candle_core::bail!(
            "the latents became NaN or infinite at step {} (t = {}); try f32, another sampler or fewer guidance",
            event.index + 1,
            event.t
        )
    }
    Ok(())
}

/// The prompt and negative prompt encoded once, with the time it took.
struct EncodedPrompts {
    cond: PromptEmbeds,
    uncond: PromptEmbeds,
    truncated: bool,
    text_time: Duration,
}

fn encode_prompts(sd: &StableDiffusion, request: &Txt2ImgRequest) -> Result<EncodedPrompts> {
    let started = Instant::now();
    let (cond, truncated) = sd.encode_prompt(&request.prompt)?;
    let uncond = match &request.negative {
        None if sd.force_zeros_for_empty_prompt => cond.zeros_like()?,
        negative => sd.encode_prompt(negative.as_deref().unwrap_or(""))?.0,
    };
    Ok(EncodedPrompts {
        cond,
        uncond,
        truncated,
        text_time: started.elapsed(),
    })
}

/// The U-Net conditioning of one prompt for `batch` images of `width` x `height`.
fn conditioning(
    embeds: &PromptEmbeds,
    request: &Txt2ImgRequest,
    width: usize,
    height: usize,
    batch: usize,
) -> Result<UNetConditioning> {
    let text_time = match &embeds.pooled {
        Some(pooled) => {
            let ids = request.size_conditioning.time_ids(width, height);
            Some(TextTimeConditioning {
                text_embeds: pooled.clone(),
                time_ids: Tensor::new(&[ids], pooled.device())?,
            })
        }
        None => None,
    };
    Ok(UNetConditioning {
        context: Some(embeds.context.clone()),
        text_time,
        class_labels: None,
    }
    .repeat(batch)?)
}

/// Where sampling starts: the latents (already scaled by the sampler's initial sigma), and for
/// inpainting channels appended to every U-Net input (an inpainting U-Net's mask and masked
/// image) or the known region put back after every update (an ordinary U-Net).
struct Start {
    latents: Tensor,
    extra_channels: Option<Tensor>,
    blend: Option<KnownRegion>,
}

impl Start {
    fn latents(latents: Tensor) -> Self {
        Self {
            latents,
            extra_channels: None,
            blend: None,
        }
    }
}

/// The part txt2img and img2img share: guided sampling from `x_start`, then decoding.
fn denoise_and_decode(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    request: &Txt2ImgRequest,
    prompts: EncodedPrompts,
    start: Start,
    noise: &mut SeededNoise,
    on_step: &mut Callback,
) -> Result<Txt2ImgOutput> {
    let Start {
        latents: x_start,
        extra_channels,
        blend,
    } = start;
    let (batch, _, h, w) = x_start.dims4()?;
    let factor = sd.vae_scale_factor();
    let (width, height) = (w * factor, h * factor);
    let conditioning = UNetConditioning::concat(
        &conditioning(&prompts.uncond, request, width, height, batch)?,
        &conditioning(&prompts.cond, request, width, height, batch)?,
    )?;
    let mut model = GuidedUNet {
        unet: &sd.unet,
        conditioning,
        guidance: request.guidance,
        guidance_rescale: request.guidance_rescale,
        interval: match request.guidance_interval {
            Some((sigma_low, sigma_high)) => Some(GuidanceInterval {
                sigma_low,
                sigma_high,
                sigmas: sd.scheduler.noise_schedule()?.sigmas(),
            }),
            None => None,
        },
        prediction_type: sd.scheduler.prediction_type,
        dtype: sd.options.dtype,
        extra_channels,
        blend,
    };
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let mut callback = |event: &StepEvent| {
        check_finite(event)?;
        step_times.push(last.elapsed());
        last = Instant::now();
        on_step(event)
    };
    let final_latents = sampler.sample(&mut model, x_start, noise, &mut callback)?;
    let decode_start = Instant::now();
    let images = sd.decode(&final_latents)?;
    Ok(Txt2ImgOutput {
        images,
        latents: final_latents,
        prompt_truncated: prompts.truncated,
        text_time: prompts.text_time,
        step_times,
        decode_time: decode_start.elapsed(),
    })
}

pub fn txt2img(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    request: &Txt2ImgRequest,
    on_step: &mut Callback,
) -> Result<Txt2ImgOutput> {
    let device = &sd.options.device;
    let prompts = encode_prompts(sd, request)?;
    let mut noise = SeededNoise::new(request.seed);
    let latents = match &request.latents {
        Some(l) => {
            let (c, _, _) = sd.latent_shape(request.width, request.height);
            if l.rank() != 4 || l.dim(1)? != c {
                return Err(Error::Msg(format!(
                    "latents have shape {:?}; expected [N, {c}, h, w]",
                    l.dims()
                )));
            }
            l.to_device(device)?.to_dtype(DType::F32)?
        }
        None => {
            check_size(request.width, request.height, sd.vae_scale_factor())?;
            let (c, h, w) = sd.latent_shape(request.width, request.height);
            noise
                .randn(&[request.num_images, c, h, w])?
                .to_device(device)?
        }
    };
    let x_start = latents.affine(sampler.init_noise_sigma(), 0.0)?;
    denoise_and_decode(
        sd,
        sampler,
        request,
        prompts,
        Start::latents(x_start),
        &mut noise,
        on_step,
    )
}

/// Image to image (SDEdit, Meng et al. 2022): the init image's latents are noised to the first
/// step the sampler keeps (built with `strength` < 1) and denoised from there.
pub fn img2img(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    request: &Txt2ImgRequest,
    init_image: &Tensor,
    on_step: &mut Callback,
) -> Result<Txt2ImgOutput> {
    let device = &sd.options.device;
    let prompts = encode_prompts(sd, request)?;
    let mut noise = SeededNoise::new(request.seed);
    let image = init_image.to_device(device)?.unsqueeze(0)?;
    let (_, _, h, w) = image.dims4()?;
    check_size(w, h, sd.vae_scale_factor())?;
    let (c, lh, lw) = sd.latent_shape(w, h);
    let mut starts = Vec::with_capacity(request.num_images);
    for _ in 0..request.num_images {
        // A draw from the encoder's posterior, then forward noise, as diffusers does.
        let posterior_noise = noise.randn(&[1, c, lh, lw])?.to_device(device)?;
        let latents = sd
            .encode_image(&image, Some(&posterior_noise))?
            .to_dtype(DType::F32)?;
        let forward_noise = noise.randn(&[1, c, lh, lw])?.to_device(device)?;
        starts.push(sampler.add_noise(&latents, &forward_noise)?);
    }
    let x_start = Tensor::cat(&starts, 0)?;
    denoise_and_decode(
        sd,
        sampler,
        request,
        prompts,
        Start::latents(x_start),
        &mut noise,
        on_step,
    )
}

/// Inpainting (diffusers' `StableDiffusionInpaintPipeline`). A 9-channel U-Net (Rombach et al.
/// 2022, section 4.5) reads the latents with the mask (1 = repaint) downsampled to the latent
/// grid (the top-left pixel of each cell) and the latents of the image with the repaint region
/// set to grey; an ordinary U-Net gets the known region put back after every update
/// ([`KnownRegion`]). The image and masked image are encoded to their
/// posterior means. `request.latents`, when given, is the starting noise (1, C, h, w), not the
/// starting latents. At full strength the run starts from noise alone, else from the image's
/// latents noised to the first step kept.
pub fn inpaint(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    request: &Txt2ImgRequest,
    image: &Tensor,
    mask: &Tensor,
    full_strength: bool,
    on_step: &mut Callback,
) -> Result<Txt2ImgOutput> {
    let device = &sd.options.device;
    let (c, _, _) = sd.latent_shape(8, 8);
    let nine_channels = match sd.unet.config.in_channels {
        n if n == c => false,
        n if n == 2 * c + 1 => true,
        n => {
            return Err(Error::Msg(format!(
                "--mask: the U-Net takes {n} input channels; expected {c} (blending the known \
                 region) or {} (an inpainting model)",
                2 * c + 1
            )))
        }
    };
    if !nine_channels && !sampler.applies_after_step() {
        return Err(Error::Msg(format!(
            "inpainting with an ordinary model puts the known region back after every step, \
             which the {} sampler does not support; use ddim, ddpm, euler, euler-a, lms, \
             dpmpp-2m or unipc (or an inpainting model)",
            sampler.name()
        )));
    }
    let prompts = encode_prompts(sd, request)?;
    let mut noise = SeededNoise::new(request.seed);
    let image = image.to_device(device)?.unsqueeze(0)?;
    let (_, _, h, w) = image.dims4()?;
    let factor = sd.vae_scale_factor();
    check_size(w, h, factor)?;
    let mask = mask
        .to_device(device)?
        .unsqueeze(0)?
        .to_dtype(image.dtype())?;
    // In [0, 1], grey is 0.5 (the 0 of the VAE's [-1, 1]).
    let keep = (1.0 - &mask)?.broadcast_as(image.shape())?;
    let grey = (&mask * 0.5)?.broadcast_as(image.shape())?;
    let masked = ((&image * keep)? + grey)?;
    let image_latents = sd.encode_image(&image, None)?.to_dtype(DType::F32)?;
    let masked_latents = sd.encode_image(&masked, None)?.to_dtype(DType::F32)?;
    let (lh, lw) = (h / factor, w / factor);
    let mask_latent = mask
        .reshape((1, 1, lh, factor, lw, factor))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((1, 1, lh, lw))?
        .to_dtype(DType::F32)?;
    let (c, _, _) = sd.latent_shape(w, h);
    let drawn = match &request.latents {
        Some(l) => {
            if l.dims() != [1, c, lh, lw] && l.dims() != [request.num_images, c, lh, lw] {
                return Err(Error::Msg(format!(
                    "the noise (--latents) has shape {:?}; expected [1, {c}, {lh}, {lw}]",
                    l.dims()
                )));
            }
            l.to_device(device)?.to_dtype(DType::F32)?
        }
        None => noise
            .randn(&[request.num_images, c, lh, lw])?
            .to_device(device)?,
    };
    let batch = drawn.dim(0)?;
    let x_start = if full_strength {
        drawn.affine(sampler.init_noise_sigma(), 0.0)?
    } else {
        sampler.add_noise(&image_latents.repeat((batch, 1, 1, 1))?, &drawn)?
    };
    let start = if nine_channels {
        let extra = Tensor::cat(&[&mask_latent, &masked_latents], 1)?.repeat((batch, 1, 1, 1))?;
        Start {
            latents: x_start,
            extra_channels: Some(extra),
            blend: None,
        }
    } else {
        let image_latents = image_latents.repeat((batch, 1, 1, 1))?;
        let updates = sampler.timesteps().len();
        let targets = (1..=updates)
            .map(|i| match i < updates {
                true => sampler.add_noise_at(&image_latents, &drawn, i),
                false => Ok(image_latents.clone()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Start {
            latents: x_start,
            extra_channels: None,
            blend: Some(KnownRegion {
                mask: mask_latent,
                targets,
            }),
        }
    };
    denoise_and_decode(sd, sampler, request, prompts, start, &mut noise, on_step)
}

/// Classifier-free guidance for [`sample_prompts`]: the scale and the noise band it acts in.
#[derive(Debug, Clone, Copy)]
pub struct PromptGuidance {
    pub scale: f64,
    pub interval: Option<(f64, f64)>,
}

/// `per_prompt` images for each of `prompts` (seed `seed + k` for prompt k), DDIM-style sampler
/// `sampler`, guidance `guidance`: (prompts x per_prompt, C, H, W) in [0, 1], prompt-major. The
/// model's native size.
pub fn sample_prompts(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    prompts: &[String],
    per_prompt: usize,
    guidance: PromptGuidance,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let size = sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor();
    let mut images = Vec::with_capacity(prompts.len());
    for (k, prompt) in prompts.iter().enumerate() {
        let request = Txt2ImgRequest {
            guidance: guidance.scale,
            guidance_interval: guidance.interval,
            num_images: per_prompt,
            seed: seed.wrapping_add(k as u64),
            ..Txt2ImgRequest::new(prompt.clone(), size, size)
        };
        images.push(txt2img(sd, sampler, &request, &mut |_| Ok(()))?.images);
        progress(k + 1, prompts.len());
    }
    Ok(Tensor::cat(&images, 0)?)
}
