//! The networks, named after the diffusers/transformers classes they mirror so that checkpoints
//! load unconverted: `unet` (UNet2DConditionModel), `vae` (AutoencoderKL), `text` (CLIPTextModel),
//! `blocks` (their shared layers), `config` (serde mirrors of the config.json files).
//!
//! Every op used on a trainable path has a backward pass in candle: softmax and layer norm are
//! composed from elementary ops (candle's fused versions have none), nearest upsampling is a
//! reshape and broadcast; attention (`attention`), convolutions (`conv_gemm`: matrix products in
//! place) and group norm (`norm`) have their own ops with a backward pass on the CPU; GPU training
//! convolves through shifted views (`im2col`).

pub mod attention;
pub mod blocks;
pub mod config;
pub mod conv_gemm;
pub mod im2col;
pub mod lora;
pub mod norm;
pub mod text;
pub mod unet;
pub mod vae;
pub mod vector_math;
