//! A damaged or mismatched model folder gives an error naming the file or tensor, never a panic.

mod common;

use candle_core::{Device, Tensor};
use common::{copy_dir, fixture_path};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use std::path::{Path, PathBuf};

/// A private copy of the tiny-sd folder to damage.
fn copy_fixture(name: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("diffuse-weights-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixture_path("tiny-sd"), &dst);
    dst
}

fn load_error(dir: &Path) -> String {
    let result = StableDiffusion::load_dir(dir, LoadOptions::default());
    std::fs::remove_dir_all(dir).ok();
    match result {
        Ok(_) => panic!("loading a damaged folder succeeded"),
        Err(e) => e.to_string(),
    }
}

fn unet_file(dir: &Path) -> PathBuf {
    dir.join("unet").join("diffusion_pytorch_model.safetensors")
}

fn rewrite_unet(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = unet_file(dir);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn truncated_weights_are_named() {
    let dir = copy_fixture("truncated");
    let path = unet_file(&dir);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn non_safetensors_file_is_named() {
    let dir = copy_fixture("garbage");
    std::fs::write(unet_file(&dir), b"this is not a safetensors file at all").unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors")
            && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = copy_fixture("missing");
    rewrite_unet(&dir, |t| {
        t.remove("conv_out.weight");
    });
    let err = load_error(&dir);
    assert!(
        err.contains("missing tensor conv_out.weight") && err.contains("[4, 16, 3, 3]"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = copy_fixture("shape");
    rewrite_unet(&dir, |t| {
        t.insert(
            "conv_in.weight".into(),
            Tensor::zeros((16, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains("conv_in.weight")
            && err.contains("[16, 3, 3, 3]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );
}

#[test]
fn extra_tensors_are_listed() {
    let dir = copy_fixture("extra");
    rewrite_unet(&dir, |t| {
        t.insert(
            "lora.extra.weight".into(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains("lora.extra.weight") && err.contains("1 tensors"),
        "{err}"
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = copy_fixture("pickle");
    let path = unet_file(&dir);
    std::fs::rename(&path, path.with_extension("bin")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("pickle"), "{err}");
}

#[test]
fn unknown_model_type_is_refused() {
    let dir = copy_fixture("class");
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("StableDiffusionPipeline", "FluxPipeline");
    std::fs::write(&index, text).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("FluxPipeline") && err.contains("model_index.json"),
        "{err}"
    );
}

#[test]
fn unsupported_config_values_name_the_key() {
    let dir = copy_fixture("config");
    let config = dir.join("unet").join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "\"resnet_time_scale_shift\": \"default\"",
        "\"resnet_time_scale_shift\": \"scale_shift\"",
    );
    std::fs::write(&config, text).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("resnet_time_scale_shift") && err.contains("scale_shift"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = copy_fixture("tokenizer");
    std::fs::remove_file(dir.join("tokenizer").join("tokenizer.json")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// A safetensors file made by hand: `header` as its JSON header, then `data_len` bytes.
fn handmade_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn headers_that_promise_more_than_the_file_are_refused_before_allocation() {
    let dir = std::env::temp_dir().join(format!("diffuse-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let cases = [
        // Shapes whose element count overflows 64 bits.
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
            16,
            "",
        ),
        // A shape that needs a terabyte of data in a 16-byte file.
        (
            r#"{"w":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#,
            16,
            "truncated",
        ),
        // Offsets that run backwards.
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#,
            16,
            "",
        ),
        // A header length beyond the file.
        ("{", 0, ""),
    ];
    for (header, data_len, needle) in cases {
        handmade_safetensors(&path, header, data_len);
        let err = diffuse::weights::check_safetensors(&path)
            .err()
            .unwrap_or_else(|| panic!("{header} was accepted"))
            .to_string();
        assert!(err.contains("w.safetensors"), "{err}");
        assert!(err.contains(needle), "{err}");
        let shapes = diffuse::weights::tensor_shapes(&path);
        assert!(shapes.is_err(), "{header}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Fuzzing findings: sizes of zero in a config (a division by zero while building the model,
/// before) and a `tokenizer.json` that breaks off inside its decoder (a panic inside the
/// tokenizers crate, before) are errors naming the key or the file.
#[test]
fn zero_sizes_and_cut_tokenizer_files_are_named() {
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "unet",
            "\"attention_head_dim\": 8",
            "\"attention_head_dim\": 0",
            "attention_head_dim",
        ),
        (
            "unet",
            "\"norm_num_groups\": 8",
            "\"norm_num_groups\": 0",
            "norm_num_groups",
        ),
        (
            "vae",
            "\"norm_num_groups\": 8",
            "\"norm_num_groups\": 0",
            "norm_num_groups",
        ),
        (
            "text_encoder",
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 0",
            "num_attention_heads",
        ),
    ];
    for (component, from, to, key) in cases {
        let dir = copy_fixture(&format!("zero-{component}-{key}"));
        let config = dir.join(component).join("config.json");
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(from), "{component}: {from}");
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let err = load_error(&dir);
        assert!(
            err.contains(key) && err.contains("at least 1"),
            "{component}: {err}"
        );
    }

    let dir = copy_fixture("cut-tokenizer");
    let path = dir.join("tokenizer").join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.find("\"decoder\"").unwrap() + 30;
    std::fs::write(&path, &text[..cut]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("tokenizer.json") && err.contains("not valid JSON"),
        "{err}"
    );
}
