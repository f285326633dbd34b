//! Inpainting against diffusers' `StableDiffusionInpaintPipeline` (`tests/fixtures/tiny-sd-inpaint`,
//! copied from the shared fixtures; its README says how each case was called): a 9-channel
//! U-Net at strength 1 (DDIM) and 0.6 (Euler), and an ordinary 4-channel model blended towards
//! the known region at every step, through the command line with the recorded noise.

mod common;

use common::{assert_png_matches, fixture_path, run_fixture_case, Fixture};
use std::process::Command;

/// Runs one `pipe_*` case of the inpainting fixture through `txt2img` and compares the image.
fn run_case(case: &str) {
    let fx = Fixture::load("tiny-sd-inpaint/reference.safetensors");
    let call: serde_json::Value =
        serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
    let dir = std::env::temp_dir().join(format!("diffuse-inpaint-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = match call["model_dir"].as_str() {
        Some(other) => fixture_path(&format!("tiny-sd-inpaint/{other}")),
        None => fixture_path("tiny-sd-inpaint"),
    };
    let image =
        |key: &str| fixture_path(&format!("tiny-sd-inpaint/{}", call[key].as_str().unwrap()));
    let (init, mask) = (image("init_image"), image("mask_image"));
    let args = [
        "--model".as_ref(),
        model.as_ref(),
        "--init-image".as_ref(),
        init.as_ref(),
        "--mask".as_ref(),
        mask.as_ref(),
    ];
    // Here the recorded `latents_in` is the starting noise, which --latents means with a mask.
    let (png, _) = run_fixture_case(&fx, case, &dir, &args, 0);
    assert_png_matches(case, &png, fx.tensor(&format!("{case}/image")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn nine_channel_inpainting_at_full_strength_matches_diffusers() {
    run_case("pipe_inpaint_ddim");
}

#[test]
fn nine_channel_inpainting_at_partial_strength_matches_diffusers() {
    run_case("pipe_inpaint_euler_s06");
}

#[test]
fn an_ordinary_model_blended_towards_the_known_region_matches_diffusers() {
    run_case("pipe_blend4ch_ddim_s075");
}

#[test]
fn a_mask_without_an_image_and_an_inpainting_model_without_a_mask_are_refused() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_txt2img"))
            .arg("--model")
            .arg(fixture_path("tiny-sd-inpaint"))
            .args(args)
            .args(["--steps", "2", "--output"])
            .arg(std::env::temp_dir().join("diffuse-inpaint-refused.png"))
            .arg("a cat")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let mask = fixture_path("tiny-sd-inpaint/mask.png");
    let err = run(&["--mask", mask.to_str().unwrap()]);
    assert!(err.contains("--init-image"), "{err}");
    let err = run(&[]);
    assert!(
        err.contains("inpainting model") && err.contains("--mask"),
        "{err}"
    );
}

/// Two seeds of a masked run of `model` (None: the embedded one) on a `size`-pixel picture:
/// the mean absolute difference between their outputs in the kept rows (away from the mask's
/// edge, which the decoder blends across) and in the repainted rows.
fn kept_and_repainted_difference(model: Option<&str>, size: u32, extra: &[&str]) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!(
        "diffuse-inpaint-seeds-{}-{}",
        model.unwrap_or("embedded"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    // A colour picture: a bright bar on the lower part over a dark ground.
    let picture = image::RgbImage::from_fn(size, size, |x, y| {
        match (y >= size * 5 / 8, (size / 8..size * 7 / 8).contains(&x)) {
            (true, true) => image::Rgb([230, 200, 180]),
            _ => image::Rgb([10, 20, 30]),
        }
    });
    let half = size / 2;
    let mask = image::GrayImage::from_fn(size, size, |_, y| {
        image::Luma([if y < half { 255 } else { 0 }])
    });
    picture.save(dir.join("init.png")).unwrap();
    mask.save(dir.join("mask.png")).unwrap();
    let run = |seed: &str| {
        let png = dir.join(format!("out-{seed}.png"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_txt2img"));
        if let Some(model) = model {
            command.arg("--model").arg(fixture_path(model));
        }
        let out = command
            .arg("--init-image")
            .arg(dir.join("init.png"))
            .arg("--mask")
            .arg(dir.join("mask.png"))
            .args(["--strength", "1", "--seed", seed, "--output"])
            .arg(&png)
            .args(extra)
            .arg("an ankle boot")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        image::open(png).unwrap().to_luma8()
    };
    let (first, second) = (run("2"), run("3"));
    let mean_difference = |rows: std::ops::Range<u32>| {
        let mut total = 0.0;
        let mut count = 0.0;
        for y in rows {
            for x in 0..size {
                total += (first.get_pixel(x, y)[0] as f64 - second.get_pixel(x, y)[0] as f64).abs();
                count += 1.0;
            }
        }
        total / count / 255.0
    };
    let margin = size / 4;
    let result = (
        mean_difference(half + margin..size),
        mean_difference(0..half - margin),
    );
    std::fs::remove_dir_all(&dir).ok();
    result
}

/// The embedded (grey-level) model inpaints a colour picture: two seeds give the same kept
/// region (both decode the picture's own latents there) and different repainted ones.
#[test]
fn the_embedded_model_keeps_the_unmasked_region_of_a_colour_picture() {
    let (kept, repainted) = kept_and_repainted_difference(None, 32, &[]);
    eprintln!("embedded, between seeds: kept {kept:.4}, repainted {repainted:.4}");
    assert!(kept < 0.2 * repainted, "kept {kept}, repainted {repainted}");
}

/// SDXL inpaints with the blend too (its size conditions from the picture's size).
#[test]
fn sdxl_keeps_the_unmasked_region() {
    let (kept, repainted) = kept_and_repainted_difference(
        Some("tiny-sdxl"),
        128,
        &["--steps", "6", "--sampler", "euler"],
    );
    eprintln!("tiny SDXL, between seeds: kept {kept:.4}, repainted {repainted:.4}");
    assert!(kept < 0.2 * repainted, "kept {kept}, repainted {repainted}");
}
