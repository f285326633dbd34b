//! Hub ids resolve through the standard Hugging Face cache; with HF_HUB_OFFLINE=1 nothing
//! touches the network. The cache here is a temporary folder in the hub's layout
//! (`hub/models--owner--name/{refs/main, snapshots/<commit>/...}`).

mod common;

use common::{copy_dir, fixture_path, write_fixture_latents};
use std::process::Command;

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

    let latents_path = home.join("latents.safetensors");
    write_fixture_latents(&latents_path);
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

/// An SDXL repo in the cache resolves with its second tokenizer and text encoder; one whose
/// `text_encoder_2` is missing is refused by name.
#[test]
fn sdxl_hub_ids_need_their_second_encoder_in_the_cache() {
    let home = std::env::temp_dir().join(format!("diffuse-hf-xl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let repo = home.join("hub").join("models--test-org--tiny-sdxl");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "4567cdef").unwrap();
    let snapshot = repo.join("snapshots").join("4567cdef");
    copy_dir(&fixture_path("tiny-sdxl"), &snapshot);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_txt2img"))
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "--model",
                "test-org/tiny-sdxl",
                "--steps",
                "2",
                "--seed",
                "1",
            ])
            .args(["--width", "64", "--height", "64", "--output"])
            .arg(home.join("xl.png"))
            .arg("a photo of a cat")
            .output()
            .unwrap()
    };
    let ok = run();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_file(snapshot.join("text_encoder_2").join("model.safetensors")).unwrap();
    let missing = run();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(err.contains("text_encoder_2/model.safetensors"), "{err}");
    std::fs::remove_dir_all(&home).ok();
}
