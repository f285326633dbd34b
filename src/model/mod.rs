//! The networks, named after the diffusers/transformers classes they mirror so that checkpoints
//! load unconverted: `unet` (UNet2DConditionModel), `vae` (AutoencoderKL), `text` (CLIPTextModel),
//! `blocks` (their shared layers), `config` (serde mirrors of the config.json files).
//!
//! Every op used on a trainable path has a backward pass in candle: softmax and layer norm are
//! composed from elementary ops (candle's fused versions have none), nearest upsampling is a
//! reshape and broadcast; attention, convolutions and group norm run through the kernels of
//! `ops`, which have their own backward passes.

pub mod blocks;
pub mod config;
pub mod dense;
pub mod lora;
pub mod taesd;
pub mod text;
pub mod unet;
pub mod vae;
