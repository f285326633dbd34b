//! SDXL img2img against diffusers' `StableDiffusionXLImg2ImgPipeline` on the tiny SDXL pipeline
//! (`tests/fixtures/sdxl-img2img`: its `make_reference.py` made `reference.safetensors` with the
//! two normal draws of the run taken from `noise.safetensors`, which holds what `--seed 11`
//! draws here).

mod common;

use candle_core::Tensor;
use common::{assert_png_matches, fixture_path, max_abs_diff, run_fixture_case, Fixture};
use diffuse::sampler::noise::SeededNoise;

const SEED: u64 = 11;

/// What an img2img run with `SEED` draws for one 128x128 image of the tiny SDXL: the VAE
/// posterior sample's normals, then the forward noise.
fn drawn_noise() -> (Tensor, Tensor) {
    let mut noise = SeededNoise::new(SEED);
    let shape = [1, 4, 16, 16];
    (noise.randn(&shape).unwrap(), noise.randn(&shape).unwrap())
}

/// The reference was made with this project's draws; a change to the seeded generator or to
/// the order of draws in img2img shows here first. `DIFFUSE_WRITE_IMG2IMG_NOISE=1` rewrites the
/// file (then rerun `make_reference.py`).
#[test]
fn the_references_noise_is_what_the_seed_draws() {
    let path = fixture_path("sdxl-img2img/noise.safetensors");
    let (posterior, forward) = drawn_noise();
    if std::env::var_os("DIFFUSE_WRITE_IMG2IMG_NOISE").is_some() {
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                ("posterior_noise".to_string(), posterior.clone()),
                ("forward_noise".to_string(), forward.clone()),
            ]),
            &path,
        )
        .unwrap();
    }
    let stored = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&stored["posterior_noise"], &posterior), 0.0);
    assert_eq!(max_abs_diff(&stored["forward_noise"], &forward), 0.0);
}

#[test]
fn img2img_reproduces_diffusers_sdxl_img2img() {
    let fx = Fixture::load("sdxl-img2img/reference.safetensors");
    let dir = std::env::temp_dir().join(format!("diffuse-sdxl-img2img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in ["euler", "dpmpp_2m_karras"] {
        let call: serde_json::Value =
            serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
        let (model, init) = (
            fixture_path("tiny-sdxl"),
            fixture_path("sdxl-img2img/init.png"),
        );
        let args = [
            "--model".as_ref(),
            model.as_ref(),
            "--init-image".as_ref(),
            init.as_ref(),
        ];
        let (png, _) = run_fixture_case(&fx, case, &dir, &args, SEED);
        assert_png_matches(case, &png, fx.tensor(&format!("{case}/image")));
        let parameters = diffuse::image_io::read_png_parameters(&png)
            .unwrap()
            .unwrap();
        assert!(
            parameters.contains(&format!("Denoising strength: {}", call["strength"])),
            "{parameters}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
