//! Writes the seed inputs that are binary (safetensors weights, LoRAs, checkpoints) into
//! `fuzz/corpus/<target>/`; the text seeds are committed as they are.
//! `cargo run --manifest-path fuzz/Cargo.toml --release --example make_seeds`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use diffuse_fuzz::{repo_root, tiny_vae_config, TINY_PIXEL_CONFIG};
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = repo_root().join("fuzz/corpus");
    let device = Device::Cpu;

    // weights: the tiny VAE's own weights, complete.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    diffuse::model::vae::AutoencoderKL::new(tiny_vae_config(), vb)?;
    std::fs::create_dir_all(corpus.join("weights"))?;
    vars.save(corpus.join("weights/tiny-vae.safetensors"))?;

    // lora: one attention projection of the tiny SD U-Net and one of its text encoder, in the
    // PEFT layout and in kohya's (with alpha).
    let fixture = repo_root().join("tests/fixtures/tiny-sd");
    let unet_module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let text_module = "encoder.layers.0.self_attn.q_proj";
    let unet_shapes =
        diffuse::weights::tensor_shapes(&fixture.join("unet/diffusion_pytorch_model.safetensors"))?;
    let text_shapes =
        diffuse::weights::tensor_shapes(&fixture.join("text_encoder/model.safetensors"))?;
    let unet_shape = &unet_shapes[&format!("{unet_module}.weight")];
    let text_shape = &text_shapes[&format!("{text_module}.weight")];
    let rank = 2;
    let pair = |shape: &[usize]| -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            Tensor::randn(0f32, 0.1, (rank, shape[1]), &device)?,
            Tensor::randn(0f32, 0.1, (shape[0], rank), &device)?,
        ))
    };
    let (a, b) = pair(unet_shape)?;
    let (ta, tb) = pair(text_shape)?;
    std::fs::create_dir_all(corpus.join("lora"))?;
    let peft = [
        (format!("unet.{unet_module}.lora_A.weight"), a.clone()),
        (format!("unet.{unet_module}.lora_B.weight"), b.clone()),
        (
            format!("text_encoder.{text_module}.lora_A.weight"),
            ta.clone(),
        ),
        (
            format!("text_encoder.{text_module}.lora_B.weight"),
            tb.clone(),
        ),
    ];
    diffuse::checkpoint::save(
        &corpus.join("lora/peft.safetensors"),
        &peft,
        &BTreeMap::new(),
    )?;
    let kohya_unet = format!("lora_unet_{}", unet_module.replace('.', "_"));
    let kohya_text = format!("lora_te_{}", text_module.replace('.', "_"));
    let kohya = [
        (format!("{kohya_unet}.lora_down.weight"), a),
        (format!("{kohya_unet}.lora_up.weight"), b),
        (format!("{kohya_unet}.alpha"), Tensor::new(1f32, &device)?),
        (format!("{kohya_text}.lora_down.weight"), ta),
        (format!("{kohya_text}.lora_up.weight"), tb),
        (format!("{kohya_text}.alpha"), Tensor::new(2f32, &device)?),
    ];
    diffuse::checkpoint::save(
        &corpus.join("lora/kohya.safetensors"),
        &kohya,
        &BTreeMap::new(),
    )?;

    // checkpoint: one saved by the tiny pixel trainer before any step.
    let config = diffuse::train::config::TrainConfig::from_toml_str(TINY_PIXEL_CONFIG)?;
    let trainer = diffuse::train::pixel::PixelTrainer::new(config, &device)?;
    std::fs::create_dir_all(corpus.join("checkpoint"))?;
    trainer.save(&corpus.join("checkpoint/tiny-pixel.safetensors"))?;
    // image: small pictures in each format and pixel layout the decoders take.
    std::fs::create_dir_all(corpus.join("image"))?;
    let rgba = image::RgbaImage::from_fn(9, 7, |x, y| {
        image::Rgba([x as u8 * 20, y as u8 * 30, 99, 200])
    });
    let gray16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(5, 6, |x, y| {
        image::Luma([(x * 9000 + y * 500) as u16])
    });
    image::DynamicImage::ImageRgba8(rgba.clone()).save(corpus.join("image/rgba.png"))?;
    image::DynamicImage::ImageLuma16(gray16).save(corpus.join("image/gray16.png"))?;
    image::DynamicImage::ImageRgba8(rgba.clone())
        .to_rgb8()
        .save(corpus.join("image/rgb.jpg"))?;
    image::DynamicImage::ImageRgba8(rgba).save(corpus.join("image/rgba.webp"))?;
    println!("seeds written under {}", corpus.display());
    Ok(())
}
