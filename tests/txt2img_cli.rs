//! `txt2img --model tests/fixtures/tiny-sd --latents ...` reproduces the fixture's image, to
//! one 8-bit level, and stores its parameters in the PNG.

mod common;

use common::{fixture_path, write_fixture_latents, Fixture};
use std::process::Command;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn txt2img_reproduces_the_diffusers_image() {
    let fx = Fixture::load("model_reference.safetensors");
    let dir = temp_dir("txt2img");
    let latents_path = dir.join("latents.safetensors");
    write_fixture_latents(&latents_path);
    let png_path = dir.join("cat.png");
    let out = Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .arg("--model")
        .arg(fixture_path("tiny-sd"))
        .arg("--latents")
        .arg(&latents_path)
        .args([
            "--sampler",
            "ddim",
            "--steps",
            "4",
            "--guidance",
            "7.5",
            "--seed",
            "1",
        ])
        .arg("--output")
        .arg(&png_path)
        .arg("a photo of a cat")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("per step"), "{stderr}");

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .expect("parameters chunk");
    assert!(text.starts_with("a photo of a cat\n"), "{text}");
    assert!(
        text.contains("Steps: 4") && text.contains("Sampler: ddim") && text.contains("Seed: 1"),
        "{text}"
    );
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut pixels).unwrap();
    let expected: Vec<f32> = fx
        .tensor("pipe_ddim/image")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(pixels.len(), expected.len());
    let worst = pixels
        .iter()
        .zip(&expected)
        .map(|(p, e)| (*p as f32 - (e * 255.0).round()).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1.0, "worst pixel difference {worst}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn txt2img_bad_input_is_one_line_and_nonzero() {
    let dir = temp_dir("txt2img-bad");
    let fake = dir.join("model.ckpt");
    std::fs::write(&fake, b"not a checkpoint").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "a cat".into(),
                "--width".into(),
                "100".into(),
                "--model".into(),
                fixture_path("tiny-sd").display().to_string(),
            ],
            "multiple of 8",
        ),
        (vec!["".into()], "empty"),
        (
            vec!["a cat".into(), "--model".into(), "/no/such/model".into()],
            "/no/such/model",
        ),
        (
            vec!["a cat".into(), "--dtype".into(), "f8".into()],
            "--dtype",
        ),
        (
            vec![
                "a cat".into(),
                "--model".into(),
                fixture_path("tiny-sd").display().to_string(),
                "--latents".into(),
                fake.display().to_string(),
            ],
            "model.ckpt",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_txt2img"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
