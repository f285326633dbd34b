//! The real SD 1.5, SD 2.1 (v-prediction, linear projections, per-block heads) and their VAE
//! configs build the published parameter counts. Weights are stride-0 views of one zero, so
//! nothing the size of the real models is allocated.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffuse::model::config::{UNetConfig, VaeConfig};
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::vae::AutoencoderKL;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct ShapeCounter(Arc<Mutex<usize>>);

impl SimpleBackend for ShapeCounter {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        *self.0.lock().unwrap() += s.elem_count();
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        // Every weight of the config exists; LoRA adapters (which the model looks for) do not.
        !name.contains(".lora_")
    }
}

fn count<T>(build: impl FnOnce(VarBuilder) -> diffuse::Result<T>) -> usize {
    let counter = ShapeCounter::default();
    let vb = VarBuilder::from_backend(Box::new(counter.clone()), DType::F32, Device::Cpu);
    build(vb).unwrap();
    let n = *counter.0.lock().unwrap();
    n
}

const SD15_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;

const SD21_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": true, "use_linear_projection": true}"#;

const SD_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;

#[test]
fn sd15_unet_has_its_published_size() {
    let config: UNetConfig = serde_json::from_str(SD15_UNET).unwrap();
    assert_eq!(
        count(|vb| UNet2DConditionModel::new(config, vb)),
        859_520_964
    );
}

#[test]
fn sd21_unet_has_its_published_size() {
    let config: UNetConfig = serde_json::from_str(SD21_UNET).unwrap();
    assert_eq!(config.heads().unwrap(), vec![5, 10, 20, 20]);
    assert_eq!(
        count(|vb| UNet2DConditionModel::new(config, vb)),
        865_910_724
    );
}

#[test]
fn sd_vae_has_its_published_size() {
    let config: VaeConfig = serde_json::from_str(SD_VAE).unwrap();
    assert_eq!(count(|vb| AutoencoderKL::new(config, vb)), 83_653_863);
}
