//! After one backward pass every parameter of a small U-Net gets a non-zero gradient: no op on
//! the path silently drops gradients (candle's fused softmax and layer norm would).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use diffuse::model::config::UNetConfig;
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::unet::UNetConditioning;

fn config(json: &str) -> UNetConfig {
    serde_json::from_str(json).unwrap()
}

fn check_all_gradients(
    config: UNetConfig,
    x: Tensor,
    context: Option<Tensor>,
    labels: Option<Tensor>,
) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(config, vb).unwrap();
    let t = Tensor::new(&[10f32, 500.], &Device::Cpu).unwrap();
    let out = unet
        .forward(
            &x,
            &t,
            &UNetConditioning {
                context,
                class_labels: labels,
                ..Default::default()
            },
        )
        .unwrap();
    let target = x.ones_like().unwrap();
    let loss = (out - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut dead = Vec::new();
    for (name, var) in data.iter() {
        let norm = grads
            .get(var.as_tensor())
            .map(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0);
        if norm.is_nan() || norm <= 0.0 {
            dead.push(name.clone());
        }
    }
    dead.sort();
    assert!(!data.is_empty());
    assert!(
        dead.is_empty(),
        "{} of {} parameters got no gradient: {dead:?}",
        dead.len(),
        data.len()
    );
}

#[test]
fn cross_attention_unet_gradients_reach_every_parameter() {
    let c = config(
        r#"{"in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 12,
            "norm_num_groups": 4}"#,
    );
    let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1., (2, 5, 12), &Device::Cpu).unwrap();
    check_all_gradients(c, x, Some(context), None);
}

#[test]
fn linear_projection_unet_gradients_reach_every_parameter() {
    let c = config(
        r#"{"in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1, "attention_head_dim": [2, 4], "cross_attention_dim": 12,
            "norm_num_groups": 4, "use_linear_projection": true, "upcast_attention": true}"#,
    );
    let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1., (2, 5, 12), &Device::Cpu).unwrap();
    check_all_gradients(c, x, Some(context), None);
}

#[test]
fn pixel_ddpm_unet_with_classes_gradients_reach_every_parameter() {
    // The pixel-space configuration: one channel, no cross-attention, a class embedding, odd
    // spatial size (7x7 halves to 4x4 and comes back to 7x7).
    let c = config(
        r#"{"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "mid_block_type": "UNetMidBlock2D",
            "layers_per_block": 1, "norm_num_groups": 4, "num_class_embeds": 2}"#,
    );
    let x = Tensor::randn(0f32, 1., (2, 1, 7, 7), &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    check_all_gradients(c, x, None, Some(labels));
}
