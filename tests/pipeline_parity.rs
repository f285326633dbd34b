//! Whole txt2img runs against diffusers' StableDiffusionPipeline on the tiny fixture: DDIM and
//! Euler, 4 steps, guidance 7.5, the recorded starting latents.

mod common;

use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::ops::tensor::max_abs;
use diffuse::pipeline::txt2img::{txt2img, Txt2ImgRequest};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::sampler::{build_sampler, SamplerKind, SamplerOptions, SchedulerConfig, StepEvent};

/// Relative to the largest latent: about three times the worst seen (2.6e-6, Euler's last
/// step on a 2-core Xeon with AVX-512).
const LATENT_TOLERANCE: f64 = 1e-5;
/// About three times the worst image difference seen (3.1e-6).
const IMAGE_TOLERANCE: f64 = 1e-5;

fn run_case(case: &str) {
    let fx = Fixture::load("model_reference.safetensors");
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sd"), LoadOptions::default()).unwrap();
    let call: serde_json::Value =
        serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
    let config =
        SchedulerConfig::from_json_str(fx.meta_str(&format!("{case}/scheduler_config"))).unwrap();
    let kind = SamplerKind::from_class_name(call["scheduler"].as_str().unwrap()).unwrap();
    let options = SamplerOptions {
        eta: call["call_kwargs"]["eta"].as_f64().unwrap_or(0.0),
        ..Default::default()
    };
    let steps = call["steps"].as_u64().unwrap() as usize;
    let sampler = build_sampler(kind, &config, &options, steps).unwrap();
    assert_eq!(
        sampler.timesteps(),
        fx.values_f64(&format!("{case}/timesteps"))
    );

    let prompt = call["prompt"].as_str().unwrap();
    let negative = call["negative_prompt"].as_str().unwrap();
    let (cond, _) = sd.encode_prompt(prompt).unwrap();
    let (uncond, _) = sd.encode_prompt(negative).unwrap();
    assert!(max_abs_diff(&cond.context, fx.tensor(&format!("{case}/prompt_embeds"))) < 1e-4);
    assert!(
        max_abs_diff(
            &uncond.context,
            fx.tensor(&format!("{case}/negative_prompt_embeds"))
        ) < 1e-4
    );

    let request = Txt2ImgRequest {
        negative: Some(negative.into()),
        guidance: call["guidance_scale"].as_f64().unwrap(),
        latents: Some(fx.tensor(&format!("{case}/latents_in")).clone()),
        ..Txt2ImgRequest::new(prompt, 128, 128)
    };
    let mut steps_seen = Vec::new();
    let mut record = |e: &StepEvent| {
        steps_seen.push(e.sample.clone());
        Ok(())
    };
    let out = txt2img(&sd, sampler.as_ref(), &request, &mut record).unwrap();
    let expected_steps = fx.tensor(&format!("{case}/step_latents"));
    assert_eq!(
        steps_seen.len(),
        expected_steps.dim(0).unwrap(),
        "{case}: one step event per recorded step"
    );
    for (i, ours) in steps_seen.iter().enumerate() {
        let theirs = expected_steps.get(i).unwrap();
        let scale = max_abs(&theirs).unwrap().max(1.0);
        let err = max_abs_diff(ours, &theirs);
        eprintln!("{case} step {i}: {err:.2e} (max |latent| {scale:.1})");
        assert!(err <= LATENT_TOLERANCE * scale, "{case} step {i}: {err:e}");
    }
    let final_expected = fx.tensor(&format!("{case}/final_latents"));
    let scale = max_abs(final_expected).unwrap().max(1.0);
    assert!(max_abs_diff(&out.latents, final_expected) <= LATENT_TOLERANCE * scale);

    // Images: NHWC in the fixture, NCHW here; within IMAGE_TOLERANCE as floats and 1 LSB as
    // 8-bit.
    let ours = out.images.permute((0, 2, 3, 1)).unwrap();
    let theirs = fx.tensor(&format!("{case}/image"));
    let err = max_abs_diff(&ours, theirs);
    eprintln!("{case} image: {err:.2e}");
    assert!(err <= IMAGE_TOLERANCE, "{case} image differs by {err:e}");
    let ours_u8 = (ours * 255.0).unwrap().round().unwrap();
    let theirs_u8 = (theirs * 255.0).unwrap().round().unwrap();
    assert!(max_abs_diff(&ours_u8, &theirs_u8) <= 1.0);
}

#[test]
fn ddim_pipeline_matches_diffusers() {
    run_case("pipe_ddim");
}

#[test]
fn euler_pipeline_matches_diffusers() {
    run_case("pipe_euler");
}
