//! Where samplers get their Gaussian noise.

use candle_core::{Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A source of N(0, I) tensors.
pub trait NoiseSource {
    /// A standard normal tensor with the shape, dtype and device of `like`.
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// Seeded noise: the same seed gives the same tensors on every machine (ChaCha8, not the
/// platform's RNG, and not candle's device RNG, which cannot be seeded on the CPU).
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `n` standard normal draws.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }

    /// A standard normal f32 tensor of the given shape on the CPU.
    pub fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.normals(n), shape, &candle_core::Device::Cpu)
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }
}

impl NoiseSource for SeededNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.randn(like.dims())?
            .to_device(like.device())?
            .to_dtype(like.dtype())
    }
}

/// Replays recorded noise tensors in order (the diffusers fixtures record every draw).
pub struct ReplayNoise {
    tensors: Vec<Tensor>,
    next: usize,
}

impl ReplayNoise {
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors, next: 0 }
    }

    /// Number of tensors handed out so far.
    pub fn used(&self) -> usize {
        self.next
    }
}

impl NoiseSource for ReplayNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let Some(t) = self.tensors.get(self.next) else {
            candle_core::bail!(
                "replay noise exhausted after {} tensors",
                self.tensors.len()
            )
        };
        self.next += 1;
        if t.dims() != like.dims() {
            candle_core::bail!(
                "replay noise tensor {} has shape {:?}, the sample has {:?}",
                self.next - 1,
                t.dims(),
                like.dims()
            )
        }
        t.to_dtype(like.dtype())
    }
}
