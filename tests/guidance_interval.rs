//! Guidance limited to a band of noise levels (Kynkäänniemi et al. 2024): a band that holds every
//! step is plain classifier-free guidance, one that holds none is the unguided model, and one in
//! between is neither.

mod common;

use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::pipeline::txt2img::{txt2img, Txt2ImgRequest};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::sampler::{build_sampler, SamplerKind, SamplerOptions, StepEvent};

fn image(sd: &StableDiffusion, guidance: f64, interval: Option<(f64, f64)>) -> candle_core::Tensor {
    let fx = Fixture::load("model_reference.safetensors");
    let sampler = build_sampler(
        SamplerKind::Ddim,
        &sd.scheduler,
        &SamplerOptions::default(),
        4,
    )
    .unwrap();
    let request = Txt2ImgRequest {
        guidance,
        guidance_interval: interval,
        latents: Some(fx.tensor("pipe_ddim/latents_in").clone()),
        ..Txt2ImgRequest::new("a photo of a cat", 128, 128)
    };
    txt2img(sd, sampler.as_ref(), &request, &mut |_: &StepEvent| Ok(()))
        .unwrap()
        .images
}

#[test]
fn guidance_applies_only_inside_its_noise_band() {
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sd"), LoadOptions::default()).unwrap();
    let guided = image(&sd, 7.5, None);
    let unguided = image(&sd, 1.0, None);
    assert!(max_abs_diff(&guided, &unguided) > 1e-3);

    // The tiny pipeline's sigmas run from about 0.03 to 14.6.
    let everywhere = image(&sd, 7.5, Some((0.0, 1e6)));
    assert_eq!(max_abs_diff(&everywhere, &guided), 0.0);
    let nowhere = image(&sd, 7.5, Some((1e5, 1e6)));
    assert_eq!(max_abs_diff(&nowhere, &unguided), 0.0);

    // DDIM's 4 steps of 1000 sit at t = 751, 501, 251, 1; a band around the middle two guides
    // some steps only.
    let sigmas = sd.scheduler.noise_schedule().unwrap().sigmas();
    let band = (sigmas[200], sigmas[600]);
    let partly = image(&sd, 7.5, Some(band));
    assert!(max_abs_diff(&partly, &guided) > 1e-4);
    assert!(max_abs_diff(&partly, &unguided) > 1e-4);
}
