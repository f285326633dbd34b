//! `diffuse eval-txt2img --prompts`: every listed prompt is drawn in the listed style and read by
//! the given judge against its own class, and a list naming a class the judge lacks is refused
//! before anything is drawn.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A grey 28x28 judge of `names` that reads every picture as class `always`: zero weights and
/// a large bias on that class's logit.
fn write_constant_judge(dir: &Path, names: &[&str], always: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let mut bias = vec![0f32; names.len()];
    bias[always] = 100.0;
    let tensors = vec![
        ("conv1.weight".to_string(), zeros(&[32, 1, 3, 3])),
        ("conv1.bias".to_string(), zeros(&[32])),
        ("conv2.weight".to_string(), zeros(&[64, 32, 3, 3])),
        ("conv2.bias".to_string(), zeros(&[64])),
        ("fc1.weight".to_string(), zeros(&[128, 64 * 7 * 7])),
        ("fc1.bias".to_string(), zeros(&[128])),
        ("fc2.weight".to_string(), zeros(&[names.len(), 128])),
        (
            "fc2.bias".to_string(),
            Tensor::from_vec(bias, names.len(), &Device::Cpu).unwrap(),
        ),
    ];
    diffuse::checkpoint::save(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    let classes = serde_json::json!({ "classes": names });
    std::fs::write(dir.join("classes.json"), classes.to_string()).unwrap();
}

fn eval(dir: &Path, list: &str) -> std::process::Output {
    std::fs::write(dir.join("list.tsv"), list).unwrap();
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["eval-txt2img", "--no-datasets", "--steps", "2"])
        .args(["--per-listed-prompt", "2", "--json", "--model"])
        .arg(weights)
        .arg("--prompts")
        .arg(dir.join("list.tsv"))
        .arg("--emoji-judge")
        .arg(dir.join("emoji"))
        .arg("--doodle-judge")
        .arg(dir.join("doodles"))
        .output()
        .unwrap()
}

/// The `sets` of a successful run's JSON line.
fn judged_sets(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    json["sets"].as_array().unwrap().clone()
}

#[test]
fn listed_prompts_are_read_against_their_own_class() {
    let dir = temp_dir("listed");
    write_constant_judge(
        &dir.join("emoji"),
        &["cat face", "dog face", "red apple"],
        1,
    );
    write_constant_judge(&dir.join("doodles"), &["cat", "dog"], 0);
    let output = eval(
        &dir,
        "# prompt\temoji\tdoodle\na cat\tcat face\tcat\na dog\tdog face\tdog\nan apple\tred apple\t-\n",
    );
    let sets = judged_sets(&output);
    assert_eq!(sets.len(), 2);
    // The emoji judge always says "dog face": only "a dog, emoji" is read as asked.
    assert_eq!(sets[0]["set"], "emoji");
    assert_eq!(
        sets[0]["prompts"],
        serde_json::json!(["a cat, emoji", "a dog, emoji", "an apple, emoji"])
    );
    assert_eq!(sets[0]["images"], 6);
    assert_eq!(
        sets[0]["per_prompt_accuracy"],
        serde_json::json!([0.0, 1.0, 0.0])
    );
    assert!((sets[0]["accuracy"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(sets[0]["class_histogram"], serde_json::json!([0, 6, 0]));
    // The doodle set holds only the prompts with a doodle class; its judge always says "cat".
    assert_eq!(
        sets[1]["prompts"],
        serde_json::json!(["a cat, doodle", "a dog, doodle"])
    );
    assert_eq!(
        sets[1]["per_prompt_accuracy"],
        serde_json::json!([1.0, 0.0])
    );
}

#[test]
fn a_list_without_doodle_classes_judges_only_emoji() {
    let dir = temp_dir("no-doodles");
    write_constant_judge(&dir.join("emoji"), &["cat face", "dog face"], 0);
    write_constant_judge(&dir.join("doodles"), &["cat"], 0);
    let output = eval(&dir, "cat face\tcat face\t-\ndog face\tdog face\t-\n");
    let sets = judged_sets(&output);
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["set"], "emoji");
    assert_eq!(
        sets[0]["per_prompt_accuracy"],
        serde_json::json!([1.0, 0.0])
    );
}

#[test]
fn a_class_the_judge_lacks_is_named_before_drawing() {
    let dir = temp_dir("unknown");
    write_constant_judge(&dir.join("emoji"), &["cat face"], 0);
    write_constant_judge(&dir.join("doodles"), &["cat"], 0);
    let output = eval(&dir, "a cat\tcat face\tcat\na unicorn\tunicorn face\t-\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"unicorn face\"")
            && stderr.contains("a unicorn")
            && stderr.contains("not a class of the judge"),
        "{stderr}"
    );
    let output = eval(&dir, "a cat\tcat face\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("line 1") && stderr.contains("list.tsv"),
        "{stderr}"
    );
}
