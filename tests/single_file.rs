//! Single-file checkpoints in the original layouts (`tests/fixtures/single-file`, made from the
//! tiny folders by diffusers' own conversion scripts; its README says what each key is): loaded
//! with `--config <folder>`, they give the folders' `pipe_*` images; hostile and mismatched
//! files are refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_png_matches, fixture_path, max_abs_diff, run_fixture_case, Fixture};
use diffuse::pipeline::source::{Architecture, SingleFileOptions};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use std::collections::HashMap;
use std::path::Path;

/// Every weight of every component equals the folder's, bit for bit.
#[test]
fn single_files_load_the_folders_weights_exactly() {
    for (file, folder, architecture) in [
        ("tiny-sd.safetensors", "tiny-sd", Architecture::Sd1),
        ("tiny-sdxl.safetensors", "tiny-sdxl", Architecture::Sdxl),
    ] {
        let path = fixture_path(&format!("single-file/{file}"));
        let options = SingleFileOptions {
            config_dir: Some(fixture_path(folder)),
            ..Default::default()
        };
        let (single, _) = diffuse::pipeline::source::single_file_parts(&path, &options).unwrap();
        let from_folder = diffuse::pipeline::source::folder_parts(&fixture_path(folder)).unwrap();
        let shapes = diffuse::weights::tensor_shapes(&path).unwrap();
        let recognised = diffuse::pipeline::source::recognise(&path, &shapes).unwrap();
        assert_eq!(recognised.architecture, architecture);
        let pairs = [
            (Some(&single.unet.1), Some(&from_folder.unet.1)),
            (Some(&single.vae.1), Some(&from_folder.vae.1)),
            (
                Some(&single.text_encoder.1),
                Some(&from_folder.text_encoder.1),
            ),
            (
                single.text_encoder_2.as_ref().map(|t| &t.1),
                from_folder.text_encoder_2.as_ref().map(|t| &t.1),
            ),
        ];
        for (ours, theirs) in pairs {
            let (Some(ours), Some(theirs)) = (ours, theirs) else {
                assert!(ours.is_none() && theirs.is_none());
                continue;
            };
            let folder_tensors =
                candle_core::safetensors::load(theirs.path(), &Device::Cpu).unwrap();
            let wanted: Vec<&String> = folder_tensors
                .keys()
                .filter(|k| !k.ends_with("position_ids"))
                .collect();
            let read = read_component(ours);
            assert_eq!(
                read.len(),
                wanted.len(),
                "{file}: {} weights mapped, the folder's file has {}",
                read.len(),
                wanted.len()
            );
            for name in wanted {
                let mapped = read
                    .get(name)
                    .or_else(|| read.get(&format!("text_model.{name}")))
                    .unwrap_or_else(|| panic!("{file}: no source for {name}"));
                let expected = &folder_tensors[name];
                assert_eq!(mapped.dims(), expected.dims(), "{file}: {name}");
                assert_eq!(max_abs_diff(mapped, expected), 0.0, "{file}: {name}");
            }
        }
    }
}

/// All weights of a component as the model would read them.
fn read_component(weights: &diffuse::weights::ComponentWeights) -> HashMap<String, Tensor> {
    let shapes = weights.shapes().unwrap();
    let names: Vec<String> = shapes.keys().cloned().collect();
    let mut out = HashMap::new();
    diffuse::weights::load_component(
        weights,
        DType::F32,
        false,
        &Device::Cpu,
        Default::default(),
        |vb| {
            for name in &names {
                out.insert(name.clone(), vb.get(shapes[name].as_slice(), name)?);
            }
            Ok(())
        },
    )
    .unwrap();
    out
}

/// The README's check: a single file loaded with its folder's configs gives the folder's
/// `pipe_*` images (SD 1.x: DDIM and Euler; SDXL: every case), through the command line.
#[test]
fn single_files_reproduce_their_folders_images() {
    let dir = std::env::temp_dir().join(format!("diffuse-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sd_cases =
        ["pipe_ddim", "pipe_euler"].map(|c| ("tiny-sd", "model_reference.safetensors", c));
    let xl_cases = [
        "pipe_euler",
        "pipe_euler_zero_neg",
        "pipe_euler_microcond",
        "pipe_dpmpp_2m_karras",
    ]
    .map(|c| ("tiny-sdxl", "tiny-sdxl/reference.safetensors", c));
    for (folder, reference, case) in sd_cases.into_iter().chain(xl_cases) {
        let fx = Fixture::load(reference);
        let file = fixture_path(&format!("single-file/{folder}.safetensors"));
        let config = fixture_path(folder);
        let case_dir = dir.join(folder);
        std::fs::create_dir_all(&case_dir).unwrap();
        let args = [
            "--model".as_ref(),
            file.as_ref(),
            "--config".as_ref(),
            config.as_ref(),
        ];
        let (png, stderr) = run_fixture_case(&fx, case, &case_dir, &args, 0);
        let family = if folder == "tiny-sd" {
            "SD 1.x"
        } else {
            "SDXL"
        };
        assert!(
            stderr.contains(&format!("({family}, single file)")),
            "{stderr}"
        );
        assert_png_matches(
            &format!("{folder} {case}"),
            &png,
            fx.tensor(&format!("{case}/image")),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes `tensors` (name -> shape, zeros) as a safetensors file.
fn write_file(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| {
            (
                name.to_string(),
                Tensor::zeros(*shape, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn files_that_are_not_checkpoints_or_do_not_fit_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("diffuse-single-file-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |path: &Path, config: Option<&str>| {
        let options = SingleFileOptions {
            config_dir: config.map(fixture_path),
            ..Default::default()
        };
        StableDiffusion::load_single_file(path, &options, LoadOptions::default())
            .err()
            .expect("refused")
            .to_string()
    };
    // A LoRA or any file without a U-Net.
    let lora = dir.join("lora.safetensors");
    write_file(
        &lora,
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            &[4, 8],
        )],
    );
    assert!(load(&lora, None).contains("has no U-Net"));
    // A U-Net without any text encoder.
    let bare = dir.join("bare.safetensors");
    write_file(
        &bare,
        &[(
            "model.diffusion_model.input_blocks.0.0.weight",
            &[8, 4, 3, 3],
        )],
    );
    assert!(load(&bare, None).contains("no text encoder"));
    // The SD 1.x file with the SDXL folder's configs.
    let err = load(
        &fixture_path("single-file/tiny-sd.safetensors"),
        Some("tiny-sdxl"),
    );
    assert!(err.contains("SD 1.x") && err.contains("--config"), "{err}");
    // A pickle checkpoint.
    let pickle = dir.join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let err = load(&pickle, None);
    assert!(
        err.contains("model.ckpt") && err.contains("pickle"),
        "{err}"
    );
    // A stray key that belongs to no component.
    let stray = dir.join("stray.safetensors");
    let mut tensors = candle_core::safetensors::load(
        fixture_path("single-file/tiny-sd.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.insert(
        "model_ema.decay".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &stray).unwrap();
    let err = load(&stray, Some("tiny-sd"));
    assert!(err.contains("model_ema.decay"), "{err}");
    // A U-Net key with no diffusers destination.
    tensors.remove("model_ema.decay");
    tensors.insert(
        "model.diffusion_model.input_blocks.1.7.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &stray).unwrap();
    let err = load(&stray, Some("tiny-sd"));
    assert!(err.contains("input_blocks.1.7.weight"), "{err}");
    // No VAE and no --vae.
    tensors.remove("model.diffusion_model.input_blocks.1.7.weight");
    tensors.retain(|k, _| !k.starts_with("first_stage_model."));
    candle_core::safetensors::save(&tensors, &stray).unwrap();
    let err = load(&stray, Some("tiny-sd"));
    assert!(err.contains("--vae"), "{err}");
    // ... which --vae supplies (the folder's vae/).
    let options = SingleFileOptions {
        config_dir: Some(fixture_path("tiny-sd")),
        vae: Some(fixture_path("tiny-sd/vae")),
        ..Default::default()
    };
    StableDiffusion::load_single_file(&stray, &options, LoadOptions::default()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// The shipped tokenizer padded with "!" (what single SD 2.x and SDXL files get) encodes as
/// SDXL's own second tokenizer does, a literal "!" included.
#[test]
fn the_shipped_tokenizer_padded_with_a_bang_is_sdxls_second_tokenizer() {
    use diffuse::tokenizer::ClipTokenizer;
    let shipped = ClipTokenizer::from_dir(&fixture_path("tiny-sd/tokenizer"))
        .unwrap()
        .padded_with("!")
        .unwrap();
    let second = ClipTokenizer::from_dir(&fixture_path("tiny-sdxl/tokenizer_2")).unwrap();
    assert_eq!(shipped.pad_id, second.pad_id);
    for prompt in ["a cat!", "wow!! a dog, 4k", "", "emoji 🌸 and café"] {
        assert_eq!(
            shipped.encode(prompt).unwrap().ids,
            second.encode(prompt).unwrap().ids,
            "{prompt}"
        );
    }
}
