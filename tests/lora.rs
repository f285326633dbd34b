//! LoRA on the tiny SD U-Net: the adapter applied on the fly and the same adapter merged into the
//! weights give the same output, from a diffusers/PEFT file and from a kohya file alike; files
//! that do not fit the model are refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff};
use diffuse::checkpoint;
use diffuse::model::config::{read_json, UNetConfig};
use diffuse::model::lora::{Component, LoraFile, DOWN, META_ALPHA, META_RANK, UP};
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::unet::UNetConditioning;
use diffuse::sampler::SeededNoise;
use diffuse::weights::{load_checked_with, tensor_shapes, Attachments};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const RANK: usize = 4;
const ALPHA: f64 = 2.0;

fn unet_files() -> (PathBuf, PathBuf) {
    let dir = fixture_path("tiny-sd").join("unet");
    (
        dir.join("config.json"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
}

/// Random A and B for every attention projection and feed-forward layer of the U-Net's
/// transformer blocks, keyed by module path.
fn random_adapters(weights: &Path) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut noise = SeededNoise::new(7);
    let mut adapters = BTreeMap::new();
    let mut shapes: Vec<(String, Vec<usize>)> =
        tensor_shapes(weights).unwrap().into_iter().collect();
    shapes.sort();
    for (name, shape) in shapes {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let projection = [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "ff.net.0.proj",
            "ff.net.2",
        ]
        .iter()
        .any(|p| module.ends_with(&format!(".{p}")));
        if !projection || !module.contains(".transformer_blocks.") {
            continue;
        }
        let (out_dim, in_dim) = (shape[0], shape[1]);
        let down = (noise.randn(&[RANK, in_dim]).unwrap() * 0.2).unwrap();
        let up = (noise.randn(&[out_dim, RANK]).unwrap() * 0.2).unwrap();
        adapters.insert(module.to_string(), (down, up));
    }
    assert!(adapters.len() >= 8, "the tiny U-Net has attention layers");
    adapters
}

fn unet_output(attachments: Attachments) -> Tensor {
    let (config, weights) = unet_files();
    let config: UNetConfig = read_json(&config).unwrap();
    let context_dim = config.cross_attention_dim.expect("a cross-attention U-Net");
    let in_channels = config.in_channels;
    let unet = load_checked_with(&weights, DType::F32, &Device::Cpu, attachments, |vb| {
        UNet2DConditionModel::new(config, vb)
    })
    .unwrap();
    let mut noise = SeededNoise::new(1);
    let x = noise.randn(&[2, in_channels, 16, 16]).unwrap();
    let context = noise.randn(&[2, 7, context_dim]).unwrap();
    let t = Tensor::new(&[500f32, 20.], &Device::Cpu).unwrap();
    unet.forward(&x, &t, &UNetConditioning::text(context))
        .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    diffuse::ops::tensor::max_abs(t).unwrap()
}

fn save(path: &Path, tensors: Vec<(String, Tensor)>, metadata: &[(&str, String)]) {
    let metadata: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    checkpoint::save(path, &tensors, &metadata).unwrap();
}

fn merged(file: &Path) -> Attachments {
    let (_, weights) = unet_files();
    let lora = LoraFile::load(file).unwrap();
    Attachments {
        deltas: lora
            .deltas(Component::Unet, &tensor_shapes(&weights).unwrap(), 1.0)
            .unwrap(),
        adapters: HashMap::new(),
    }
}

#[test]
fn merged_lora_equals_adapter_on_the_fly_in_both_file_layouts() {
    let (_, weights) = unet_files();
    let adapters = random_adapters(&weights);
    let scale = ALPHA / RANK as f64;
    let dir = std::env::temp_dir().join(format!("diffuse-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let on_the_fly = Attachments {
        deltas: HashMap::new(),
        adapters: adapters
            .iter()
            .flat_map(|(module, (down, up))| {
                [
                    (format!("{module}.{DOWN}"), down.clone()),
                    (format!("{module}.{UP}"), (up * scale).unwrap()),
                ]
            })
            .collect(),
    };

    let peft = dir.join("peft.safetensors");
    save(
        &peft,
        adapters
            .iter()
            .flat_map(|(module, (down, up))| {
                [
                    (format!("unet.{module}.{DOWN}"), down.clone()),
                    (format!("unet.{module}.{UP}"), up.clone()),
                ]
            })
            .collect(),
        &[
            (META_ALPHA, ALPHA.to_string()),
            (META_RANK, RANK.to_string()),
        ],
    );
    let kohya = dir.join("kohya.safetensors");
    save(
        &kohya,
        adapters
            .iter()
            .flat_map(|(module, (down, up))| {
                let key = format!("lora_unet_{}", module.replace('.', "_"));
                [
                    (format!("{key}.lora_down.weight"), down.clone()),
                    (format!("{key}.lora_up.weight"), up.clone()),
                    (
                        format!("{key}.alpha"),
                        Tensor::new(ALPHA as f32, &Device::Cpu).unwrap(),
                    ),
                ]
            })
            .collect(),
        &[],
    );

    let base = unet_output(Attachments::default());
    let adapted = unet_output(on_the_fly);
    let from_peft = unet_output(merged(&peft));
    let from_kohya = unet_output(merged(&kohya));
    std::fs::remove_dir_all(&dir).ok();

    assert!(
        max_abs_diff(&base, &adapted) > 1e-3,
        "the adapters change the output"
    );
    let peft_diff = max_abs_diff(&adapted, &from_peft);
    assert!(
        peft_diff < 1e-4,
        "merged (PEFT file) vs on the fly: {peft_diff}"
    );
    let kohya_diff = max_abs_diff(&from_peft, &from_kohya);
    assert!(kohya_diff < 1e-6, "kohya vs PEFT file: {kohya_diff}");
}

#[test]
fn lora_files_that_do_not_fit_are_refused_by_name() {
    let (_, weights) = unet_files();
    let shapes = tensor_shapes(&weights).unwrap();
    let dir = std::env::temp_dir().join(format!("diffuse-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let small = |shape: &[usize]| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    type Case<'a> = (&'a str, Vec<(String, Tensor)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown-module",
            vec![
                (
                    "unet.no_such_block.to_q.lora_A.weight".into(),
                    small(&[2, 4]),
                ),
                (
                    "unet.no_such_block.to_q.lora_B.weight".into(),
                    small(&[4, 2]),
                ),
            ],
            "no_such_block.to_q",
        ),
        (
            "not-lora",
            vec![("unet.conv_in.weight".into(), small(&[2, 2]))],
            "unet.conv_in.weight",
        ),
        (
            "half-pair",
            vec![(
                "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight".into(),
                small(&[2, 4]),
            )],
            "mid_block_attentions_0_proj_in",
        ),
        // B A would be 200000 x 200000 (160 GB): refused from the shapes, before the product.
        (
            "huge-product",
            vec![
                (
                    "unet.mid_block.attentions.0.proj_in.lora_A.weight".into(),
                    small(&[1, 200_000]),
                ),
                (
                    "unet.mid_block.attentions.0.proj_in.lora_B.weight".into(),
                    small(&[200_000, 1]),
                ),
            ],
            "B A is [200000, 200000]",
        ),
    ];
    for (name, tensors, expected) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        save(&path, tensors, &[]);
        let err = LoraFile::load(&path)
            .and_then(|lora| lora.deltas(Component::Unet, &shapes, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The pixels of a PNG written by `txt2img` with these extra arguments.
fn txt2img_pixels(dir: &Path, name: &str, extra: &[String]) -> Vec<u8> {
    let output = dir.join(format!("{name}.png"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .arg("--model")
        .arg(fixture_path("tiny-sd"))
        .args([
            "--steps", "2", "--seed", "3", "--width", "32", "--height", "32",
        ])
        .args(extra)
        .arg("--output")
        .arg(&output)
        .arg("a photo of a cat")
        .output()
        .unwrap();
    common::assert_success(&out);
    image::open(&output).unwrap().to_rgb8().into_raw()
}

#[test]
fn txt2img_merges_a_kohya_lora_with_its_scale() {
    let (_, unet_weights) = unet_files();
    let text_weights = fixture_path("tiny-sd")
        .join("text_encoder")
        .join("model.safetensors");
    let dir = std::env::temp_dir().join(format!("diffuse-lora-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors = Vec::new();
    for (module, (down, up)) in random_adapters(&unet_weights) {
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        tensors.push((format!("{key}.lora_down.weight"), down));
        tensors.push((format!("{key}.lora_up.weight"), (up * 3.0).unwrap()));
    }
    // The fixture's text encoder names its weights without transformers' `text_model.`
    // prefix; kohya files always have it.
    let q_shape =
        tensor_shapes(&text_weights).unwrap()["encoder.layers.0.self_attn.q_proj.weight"].clone();
    let mut noise = SeededNoise::new(9);
    let key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    tensors.push((
        format!("{key}.lora_down.weight"),
        noise.randn(&[RANK, q_shape[1]]).unwrap(),
    ));
    tensors.push((
        format!("{key}.lora_up.weight"),
        noise.randn(&[q_shape[0], RANK]).unwrap(),
    ));
    let lora = dir.join("style.safetensors");
    save(&lora, tensors, &[]);

    // The merged update is linear in the scale, and each half lands on its own component: the
    // `lora_unet_` modules on U-Net weights, the `lora_te_` module on the text encoder's q_proj.
    let file = LoraFile::load(&lora).unwrap();
    let unet_shapes = tensor_shapes(&unet_weights).unwrap();
    let text_shapes = tensor_shapes(&text_weights).unwrap();
    for (component, shapes, expected) in [
        (
            Component::Unet,
            &unet_shapes,
            random_adapters(&unet_weights).len(),
        ),
        (Component::TextEncoder, &text_shapes, 1),
    ] {
        let full = file.deltas(component, shapes, 1.0).unwrap();
        let part = file.deltas(component, shapes, 0.37).unwrap();
        assert_eq!(full.len(), expected, "{component:?}");
        for (name, delta) in &full {
            assert!(shapes.contains_key(name), "{component:?}: {name}");
            let scaled = (delta * 0.37).unwrap();
            let err = max_abs_diff(&part[name], &scaled);
            assert!(err <= 1e-6 * max_abs(delta).max(1.0), "{name}: {err}");
            assert!(max_abs(delta) > 0.0, "{name}: no update");
        }
    }
    let text_delta = file
        .deltas(Component::TextEncoder, &text_shapes, 1.0)
        .unwrap();
    assert!(text_delta
        .keys()
        .all(|k| k.ends_with("layers.0.self_attn.q_proj.weight")));

    let base = txt2img_pixels(&dir, "base", &[]);
    let off = txt2img_pixels(
        &dir,
        "off",
        &["--lora".into(), format!("{}:0", lora.display())],
    );
    let on = txt2img_pixels(&dir, "on", &["--lora".into(), lora.display().to_string()]);
    assert_eq!(base, off, "a LoRA at scale 0 changes nothing");
    let changed = base.iter().zip(&on).filter(|(a, b)| a != b).count();
    assert!(
        changed > base.len() / 10,
        "only {changed} of {} bytes changed",
        base.len()
    );

    let missing = dir.join("missing.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .arg("--model")
        .arg(fixture_path("tiny-sd"))
        .arg("--lora")
        .arg(&missing)
        .arg("a cat")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.safetensors"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every adapter matrix gets a non-zero gradient through the U-Net (B is random here: at its
/// usual zero start A's gradient is zero by construction).
#[test]
fn every_lora_adapter_gets_a_gradient() {
    let (config, weights) = unet_files();
    let config: UNetConfig = read_json(&config).unwrap();
    let context_dim = config.cross_attention_dim.expect("a cross-attention U-Net");
    let in_channels = config.in_channels;
    let vars: Vec<(String, candle_core::Var)> = random_adapters(&weights)
        .into_iter()
        .flat_map(|(module, (down, up))| {
            [
                (
                    format!("{module}.{DOWN}"),
                    candle_core::Var::from_tensor(&down).unwrap(),
                ),
                (
                    format!("{module}.{UP}"),
                    candle_core::Var::from_tensor(&up).unwrap(),
                ),
            ]
        })
        .collect();
    let attachments = Attachments {
        deltas: HashMap::new(),
        adapters: vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect(),
    };
    let unet = load_checked_with(&weights, DType::F32, &Device::Cpu, attachments, |vb| {
        UNet2DConditionModel::new(config, vb)
    })
    .unwrap();
    let mut noise = SeededNoise::new(2);
    // 16x16 leaves 2x2 tokens at the mid block: with one token, self-attention is constant
    // (softmax over one key) and its q and k get no gradient by construction.
    let x = noise.randn(&[1, in_channels, 16, 16]).unwrap();
    let context = noise.randn(&[1, 5, context_dim]).unwrap();
    let t = Tensor::new(&[300f32], &Device::Cpu).unwrap();
    let loss = unet
        .forward(&x, &t, &UNetConditioning::text(context.clone()))
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dead: Vec<&String> = vars
        .iter()
        .filter(|(_, var)| {
            grads.get(var.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        dead.is_empty(),
        "{} of {} adapters got no gradient: {dead:?}",
        dead.len(),
        vars.len()
    );
}
