//! The real SD 1.5, SD 2.1 (v-prediction, linear projections, per-block heads), their VAE and
//! the SDXL base configs in `configs/sdxl/` (two text encoders, added conditions, per-block
//! transformer depths) build the published parameter counts. Weights are stride-0 views of one zero, so
//! nothing the size of the real models is allocated.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffuse::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use diffuse::model::text::ClipTextModel;
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::vae::AutoencoderKL;
use std::sync::{Arc, Mutex};

/// Counts the elements of every weight asked for; `text_projection` exists only when
/// `with_projection` (a `CLIPTextModelWithProjection` checkpoint).
#[derive(Clone, Default)]
struct ShapeCounter(Arc<Mutex<usize>>, bool);

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
        // Every weight of the config exists; LoRA adapters and 8-bit scales (which the model
        // looks for) do not, nor a text projection unless asked for.
        !name.contains(".lora_")
            && !name.ends_with("weight_scale")
            && (self.1 || name != "text_projection.weight")
    }
}

fn count<T>(build: impl FnOnce(VarBuilder) -> diffuse::Result<T>) -> usize {
    count_with(false, build)
}

fn count_with<T>(
    with_projection: bool,
    build: impl FnOnce(VarBuilder) -> diffuse::Result<T>,
) -> usize {
    let counter = ShapeCounter(Arc::default(), with_projection);
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

fn sdxl_config(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/sdxl")
        .join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// SDXL base 1.0 as diffusers and transformers count it: U-Net 2,567,463,684, VAE
/// 83,653,863, CLIP ViT-L text model 123,060,480, OpenCLIP bigG text model with its
/// projection 694,659,840.
#[test]
fn sdxl_configs_have_their_published_sizes() {
    let unet: UNetConfig = serde_json::from_str(&sdxl_config("unet")).unwrap();
    assert_eq!(unet.heads().unwrap(), vec![5, 10, 20]);
    assert_eq!(
        count(|vb| UNet2DConditionModel::new(unet, vb)),
        2_567_463_684
    );
    let vae: VaeConfig = serde_json::from_str(&sdxl_config("vae")).unwrap();
    assert_eq!(vae.scaling_factor, 0.13025);
    assert_eq!(count(|vb| AutoencoderKL::new(vae, vb)), 83_653_863);
    let text: ClipTextConfig = serde_json::from_str(&sdxl_config("text_encoder")).unwrap();
    assert_eq!(count(|vb| ClipTextModel::new(text, vb)), 123_060_480);
    let text_2: ClipTextConfig = serde_json::from_str(&sdxl_config("text_encoder_2")).unwrap();
    assert_eq!(
        count_with(true, |vb| ClipTextModel::new(text_2, vb)),
        694_659_840
    );
    diffuse::sampler::SchedulerConfig::from_json_str(&sdxl_config("scheduler")).unwrap();
}
