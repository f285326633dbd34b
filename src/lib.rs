//! `diffuse`: latent diffusion in Rust on candle.
//!
//! The crate is organised one concept a module: [`schedule`] holds the noise schedules,
//! [`sampler`] every reverse-process solver behind one trait.

pub mod error;
pub mod sampler;
pub mod schedule;
pub mod tensor_ops;

pub use error::{Error, Result};
