//! Replays the fuzz targets' committed seeds (`fuzz/corpus/<target>/`) and every finding kept
//! as a regression (`fuzz/regressions/<target>/`) through the same functions the fuzzer calls
//! (`fuzz/src/lib.rs`), so CI checks them without libFuzzer: none may panic.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_targets;

fn inputs(folder: &str, target: &str) -> Vec<std::path::PathBuf> {
    let dir = fuzz_targets::repo_root()
        .join("fuzz")
        .join(folder)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
}

#[test]
fn every_seed_and_finding_is_handled_without_a_panic() {
    let mut replayed = 0;
    for (target, run) in fuzz_targets::TARGETS {
        let seeds = inputs("corpus", target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
        for path in seeds.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed >= 2 * fuzz_targets::TARGETS.len(),
        "{replayed} inputs"
    );
}

/// The binary seeds are valid files of their kind, so the fuzzer starts from inputs that reach
/// past the format checks.
#[test]
fn the_binary_seeds_load() {
    use candle_core::{DType, Device};
    let corpus = fuzz_targets::repo_root().join("fuzz/corpus");
    diffuse::weights::load_checked(
        &corpus.join("weights/tiny-vae.safetensors"),
        DType::F32,
        &Device::Cpu,
        |vb| diffuse::model::vae::AutoencoderKL::new(fuzz_targets::tiny_vae_config(), vb),
    )
    .unwrap();
    let unet = diffuse::weights::tensor_shapes(
        &fuzz_targets::repo_root()
            .join("tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    for layout in ["peft", "kohya"] {
        let file = diffuse::model::lora::LoraFile::load(
            &corpus.join(format!("lora/{layout}.safetensors")),
        )
        .unwrap();
        let deltas = file
            .deltas(diffuse::model::lora::Component::Unet, &unet, 1.0)
            .unwrap();
        assert_eq!(deltas.len(), 1, "{layout}");
    }
    let config =
        diffuse::train::config::TrainConfig::from_toml_str(fuzz_targets::TINY_PIXEL_CONFIG)
            .unwrap();
    diffuse::train::pixel::PixelTrainer::resume(
        config,
        &corpus.join("checkpoint/tiny-pixel.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
}
