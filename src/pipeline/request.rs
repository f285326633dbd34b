//! One generation request for every front end (the command line now, a server later): what a
//! user asks for, with everything left out resolved here against the loaded model and its
//! preset, so the front ends only map their fields onto it.
//!
//! LoRAs are not part of it: they are merged into the weights at load ([`super::LoadOptions`]),
//! so a request for other LoRAs is a request for another loaded model.

use super::txt2img::{
    check_size, img2img, inpaint, txt2img, SizeConditioning, Txt2ImgOutput, Txt2ImgRequest,
};
use super::StableDiffusion;
use crate::error::{Error, Result};
use crate::hub::Preset;
use crate::sampler::{
    build_sampler, Callback, Sampler, SamplerKind, SamplerOptions, SchedulerConfig,
};
use candle_core::Tensor;

/// More images or steps than this is a typing slip, not a request.
pub const MAX_IMAGES: usize = 10_000;
pub const MAX_STEPS: usize = 10_000;

/// diffusers' pipeline defaults, where neither the request nor a preset says.
const DEFAULT_STEPS: usize = 50;
const DEFAULT_GUIDANCE: f64 = 7.5;

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// One or more prompts, each rendered `num_images` times.
    pub prompts: Vec<String>,
    /// None: no negative prompt (see [`Txt2ImgRequest::negative`]).
    pub negative: Option<String>,
    /// None: the model's native size (or the init image's, or the latents').
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// None: the preset's, else 50.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (at or below 1: off). None: the preset's, else 7.5.
    pub guidance: Option<f64>,
    /// Guide only where sigma is in (low, high]. None: the preset's, else every step.
    pub guidance_interval: Option<(f64, f64)>,
    /// phi of Lin et al. 2023, 0 to 1.
    pub guidance_rescale: f64,
    /// None: the one the scheduler config names, else DDIM.
    pub sampler: Option<SamplerKind>,
    /// eta, Karras spacing, tolerances, corrector settings; the strength is taken from
    /// `strength` below.
    pub sampler_options: SamplerOptions,
    /// Replaces the model's scheduler config.
    pub scheduler: Option<SchedulerConfig>,
    /// None: a fresh seed is drawn. Prompt k uses seed + k.
    pub seed: Option<u64>,
    pub num_images: usize,
    /// img2img: start from this image instead of noise.
    pub init_image: Option<image::RgbImage>,
    /// Inpainting (with `init_image`): white = repaint, binarised at half.
    pub mask: Option<image::GrayImage>,
    /// With an init image: the share of the schedule that runs, in (0, 1].
    pub strength: f64,
    /// Unscaled starting latents (B, C, h, w), as diffusers' `latents=`; they fix the batch and
    /// the size. With a mask: the starting noise instead.
    pub latents: Option<Tensor>,
    /// SDXL's micro-conditioning.
    pub size_conditioning: SizeConditioning,
    /// Refuse sizes whose estimated working memory exceeds what is available.
    pub memory_check: bool,
}

impl GenerationRequest {
    /// One image of `prompt`, everything else left to the model and its preset.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative: None,
            width: None,
            height: None,
            steps: None,
            guidance: None,
            guidance_interval: None,
            guidance_rescale: 0.0,
            sampler: None,
            sampler_options: SamplerOptions::default(),
            scheduler: None,
            seed: None,
            num_images: 1,
            init_image: None,
            mask: None,
            strength: 0.75,
            latents: None,
            size_conditioning: SizeConditioning::default(),
            memory_check: true,
        }
    }

    /// What can be checked before a model is loaded; errors name the setting as a front end's
    /// flag (`--steps`) would.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.iter().all(|p| p.trim().is_empty()) {
            return Err(Error::Msg("the prompt is empty".into()));
        }
        if !(1..=MAX_IMAGES).contains(&self.num_images) {
            return Err(Error::bad_value(
                "--num-images",
                self.num_images,
                &format!("1 to {MAX_IMAGES}"),
            ));
        }
        if let Some(steps) = self.steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                return Err(Error::bad_value(
                    "--steps",
                    steps,
                    &format!("1 to {MAX_STEPS}"),
                ));
            }
        }
        if let Some(guidance) = self.guidance {
            if !(guidance.is_finite() && guidance >= 0.0) {
                return Err(Error::bad_value(
                    "--guidance",
                    guidance,
                    "a number >= 0 (at or below 1: no guidance)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(Error::bad_value(
                "--guidance-rescale",
                self.guidance_rescale,
                "0 to 1",
            ));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::bad_value(
                "--strength",
                self.strength,
                "a number in (0, 1]",
            ));
        }
        if self.mask.is_some() && self.init_image.is_none() {
            return Err(Error::Msg(
                "a mask needs the image it masks (--init-image)".into(),
            ));
        }
        // With a mask the latents are the starting noise, which goes with an image.
        if self.init_image.is_some() && self.latents.is_some() && self.mask.is_none() {
            return Err(Error::Msg(
                "give an init image or starting latents, not both".into(),
            ));
        }
        Ok(())
    }

    pub fn steps_for(&self, preset: Option<&Preset>) -> usize {
        self.steps
            .or(preset.map(|p| p.steps))
            .unwrap_or(DEFAULT_STEPS)
    }

    pub fn guidance_for(&self, preset: Option<&Preset>) -> f64 {
        self.guidance
            .or(preset.map(|p| p.guidance))
            .unwrap_or(DEFAULT_GUIDANCE)
    }

    pub fn guidance_interval_for(&self, preset: Option<&Preset>) -> Option<(f64, f64)> {
        self.guidance_interval
            .or(preset.and_then(|p| p.guidance_interval))
    }

    /// The size asked for, else the model's native size.
    pub fn size_for(&self, sd: &StableDiffusion) -> (usize, usize) {
        let native = sd.native_size();
        (self.width.unwrap_or(native), self.height.unwrap_or(native))
    }

    /// The size for an init image of `width` x `height`: the size asked for, else the image's
    /// own rounded down to the VAE's factor.
    pub fn size_for_image(
        &self,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
    ) -> (usize, usize) {
        let factor = sd.vae_scale_factor();
        match (self.width, self.height) {
            (None, None) => ((width / factor) * factor, (height / factor) * factor),
            _ => self.size_for(sd),
        }
    }

    /// The seed asked for, else one drawn from the clock (printed and stored by the front end
    /// so the image can be made again).
    pub fn seed_or_draw(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                % 1_000_000_007
        })
    }

    /// Prompt `index`'s request for the pipeline, with the settings resolved above.
    pub fn for_prompt(&self, index: usize, resolved: &Resolved) -> Txt2ImgRequest {
        Txt2ImgRequest {
            prompt: self.prompts[index].clone(),
            negative: self.negative.clone(),
            guidance: resolved.guidance,
            guidance_rescale: self.guidance_rescale,
            guidance_interval: resolved.guidance_interval,
            width: resolved.width,
            height: resolved.height,
            num_images: self.num_images,
            seed: resolved.seed.wrapping_add(index as u64),
            latents: self.latents.clone(),
            size_conditioning: self.size_conditioning,
        }
    }

    /// Every default settled against the loaded model and its preset. The size is the one asked
    /// for, else the starting latents' (as diffusers), else the init image's rounded down to
    /// the VAE's factor, else the model's native size.
    pub fn resolve(&self, sd: &StableDiffusion, preset: Option<&Preset>) -> Result<Resolved> {
        let factor = sd.vae_scale_factor();
        let (width, height) = match (&self.latents, &self.init_image) {
            (Some(latents), _) => {
                let (_, _, h, w) = latents.dims4().map_err(|_| {
                    Error::Msg(format!(
                        "the starting latents have shape {:?}; expected (batch, channels, height, width)",
                        latents.dims()
                    ))
                })?;
                (w * factor, h * factor)
            }
            (None, Some(image)) => {
                self.size_for_image(sd, image.width() as usize, image.height() as usize)
            }
            (None, None) => self.size_for(sd),
        };
        check_size(width, height, factor)?;
        Ok(Resolved {
            steps: self.steps_for(preset),
            guidance: self.guidance_for(preset),
            guidance_interval: self.guidance_interval_for(preset),
            width,
            height,
            seed: self.seed_or_draw(),
        })
    }

    /// Resolves the request against `sd` and builds what every image of it shares: the
    /// sampler, the init image at the output size, the memory check.
    pub fn prepare(&self, sd: &StableDiffusion, preset: Option<&Preset>) -> Result<Generation> {
        self.validate()?;
        let resolved = self.resolve(sd, preset)?;
        let scheduler = match &self.scheduler {
            Some(config) => config.clone(),
            None => sd.scheduler.clone(),
        };
        let kind = match self.sampler {
            Some(kind) => kind,
            None => scheduler.class_kind()?.unwrap_or(SamplerKind::Ddim),
        };
        let strength = if self.init_image.is_some() {
            self.strength
        } else {
            1.0
        };
        let options = SamplerOptions {
            strength,
            ..self.sampler_options.clone()
        };
        let sampler = build_sampler(kind, &scheduler, &options, resolved.steps)?;
        let batch = match &self.latents {
            Some(latents) => latents.dim(0)?,
            None => self.num_images,
        };
        if self.memory_check {
            check_memory(
                sd,
                resolved.width,
                resolved.height,
                batch,
                resolved.guidance > 1.0,
            )?;
        }
        let size = (resolved.width as u32, resolved.height as u32);
        let init_image = match &self.init_image {
            Some(image) => Some(crate::image_io::rgb_to_tensor(image, Some(size))?),
            None => None,
        };
        let mask = match &self.mask {
            Some(mask) => Some(crate::image_io::mask_to_tensor(mask, size)?),
            None => None,
        };
        if sd.unet.config.in_channels == 9 && mask.is_none() {
            return Err(Error::Msg(
                "this is an inpainting model (its U-Net takes 9 channels): give --init-image and --mask"
                    .into(),
            ));
        }
        Ok(Generation {
            request: self.clone(),
            resolved,
            kind,
            sampler,
            init_image,
            mask,
            batch,
        })
    }
}

/// A request's settings once nothing is left open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub steps: usize,
    pub guidance: f64,
    pub guidance_interval: Option<(f64, f64)>,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
}

/// A request ready to run against one loaded model, one prompt at a time (so a front end can
/// show progress, save each image as it comes, and stop between prompts).
pub struct Generation {
    pub request: GenerationRequest,
    pub resolved: Resolved,
    pub kind: SamplerKind,
    sampler: Box<dyn Sampler>,
    init_image: Option<Tensor>,
    mask: Option<Tensor>,
    batch: usize,
}

impl Generation {
    /// Images per prompt.
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn total_images(&self) -> usize {
        self.request.prompts.len() * self.batch
    }

    /// Denoiser evaluations' steps per image (img2img runs only the tail of the schedule).
    pub fn steps_per_image(&self) -> usize {
        self.sampler.timesteps().len()
    }

    /// The seed of prompt `index`'s first image.
    pub fn seed(&self, index: usize) -> u64 {
        self.resolved.seed.wrapping_add(index as u64)
    }

    /// Generates prompt `index`'s images; `on_step` sees every step and may stop the run by
    /// returning an error.
    pub fn run(
        &self,
        sd: &StableDiffusion,
        index: usize,
        on_step: &mut Callback,
    ) -> Result<Txt2ImgOutput> {
        let request = self.request.for_prompt(index, &self.resolved);
        match (&self.init_image, &self.mask) {
            (Some(image), Some(mask)) => {
                let full = self.request.strength >= 1.0;
                inpaint(
                    sd,
                    self.sampler.as_ref(),
                    &request,
                    image,
                    mask,
                    full,
                    on_step,
                )
            }
            (Some(image), None) => img2img(sd, self.sampler.as_ref(), &request, image, on_step),
            (None, _) => txt2img(sd, self.sampler.as_ref(), &request, on_step),
        }
    }

    /// AUTOMATIC1111's `parameters` text for prompt `index`'s images (what A1111's PNG Info and
    /// other readers parse), naming the model as `model_name`.
    pub fn parameters(&self, index: usize, model_name: &str) -> String {
        let r = &self.resolved;
        let mut settings = vec![
            ("Steps", r.steps.to_string()),
            ("Sampler", self.kind.cli_name().to_string()),
            ("CFG scale", r.guidance.to_string()),
            ("Seed", self.seed(index).to_string()),
            ("Size", format!("{}x{}", r.width, r.height)),
            ("Model", model_name.to_string()),
        ];
        if let Some((low, high)) = r.guidance_interval {
            settings.push(("Guidance interval", format!("sigma {low} to {high}")));
        }
        if self.request.guidance_rescale > 0.0 {
            settings.push((
                "Guidance rescale",
                self.request.guidance_rescale.to_string(),
            ));
        }
        if self.init_image.is_some() {
            settings.push(("Denoising strength", self.request.strength.to_string()));
        }
        let sc = &self.request.size_conditioning;
        if sc.original_size.is_some()
            || sc.target_size.is_some()
            || sc.crops_coords_top_left != (0, 0)
        {
            let [oh, ow, top, left, th, tw] = sc.time_ids(r.width, r.height);
            settings.push(("Original size", format!("{ow}x{oh}")));
            settings.push(("Crop", format!("{left},{top}")));
            settings.push(("Target size", format!("{tw}x{th}")));
        }
        crate::image_io::a1111_parameters(
            &self.request.prompts[index],
            self.request.negative.as_deref().unwrap_or(""),
            &settings,
        )
    }
}

/// Refuses a size and batch whose estimated working memory exceeds what the model's device has
/// available (no check where that cannot be read).
pub fn check_memory(
    sd: &StableDiffusion,
    width: usize,
    height: usize,
    batch: usize,
    guided: bool,
) -> Result<()> {
    let Some(available) = crate::ops::runtime::available_memory_on(&sd.options.device) else {
        return Ok(());
    };
    let need = sd.working_memory_estimate(width, height, batch, guided);
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    if need.peak() <= available as f64 {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "{width}x{height} with {batch} image(s) a batch needs about {:.1} GiB of working memory \
         (U-Net step {:.1} GiB, VAE decode {:.1} GiB) and {:.1} GiB is available; use a smaller \
         --width/--height or --num-images, or --no-memory-check to try anyway",
        gib(need.peak()),
        gib(need.unet_step),
        gib(need.vae_decode),
        gib(available as f64)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_wins_then_the_preset_then_diffusers_defaults() {
        let turbo = crate::hub::preset("sdxl-turbo").unwrap();
        let mut request = GenerationRequest::new("a cat");
        assert_eq!(request.steps_for(Some(turbo)), 1);
        assert_eq!(request.guidance_for(Some(turbo)), 0.0);
        assert_eq!(request.steps_for(None), 50);
        assert_eq!(request.guidance_for(None), 7.5);
        request.steps = Some(4);
        request.guidance = Some(2.0);
        assert_eq!(request.steps_for(Some(turbo)), 4);
        assert_eq!(request.guidance_for(Some(turbo)), 2.0);
        let embedded = &crate::hub::EMBEDDED;
        assert_eq!(
            GenerationRequest::new("a cat").guidance_interval_for(Some(embedded)),
            Some((0.3, 2.0))
        );
        request.seed = Some(9);
        assert_eq!(request.seed_or_draw(), 9);
    }

    #[test]
    fn impossible_settings_name_their_flag() {
        let base = GenerationRequest::new("a cat");
        let cases: Vec<(GenerationRequest, &str)> = vec![
            (
                GenerationRequest {
                    num_images: 0,
                    ..base.clone()
                },
                "--num-images",
            ),
            (
                GenerationRequest {
                    steps: Some(0),
                    ..base.clone()
                },
                "--steps",
            ),
            (
                GenerationRequest {
                    guidance: Some(f64::NAN),
                    ..base.clone()
                },
                "--guidance",
            ),
            (
                GenerationRequest {
                    guidance_rescale: 2.0,
                    ..base.clone()
                },
                "--guidance-rescale",
            ),
            (
                GenerationRequest {
                    strength: 0.0,
                    ..base.clone()
                },
                "--strength",
            ),
            (
                GenerationRequest {
                    prompts: vec![" ".into()],
                    ..base.clone()
                },
                "empty",
            ),
        ];
        for (request, needle) in cases {
            let err = request.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        base.validate().unwrap();
    }
}
