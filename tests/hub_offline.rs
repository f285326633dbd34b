//! Hub ids resolve through the standard Hugging Face cache; with HF_HUB_OFFLINE=1 nothing
//! touches the network. The cache here is a temporary folder in the hub's layout
//! (`hub/models--owner--name/{refs/main, snapshots/<commit>/...}`).

mod common;

use common::{fixture_path, Fixture};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn hub_ids_load_from_the_cache_offline() {
    let home = std::env::temp_dir().join(format!("diffuse-hf-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let repo = home.join("hub").join("models--test-org--tiny-sd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    copy_dir(
        &fixture_path("tiny-sd"),
        &repo.join("snapshots").join("0123abcd"),
    );

    let fx = Fixture::load("model_reference.safetensors");
    let latents_path = home.join("latents.safetensors");
    let latents = fx.tensor("pipe_ddim/latents_in").clone();
    candle_core::safetensors::save(
        &HashMap::from([("latents".to_string(), latents)]),
        &latents_path,
    )
    .unwrap();
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_txt2img"))
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "--model",
                model,
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--seed",
                "3",
                "--latents",
            ])
            .arg(&latents_path)
            .arg("--output")
            .arg(home.join("out.png"))
            .arg("a photo of a cat")
            .output()
            .unwrap()
    };
    let ok = run("test-org/tiny-sd");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(home.join("out.png").exists());

    let missing = run("test-org/absent");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        err.contains("test-org/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    let short = run("sd15");
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(!short.status.success());
    assert!(
        err.contains("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "{err}"
    );

    let bad = run("not a model");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("sd-turbo"), "{err}");
    std::fs::remove_dir_all(&home).ok();
}
