//! `diffuse convert` round trips change no tensor: the fixture single files (made by diffusers'
//! own conversion scripts) to folders and back, and the fixture folders to single files and
//! back; a file that does not fit the configs, and an existing output, are refused.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture_path, max_abs_diff};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn convert(args: &[&Path], flags: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("convert")
        .args(args)
        .args(flags)
        .output()
        .unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// `ours` holds exactly `theirs`' tensors, bit for bit and in the same dtype, where `theirs`
/// names are read through `rename` and `skip` drops what is not a weight.
fn assert_same_tensors(
    label: &str,
    ours: &HashMap<String, Tensor>,
    theirs: &HashMap<String, Tensor>,
    rename: &dyn Fn(&str) -> String,
    skip: &dyn Fn(&str) -> bool,
) {
    let wanted: Vec<&String> = theirs.keys().filter(|k| !skip(k)).collect();
    assert_eq!(ours.len(), wanted.len(), "{label}: tensor count");
    for name in wanted {
        let ours = ours
            .get(&rename(name))
            .unwrap_or_else(|| panic!("{label}: {name} is missing"));
        let theirs = &theirs[name];
        assert_eq!(ours.dtype(), theirs.dtype(), "{label}: {name}");
        assert_eq!(ours.dims(), theirs.dims(), "{label}: {name}");
        assert_eq!(max_abs_diff(ours, theirs), 0.0, "{label}: {name}");
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-convert-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn single_files_round_trip_through_folders_unchanged() {
    for name in ["tiny-sd", "tiny-sdxl"] {
        let dir = temp(name);
        let file = fixture_path(&format!("single-file/{name}.safetensors"));
        let folder = dir.join("folder");
        let config = fixture_path(name);
        let out = convert(&[&file, &folder], &["--config", config.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = dir.join("back.safetensors");
        let out = convert(&[&folder, &back], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // position_ids and logit_scale are buffers, not weights: diffusers folders drop them.
        assert_same_tensors(name, &load(&back), &load(&file), &|k| k.to_string(), &|k| {
            diffuse::single_file::is_ignored(k)
        });
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn folders_round_trip_through_single_files_unchanged() {
    for name in ["tiny-sd", "tiny-sdxl"] {
        let dir = temp(&format!("{name}-folder"));
        let file = dir.join("model.safetensors");
        let out = convert(&[&fixture_path(name), &file], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let folder = dir.join("back");
        let config = fixture_path(name);
        let out = convert(&[&file, &folder], &["--config", config.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut components = vec![
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
        ];
        if name == "tiny-sdxl" {
            components.push(("text_encoder_2", "model"));
        }
        for (component, stem) in components {
            let original = load(&config.join(component).join(format!("{stem}.safetensors")));
            let back = load(&folder.join(component).join(format!("{stem}.safetensors")));
            // Text encoders come back in transformers' `text_model.` naming, which every
            // version reads.
            let rename =
                |k: &str| match k.starts_with("text_model.") || k == "text_projection.weight" {
                    true => k.to_string(),
                    false if component.starts_with("text_encoder") => format!("text_model.{k}"),
                    false => k.to_string(),
                };
            assert_same_tensors(
                &format!("{name} {component}"),
                &back,
                &original,
                &rename,
                &|k| k.ends_with("position_ids"),
            );
        }
        // The converted folder loads and is the same pipeline.
        diffuse::pipeline::StableDiffusion::load_dir(&folder, Default::default()).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn mismatched_configs_and_existing_outputs_are_refused() {
    let dir = temp("refused");
    // The tiny SDXL file with the built-in (real) SDXL configs.
    let out = convert(
        &[
            &fixture_path("single-file/tiny-sdxl.safetensors"),
            &dir.join("folder"),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("model.diffusion_model.input_blocks.0.0.weight")
            && err.contains("[320, 4, 3, 3]"),
        "{err}"
    );
    assert!(!dir.join("folder").exists());
    // An output that exists is never overwritten.
    let existing = dir.join("existing.safetensors");
    std::fs::write(&existing, b"keep me").unwrap();
    let out = convert(&[&fixture_path("tiny-sd"), &existing], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    std::fs::remove_dir_all(&dir).ok();
}
