//! Image-to-image: the sampler keeps the last `floor(steps * strength)` steps (diffusers'
//! `get_timesteps`), noises the image to the first of them, and, started from the true
//! marginal there, still ends on the data distribution.

mod common;

use candle_core::Tensor;
use common::oracle::{mean_std, GaussianOracle, Labels};
use common::{fixture_path, write_fixture_latents};
use diffuse::sampler::{
    build_sampler, FnDenoiser, PredictionType, SamplerKind, SamplerOptions, SchedulerConfig,
    SeededNoise, StepEvent,
};
use std::process::Command;

fn sd_config() -> SchedulerConfig {
    SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false}"#,
    )
    .unwrap()
}

fn with_strength(strength: f64) -> SamplerOptions {
    SamplerOptions {
        strength,
        ..Default::default()
    }
}

#[test]
fn strength_keeps_the_tail_of_the_schedule() {
    let config = sd_config();
    for kind in [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Lms,
        SamplerKind::DpmPp2m,
        SamplerKind::UniPc,
    ] {
        let full = build_sampler(kind, &config, &SamplerOptions::default(), 10).unwrap();
        let part = build_sampler(kind, &config, &with_strength(0.55), 10).unwrap();
        // floor(10 * 0.55) = 5 steps run.
        assert_eq!(
            part.timesteps(),
            full.timesteps()[5..].to_vec(),
            "{}",
            kind.cli_name()
        );
    }
    let heun = build_sampler(SamplerKind::Heun, &config, &with_strength(0.5), 10).unwrap();
    assert_eq!(heun.timesteps().len(), 2 * 5 - 1);
}

#[test]
fn unsupported_samplers_and_strengths_are_refused() {
    let config = sd_config();
    for (kind, strength) in [
        (SamplerKind::Rk45, 0.5),
        (SamplerKind::Pc, 0.5),
        (SamplerKind::Ddim, 0.0),
        (SamplerKind::Ddim, 1.5),
    ] {
        let err = build_sampler(kind, &config, &with_strength(strength), 10)
            .err()
            .expect("error")
            .to_string();
        assert!(err.contains("strength"), "{err}");
    }
}

/// Data x0 ~ N(1, 0.5^2), noised to the first kept step by `add_noise`, sampled with the ideal
/// denoiser: the output keeps the data's moments (tolerance as in sampler_properties.rs).
#[test]
fn img2img_from_data_stays_on_the_data_distribution() {
    let config =
        SchedulerConfig::from_json_str(r#"{"beta_schedule": "linear", "clip_sample": false}"#)
            .unwrap();
    let oracle = GaussianOracle {
        mu: 1.0,
        s: 0.5,
        labels: Labels::Discrete(config.noise_schedule().unwrap().sigmas()),
    };
    for kind in [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::DpmPp2m,
        SamplerKind::Ddpm,
    ] {
        let sampler = build_sampler(kind, &config, &with_strength(0.5), 250).unwrap();
        let mut noise = SeededNoise::new(5);
        let x0 = noise.randn(&[4000, 4]).unwrap().affine(0.5, 1.0).unwrap();
        let eps = noise.randn(&[4000, 4]).unwrap();
        let start = sampler.add_noise(&x0, &eps).unwrap();
        let mut model = FnDenoiser {
            prediction_type: PredictionType::Epsilon,
            f: |x: &Tensor, t: f64| oracle.epsilon(x, t),
        };
        let out = sampler
            .sample(&mut model, start, &mut noise, &mut |_: &StepEvent| Ok(()))
            .unwrap();
        let (mean, std) = mean_std(&out);
        eprintln!("{}: mean {mean:.4}, std {std:.4}", kind.cli_name());
        assert!(
            (mean - 1.0).abs() < 0.03 && (std - 0.5).abs() < 0.024,
            "{}: {mean} {std}",
            kind.cli_name()
        );
    }
}

#[test]
fn txt2img_init_image_runs_and_bad_images_are_named() {
    let dir = std::env::temp_dir().join(format!("diffuse-img2img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An init image: a gradient, written as a PNG.
    let gradient = image::RgbImage::from_fn(100, 72, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    });
    let init = dir.join("init.png");
    gradient.save(&init).unwrap();
    let out_png = dir.join("out.png");
    let run = |extra: &[&str], init_path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_txt2img"))
            .arg("--model")
            .arg(fixture_path("tiny-sd"))
            .arg("--init-image")
            .arg(init_path)
            .args([
                "--steps",
                "4",
                "--sampler",
                "ddim",
                "--seed",
                "2",
                "--output",
            ])
            .arg(&out_png)
            .args(extra)
            .arg("a photo of a cat")
            .output()
            .unwrap()
    };
    let ok = run(&["--strength", "0.5"], &init);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // 100x72 rounds down to 96x72.
    let written = image::open(&out_png).unwrap();
    assert_eq!((written.width(), written.height()), (96, 72));

    let garbage = dir.join("broken.png");
    std::fs::write(&garbage, b"\x89PNG not really").unwrap();
    let bad = run(&[], &garbage);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("broken.png"), "{err}");
    let zero = run(&["--strength", "0"], &init);
    assert!(!zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("strength"));
    let latents = dir.join("latents.safetensors");
    write_fixture_latents(&latents);
    let both = run(&["--latents", latents.to_str().unwrap()], &init);
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("not both"));
    std::fs::remove_dir_all(&dir).ok();
}
