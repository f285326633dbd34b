//! One generation request for every front end (the command line now, a server later): what a
//! user asks for, with everything left out resolved here against the loaded model and its
//! preset, so the front ends only map their fields onto it.

use super::txt2img::{SizeConditioning, Txt2ImgRequest};
use super::StableDiffusion;
use crate::error::{Error, Result};
use crate::hub::Preset;

/// More images or steps than this is a typing slip, not a request.
pub const MAX_IMAGES: usize = 10_000;
pub const MAX_STEPS: usize = 10_000;

/// diffusers' pipeline defaults, where neither the request nor a preset says.
const DEFAULT_STEPS: usize = 50;
const DEFAULT_GUIDANCE: f64 = 7.5;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// One or more prompts, each rendered `num_images` times.
    pub prompts: Vec<String>,
    /// None: no negative prompt (see [`Txt2ImgRequest::negative`]).
    pub negative: Option<String>,
    /// None: the model's native size.
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
    /// None: a fresh seed is drawn. Prompt k uses seed + k.
    pub seed: Option<u64>,
    pub num_images: usize,
    /// With an init image: the share of the schedule that runs, in (0, 1].
    pub strength: f64,
    /// SDXL's micro-conditioning.
    pub size_conditioning: SizeConditioning,
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
            seed: None,
            num_images: 1,
            strength: 0.75,
            size_conditioning: SizeConditioning::default(),
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
            latents: None,
            size_conditioning: self.size_conditioning,
        }
    }

    /// Every default settled against the loaded model and its preset.
    pub fn resolve(&self, sd: &StableDiffusion, preset: Option<&Preset>) -> Resolved {
        let (width, height) = self.size_for(sd);
        Resolved {
            steps: self.steps_for(preset),
            guidance: self.guidance_for(preset),
            guidance_interval: self.guidance_interval_for(preset),
            width,
            height,
            seed: self.seed_or_draw(),
        }
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

/// Refuses a size and batch whose estimated working memory exceeds what this machine has
/// available (no check where that cannot be read).
pub fn check_memory(
    sd: &StableDiffusion,
    width: usize,
    height: usize,
    batch: usize,
    guided: bool,
) -> Result<()> {
    let Some(available) = crate::runtime::available_memory_bytes() else {
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
