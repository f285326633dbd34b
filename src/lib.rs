//! `diffuse`: latent diffusion in Rust on candle.
//!
//! Layers, each importing only from those below it (`tests/layers.rs` holds the crate to it):
//! kernels ([`ops`], [`error`]) -> networks and files ([`model`], [`weights`], [`tokenizer`],
//! [`hub`], [`image_io`], [`data`], ...) -> the diffusion process ([`diffusion`]) -> samplers
//! ([`sampler`]) -> inference pipelines ([`pipeline`]) -> training ([`train`], [`toy`]) -> front
//! ends ([`cli`], [`serve`] and the binaries).

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod diffusion;
pub mod embedded;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod judge;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod sampler;
pub mod serve;
pub mod single_file;
pub mod tokenizer;
pub mod toy;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
