//! Scaled dot-product attention for training that keeps no (N x M) matrix for the backward
//! pass. Composed of candle ops, softmax(Q K^T / sqrt(d)) V holds its scores, their softmax and
//! three intermediates per head until the backward pass: at SD 1.5's 64x64 latent (4096 tokens,
//! 8 heads) 537 MB each, 19 GB over the five such layers. Here the graph holds only Q, K, V and
//! the output; the backward pass recomputes the probabilities a few heads at a time, as
//! FlashAttention does (Dao et al. 2022, algorithm 4, with whole rows instead of tiles): one
//! more Q K^T product for a fraction of the memory.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

/// At most this many score values (heads x N x M) exist at once: 256 MB of f32.
const MAX_SCORES: usize = 1 << 26;

#[derive(Debug, Clone, Copy)]
struct Attention {
    scale: f64,
    max_scores: usize,
}

/// The contiguous f32 values of a CPU tensor as a new tensor (the op's inputs arrive as storage).
fn as_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Tensor::from_slice(
            &data[start..end],
            layout.shape().clone(),
            &candle_core::Device::Cpu,
        ),
        None => candle_core::bail!("attention: the inputs must be contiguous"),
    }
}

impl Attention {
    /// Heads per chunk: as many as keep the scores under `max_scores`, at least one.
    fn chunk(&self, n: usize, m: usize) -> usize {
        (self.max_scores / (n * m).max(1)).max(1)
    }

    /// softmax(Q K^T scale) for heads `q` (h, N, d) and `k` (h, M, d).
    fn probabilities(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * self.scale)?)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (heads, n, _) = q.dims3()?;
        let chunk = self.chunk(n, k.dim(1)?);
        let mut outputs = Vec::with_capacity(heads.div_ceil(chunk));
        for start in (0..heads).step_by(chunk) {
            let len = chunk.min(heads - start);
            let (q, k, v) = (
                q.narrow(0, start, len)?,
                k.narrow(0, start, len)?,
                v.narrow(0, start, len)?,
            );
            outputs.push(self.probabilities(&q, &k)?.matmul(&v)?);
        }
        Tensor::cat(&outputs, 0)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "memory-efficient-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.forward(
            &as_tensor(q, q_layout)?,
            &as_tensor(k, k_layout)?,
            &as_tensor(v, v_layout)?,
        )?;
        let shape = out.shape().clone();
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1()?), shape))
    }

    /// With P = softmax(S), S = Q K^T scale and dO the output's gradient:
    /// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = dS K scale, dK = dS^T Q scale.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let grad_out = grad_out.contiguous()?;
        let (heads, n, _) = q.dims3()?;
        let chunk = self.chunk(n, k.dim(1)?);
        let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
        for start in (0..heads).step_by(chunk) {
            let len = chunk.min(heads - start);
            let part = |t: &Tensor| t.narrow(0, start, len);
            let (q, k, v, d_out) = (part(&q)?, part(&k)?, part(&v)?, part(&grad_out)?);
            let p = self.probabilities(&q, &k)?;
            dv.push(p.t()?.matmul(&d_out)?);
            let dp = d_out.matmul(&v.t()?)?;
            let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&row)?)? * self.scale)?;
            dq.push(ds.matmul(&k)?);
            dk.push(ds.t()?.matmul(&q)?);
        }
        Ok((
            Some(Tensor::cat(&dq, 0)?),
            Some(Tensor::cat(&dk, 0)?),
            Some(Tensor::cat(&dv, 0)?),
        ))
    }
}

/// softmax(Q K^T scale) V for f32 CPU tensors q (BH, N, d), k and v (BH, M, d), with a backward
/// pass that recomputes the probabilities instead of keeping them.
pub fn memory_efficient_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = Attention {
        scale,
        max_scores: MAX_SCORES,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)?.matmul(v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Output and all three gradients match the composed attention, also when the heads are
    /// split into chunks of one and two.
    #[test]
    fn matches_the_composed_attention_and_its_gradients() {
        let device = Device::Cpu;
        let q = Var::randn(0f32, 1., (3, 5, 4), &device).unwrap();
        let k = Var::randn(0f32, 1., (3, 7, 4), &device).unwrap();
        let v = Var::randn(0f32, 1., (3, 7, 4), &device).unwrap();
        let probe = Tensor::randn(0f32, 1., (3, 5, 4), &device).unwrap();
        let scale = 0.5;
        let reference = composed(&q, &k, &v, scale).unwrap();
        let reference_grads = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for max_scores in [MAX_SCORES, 35, 70] {
            let op = Attention { scale, max_scores };
            let out = q
                .as_tensor()
                .apply_op3(k.as_tensor(), v.as_tensor(), op)
                .unwrap();
            assert!(max_diff(&out, &reference) < 1e-5);
            let grads = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_diff(grads.get(var).unwrap(), reference_grads.get(var).unwrap());
                assert!(
                    diff < 1e-5,
                    "d{name} differs by {diff} (max_scores {max_scores})"
                );
            }
        }
    }
}
