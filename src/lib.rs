//! `diffuse`: latent diffusion in Rust on candle.
//!
//! The crate is organised one concept a module: [`schedule`] holds the noise schedules,
//! [`sampler`] every reverse-process solver behind one trait, [`toy`] the 2-D swiss roll of
//! Sohl-Dickstein et al. 2015, [`cli`] the command line.

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod embedded;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod judge;
pub mod likelihood;
pub mod model;
pub mod pipeline;
pub mod runtime;
pub mod sampler;
pub mod schedule;
pub mod single_file;
pub mod tensor_ops;
pub mod tokenizer;
pub mod toy;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
