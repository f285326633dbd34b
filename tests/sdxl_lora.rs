//! SDXL LoRA files in kohya's layout (U-Net modules under the original SGM block names,
//! `lora_te1_`/`lora_te2_` for the two text encoders) and diffusers/PEFT's (`unet.`,
//! `text_encoder.`, `text_encoder_2.`), made here from known matrices, merge into exactly the
//! updates alpha / r B A of the weights they name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff};
use diffuse::model::lora::{Component, LoraFile};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// (component, diffusers module, kohya module) of the adapted layers: attention projections in
/// a down, the mid and an up block, a resnet convolution, a downsampler, an upsampler, the
/// added-condition embedding, and one layer of each text encoder.
const MODULES: [(Component, &str, &str); 9] = [
    (
        Component::Unet,
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    ),
    (
        Component::Unet,
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
        "middle_block_1_transformer_blocks_1_attn2_to_k",
    ),
    (
        Component::Unet,
        "up_blocks.0.attentions.2.proj_out",
        "output_blocks_2_1_proj_out",
    ),
    (
        Component::Unet,
        "up_blocks.2.resnets.1.conv1",
        "output_blocks_7_0_in_layers_2",
    ),
    (
        Component::Unet,
        "down_blocks.0.downsamplers.0.conv",
        "input_blocks_3_0_op",
    ),
    (
        Component::Unet,
        "up_blocks.1.upsamplers.0.conv",
        "output_blocks_5_2_conv",
    ),
    (Component::Unet, "add_embedding.linear_1", "label_emb_0_0"),
    (
        Component::TextEncoder,
        "encoder.layers.0.self_attn.q_proj",
        "text_model_encoder_layers_0_self_attn_q_proj",
    ),
    (
        Component::TextEncoder2,
        "text_model.encoder.layers.1.mlp.fc1",
        "text_model_encoder_layers_1_mlp_fc1",
    ),
];

fn weights_path(component: Component) -> PathBuf {
    let root = fixture_path("tiny-sdxl");
    match component {
        Component::Unet => root.join("unet/diffusion_pytorch_model.safetensors"),
        Component::TextEncoder => root.join("text_encoder/model.safetensors"),
        Component::TextEncoder2 => root.join("text_encoder_2/model.safetensors"),
    }
}

fn shapes(component: Component) -> HashMap<String, Vec<usize>> {
    diffuse::weights::tensor_shapes(&weights_path(component)).unwrap()
}

/// Rank-2 matrices for a weight of `shape`: A (2, in[, kh, kw]) and B (out, 2[, 1, 1]).
fn matrices(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let device = Device::Cpu;
    let rank = 2;
    let fan_in: usize = shape[1..].iter().product();
    let values = |n: usize, offset: u64| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97 + offset) % 1000) as f32 / 1000.0) - 0.5)
            .collect()
    };
    let mut down_shape = vec![rank];
    down_shape.extend_from_slice(&shape[1..]);
    let mut up_shape = vec![shape[0], rank];
    up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
    let down = Tensor::from_vec(values(rank * fan_in, 1), down_shape, &device).unwrap();
    let up = Tensor::from_vec(values(shape[0] * rank, 7), up_shape, &device).unwrap();
    (down, up)
}

fn save(path: &Path, tensors: Vec<(String, Tensor)>) {
    diffuse::checkpoint::save(path, &tensors, &BTreeMap::new()).unwrap();
}

#[test]
fn kohya_and_peft_sdxl_loras_merge_into_the_expected_updates() {
    let dir = std::env::temp_dir().join(format!("diffuse-sdxl-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let alpha = 3.0f32;
    let (mut kohya, mut peft) = (Vec::new(), Vec::new());
    let mut expected: HashMap<(Component, String), Tensor> = HashMap::new();
    for (seed, (component, module, sgm)) in MODULES.iter().enumerate() {
        let weight = format!("{module}.weight");
        let shape = shapes(*component)[&weight].clone();
        let (down, up) = matrices(&shape, seed as u64);
        let rank = down.dim(0).unwrap();
        let product = up
            .reshape((shape[0], rank))
            .unwrap()
            .matmul(&down.reshape((rank, down.elem_count() / rank)).unwrap())
            .unwrap()
            .reshape(shape.as_slice())
            .unwrap();
        expected.insert((*component, weight), product);
        let kohya_prefix = match component {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te1",
            Component::TextEncoder2 => "lora_te2",
        };
        kohya.push((
            format!("{kohya_prefix}_{sgm}.lora_down.weight"),
            down.clone(),
        ));
        kohya.push((format!("{kohya_prefix}_{sgm}.lora_up.weight"), up.clone()));
        kohya.push((
            format!("{kohya_prefix}_{sgm}.alpha"),
            Tensor::new(alpha, &Device::Cpu).unwrap(),
        ));
        let peft_prefix = component.name();
        peft.push((format!("{peft_prefix}.{module}.lora_A.weight"), down));
        peft.push((format!("{peft_prefix}.{module}.lora_B.weight"), up));
    }
    let kohya_path = dir.join("kohya.safetensors");
    let peft_path = dir.join("peft.safetensors");
    save(&kohya_path, kohya);
    save(&peft_path, peft);

    // kohya: alpha / r = 1.5; PEFT without alpha: 1; each times the multiplier 0.5.
    for (path, scale) in [(&kohya_path, 0.5 * alpha as f64 / 2.0), (&peft_path, 0.5)] {
        let file = LoraFile::load(path).unwrap();
        for component in [
            Component::Unet,
            Component::TextEncoder,
            Component::TextEncoder2,
        ] {
            let deltas = file.deltas(component, &shapes(component), 0.5).unwrap();
            let wanted: Vec<_> = expected.keys().filter(|(c, _)| *c == component).collect();
            assert_eq!(
                deltas.len(),
                wanted.len(),
                "{}: {component:?}",
                path.display()
            );
            for key in wanted {
                let delta = deltas
                    .get(&key.1)
                    .unwrap_or_else(|| panic!("{}: no update of {}", path.display(), key.1));
                let error = max_abs_diff(delta, &(&expected[key] * scale).unwrap());
                assert!(error < 1e-6, "{}: {} off by {error}", path.display(), key.1);
            }
        }
    }

    // Loaded with the pipeline, both text encoders change.
    let base =
        StableDiffusion::load_dir(&fixture_path("tiny-sdxl"), LoadOptions::default()).unwrap();
    let adapted = StableDiffusion::load_dir(
        &fixture_path("tiny-sdxl"),
        LoadOptions {
            loras: vec![(kohya_path.clone(), 1.0)],
            ..Default::default()
        },
    )
    .unwrap();
    let (before, _) = base.encode_prompt("a photo of a cat").unwrap();
    let (after, _) = adapted.encode_prompt("a photo of a cat").unwrap();
    let width_1 = base.text_encoder.config.hidden_size;
    let changed = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) > 1e-4;
    assert!(changed(
        &before.context.narrow(2, 0, width_1).unwrap(),
        &after.context.narrow(2, 0, width_1).unwrap()
    ));
    assert!(changed(
        &before.pooled.unwrap().to_dtype(DType::F32).unwrap(),
        &after.pooled.unwrap().to_dtype(DType::F32).unwrap()
    ));

    // An SD 1.x model refuses a file that adapts a second text encoder.
    let err = StableDiffusion::load_dir(
        &fixture_path("tiny-sd"),
        LoadOptions {
            loras: vec![(peft_path, 1.0)],
            ..Default::default()
        },
    )
    .err()
    .expect("an SD 1.x model took an SDXL LoRA")
    .to_string();
    assert!(
        err.contains("text_encoder_2") || err.contains("matches no weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
