//! The diffusion process itself, whatever samples from it or trains on it: the noise schedules
//! and the forward process q(x_t | x_0) (`schedule`), the reverse process's variance
//! (`variance`), the training config's `[diffusion]` section (`config`), the variational bound
//! and exact likelihoods (`likelihood`), and the score SDEs of Song et al. 2021 (`sde`).

pub mod config;
pub mod likelihood;
pub mod schedule;
pub mod sde;
pub mod variance;
