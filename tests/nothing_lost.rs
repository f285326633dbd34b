//! What `txt2img` does with input that used to cost the user their work: Unicode prompts, an
//! output path that cannot be written, Ctrl-C in a multi-image run, sizes and counts that
//! cannot fit, and a binary moved away from the source tree.

mod common;

use common::fixture_path;
use diffuse::image_io::read_png_parameters;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-lost-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `txt2img` with the embedded model's cache in `dir`, so tests never touch the user's.
fn txt2img(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_txt2img"));
    command.env("DIFFUSE_CACHE", dir.join("cache"));
    command
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Files in `dir` (not recursive) whose names end with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

const UNICODE_PROMPT: &str = "a café in 東京 🌸, Ελλάδα, naïve «quotes»";
const UNICODE_NEGATIVE: &str = "низкое качество 😞";

#[test]
fn unicode_prompts_are_stored_exactly_for_the_embedded_and_a_folder_model() {
    let dir = temp_dir("unicode");
    let tiny_sd = fixture_path("tiny-sd").display().to_string();
    for (name, model) in [("embedded", None), ("tiny-sd", Some(tiny_sd.as_str()))] {
        let png = dir.join(format!("{name}.png"));
        let mut command = txt2img(&dir);
        if let Some(model) = model {
            command.args(["--model", model]);
        }
        let out = command
            .args([
                "--steps",
                "2",
                "--seed",
                "3",
                "--negative",
                UNICODE_NEGATIVE,
            ])
            .arg("--output")
            .arg(&png)
            .arg(UNICODE_PROMPT)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr_of(&out));
        let text = read_png_parameters(&png)
            .unwrap()
            .expect("parameters chunk");
        let expected_start = format!("{UNICODE_PROMPT}\nNegative prompt: {UNICODE_NEGATIVE}\n");
        assert!(text.starts_with(&expected_start), "{name}: {text}");
        assert!(text.contains("Seed: 3"), "{name}: {text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unwritable_output_is_refused_before_any_work() {
    let dir = temp_dir("unwritable");
    let missing_folder = dir.join("no-such-folder").join("out.png");
    let cases = [
        (missing_folder.clone(), "does not exist"),
        (dir.clone(), "is a folder"),
    ];
    for (output, needle) in cases {
        let out = txt2img(&dir)
            .args(["a handwritten digit seven", "--output"])
            .arg(&output)
            .output()
            .unwrap();
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{}", output.display());
        assert!(stderr.contains(&output.display().to_string()), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        // Refused before the model loaded or a step ran.
        assert!(
            !stderr.contains("loaded") && !stderr.contains("per step"),
            "{stderr}"
        );
    }
    assert!(files_ending(&dir, ".probe").is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ctrl_c_keeps_the_finished_images_and_leaves_no_partial_file() {
    let dir = temp_dir("ctrl-c");
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "a handwritten digit one\na handwritten digit two\na photo of a sneaker\na dress\n\
         a handwritten digit five\na photo of a bag\n",
    )
    .unwrap();
    let mut child = txt2img(&dir)
        .args(["--steps", "400", "--sampler", "ddim", "--seed", "5"])
        .arg("--prompts-file")
        .arg(&prompts)
        .arg("--output")
        .arg(dir.join("run.png"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.trim().ends_with("run-1.png"), "{first}");
    // SAFETY: sends SIGINT to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "the run ended as if complete");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let reported: Vec<&str> = std::iter::once(first.trim())
        .chain(rest.lines().map(str::trim))
        .filter(|l| !l.is_empty())
        .collect();
    assert!(reported.len() < 6, "every image was written: {reported:?}");
    for path in &reported {
        let image = image::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((image.width(), image.height()), (32, 32));
    }
    assert_eq!(files_ending(&dir, ".png").len(), reported.len());
    assert!(files_ending(&dir, ".partial").is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn impossible_counts_and_sizes_are_refused_before_work() {
    let dir = temp_dir("limits");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n\n").unwrap();
    let output = dir.join("out.png").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--prompts-file", empty.to_str().unwrap()],
            "empty.txt: has no prompts",
        ),
        (vec!["a dress", "--num-images", "0"], "--num-images = 0"),
        (
            vec!["a dress", "--num-images", "1000000"],
            "--num-images = 1000000",
        ),
        (vec!["a dress", "--steps", "0"], "--steps = 0"),
        (vec!["a dress", "--guidance", "NaN"], "--guidance = NaN"),
        (vec!["a dress", "--guidance=-2"], "--guidance = -2"),
        (vec!["a dress", "--strength", "nan"], "--strength = NaN"),
        (
            vec!["a dress", "--width", "65536", "--height", "65536"],
            "--no-memory-check",
        ),
        (
            vec![
                "a dress",
                "--num-images",
                "9000",
                "--width",
                "2048",
                "--height",
                "2048",
            ],
            "GiB is available",
        ),
    ];
    for (args, needle) in cases {
        let out = txt2img(&dir)
            .args(&args)
            .args(["--output", &output])
            .output()
            .unwrap();
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("per step"),
            "{args:?}: {stderr}"
        );
    }
    assert!(files_ending(&dir, ".png").is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

/// An installed binary: copied out of the target folder and run from elsewhere, it still finds
/// the embedded default model (compiled in, not looked up in the source tree).
#[test]
fn a_copied_binary_run_from_another_folder_draws_with_the_embedded_model() {
    let dir = temp_dir("installed");
    let bin = dir.join("bin");
    let work = dir.join("work");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    for (name, source) in [
        ("txt2img", env!("CARGO_BIN_EXE_txt2img")),
        ("diffuse", env!("CARGO_BIN_EXE_diffuse")),
    ] {
        let copy = bin.join(name);
        std::fs::copy(source, &copy).unwrap();
        let mut command = Command::new(&copy);
        if name == "diffuse" {
            command.arg("txt2img");
        }
        let out = command
            .current_dir(&work)
            .env("DIFFUSE_CACHE", dir.join("cache"))
            .args(["a photo of a sneaker", "--steps", "2", "--seed", "1"])
            .args(["--output", &format!("{name}.png")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr_of(&out));
        let png = work.join(format!("{name}.png"));
        let text = read_png_parameters(&png).unwrap().expect("parameters");
        assert!(text.contains("Model: embedded"), "{text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
