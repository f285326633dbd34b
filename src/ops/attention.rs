//! Scaled dot-product attention on the CPU that never holds the whole (N x M) score matrix.
//! The forward pass works through blocks of query rows whose scores stay in cache (inference and
//! training alike). Composed of candle ops, softmax(Q K^T / sqrt(d)) V would hold its scores,
//! their softmax and three intermediates per head until the backward pass: at SD 1.5's 64x64
//! latent (4096 tokens, 8 heads) 537 MB each, 19 GB over the five such layers. Here the graph
//! holds only Q, K, V and the output; the backward pass recomputes the probabilities a few heads
//! at a time, as FlashAttention does (Dao et al. 2022, algorithm 4, with whole rows instead of
//! tiles): one more Q K^T product for a fraction of the memory.

use super::gemm_bf16::{HeadScratch, PackedHeads};
use super::vector_math::{exp_nonpositive, with_wide_vectors};
use crate::ops::tensor::{contiguous_f32, single_thread_product};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// At most this many score values (heads x N x M) exist at once: 256 MB of f32.
const MAX_SCORES: usize = 1 << 26;

/// Query rows per task of the forward pass: 64 rows of 4096 scores are 1 MiB, cache-sized.
const QUERY_BLOCK: usize = 64;

/// Replaces a row of scores s by exp(scale (s - max s)), the numerators of softmax(scale s), and
/// returns their sum.
fn softmax_numerators(row: &mut [f32], scale: f32) -> f32 {
    with_wide_vectors(
        #[inline(always)]
        || {
            // Eight running maxima and sums, which the compiler keeps in one vector register each.
            let mut lanes = [f32::NEG_INFINITY; 8];
            let mut chunks = row.chunks_exact(8);
            for chunk in &mut chunks {
                for (lane, &value) in lanes.iter_mut().zip(chunk) {
                    *lane = if value > *lane { value } else { *lane };
                }
            }
            let max = lanes
                .iter()
                .chain(chunks.remainder())
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            for value in row.iter_mut() {
                *value = exp_nonpositive((*value - max) * scale);
            }
            let mut lanes = [0f32; 8];
            let mut chunks = row.chunks_exact(8);
            for chunk in &mut chunks {
                for (lane, value) in lanes.iter_mut().zip(chunk) {
                    *lane += value;
                }
            }
            lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
        },
    )
}

#[derive(Debug, Clone, Copy)]
struct Attention {
    scale: f64,
    max_scores: usize,
    /// Both products through the bf16 pair dot product (`gemm_bf16`), inference only: Q, K, V
    /// and the probabilities rounded to bf16, the sums in f32.
    bf16_products: bool,
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
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "memory-efficient-attention"
    }

    /// Blocks of query rows, one task each, so that a block's scores (rows x M) stay in cache
    /// from the product through the softmax to the product with V: the whole (N x M) matrix is
    /// never written to memory, and each thread reuses its scores buffer from block to block.
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (heads, n, d) = q_layout.shape().dims3()?;
        let (_, m, _) = k_layout.shape().dims3()?;
        let (_, _, dv) = v_layout.shape().dims3()?;
        let (q, k, v) = (
            contiguous_f32(q, q_layout, "attention", "the inputs")?,
            contiguous_f32(k, k_layout, "attention", "the inputs")?,
            contiguous_f32(v, v_layout, "attention", "the inputs")?,
        );
        let mut out = vec![0f32; heads * n * dv];
        // Blocks per head, so that no block straddles two heads.
        let blocks_per_head = n.div_ceil(QUERY_BLOCK);
        let mut tasks: Vec<(usize, usize, &mut [f32])> =
            Vec::with_capacity(heads * blocks_per_head);
        for (head, head_out) in out.chunks_mut(n * dv).enumerate() {
            for (block, block_out) in head_out.chunks_mut(QUERY_BLOCK * dv).enumerate() {
                tasks.push((head, block * QUERY_BLOCK, block_out));
            }
        }
        let scale = self.scale as f32;
        if self.bf16_products {
            let packed = PackedHeads::new(k, v, heads, m, d, dv);
            let score_row = packed.score_row();
            // Each thread's scratch space, reused from block to block.
            tasks.into_par_iter().try_for_each_init(
                || (HeadScratch::default(), Vec::new(), Vec::new()),
                |(scratch, scores, sums), (head, first, out_block)| -> Result<()> {
                    let rows = out_block.len() / dv;
                    let q_block = &q[(head * n + first) * d..][..rows * d];
                    packed.scores(head, q_block, scratch, scores)?;
                    sums.clear();
                    sums.extend(
                        scores
                            .chunks_exact_mut(score_row)
                            .map(|row| softmax_numerators(&mut row[..m], scale)),
                    );
                    packed.weighted_values(head, scores, scratch, out_block)?;
                    for (row, sum) in out_block.chunks_exact_mut(dv).zip(sums.iter()) {
                        let inverse = 1.0 / sum;
                        row.iter_mut().for_each(|value| *value *= inverse);
                    }
                    Ok(())
                },
            )?;
            return Ok((CpuStorage::F32(out), Shape::from((heads, n, dv))));
        }
        // Each thread's scores and row sums, reused from block to block.
        tasks.into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(scores, sums): &mut (Vec<f32>, Vec<f32>), (head, first, out_block)| {
                let rows = out_block.len() / dv;
                let q_block = &q[(head * n + first) * d..][..rows * d];
                let k_head = &k[head * m * d..][..m * d];
                let v_head = &v[head * m * dv..][..m * dv];
                scores.resize(rows * m, 0.0);
                // SAFETY: every matrix holds the elements its shape and strides name.
                unsafe {
                    single_thread_product((rows, m, d), scores, m, q_block, (d, 1), k_head, (1, d))
                };
                sums.clear();
                sums.extend(
                    scores
                        .chunks_exact_mut(m)
                        .map(|row| softmax_numerators(row, scale)),
                );
                // SAFETY: as above.
                unsafe {
                    single_thread_product(
                        (rows, dv, m),
                        out_block,
                        dv,
                        scores,
                        (m, 1),
                        v_head,
                        (dv, 1),
                    )
                };
                for (row, sum) in out_block.chunks_exact_mut(dv).zip(sums.iter()) {
                    let inverse = 1.0 / sum;
                    row.iter_mut().for_each(|value| *value *= inverse);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((heads, n, dv))))
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
        bf16_products: false,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`memory_efficient_attention`] with both products through the bf16 pair dot product
/// (`gemm_bf16`): the attention of a bf16 model that keeps f32 activations. Inference only.
pub fn attention_with_bf16_products(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = Attention {
        scale,
        max_scores: MAX_SCORES,
        bf16_products: true,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
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

    /// With bf16 products the output is the composed attention of the inputs rounded to bf16,
    /// within the rounding of the probabilities to bf16 (2^-9 relative); odd key counts, head
    /// widths that are not a multiple of 32 and query blocks of several tiles included.
    #[test]
    fn bf16_products_match_the_composed_attention_of_bf16_inputs() {
        for (heads, n, m, d, seed) in [
            (2, 77, 33, 40, 1u64),
            (1, 130, 77, 64, 2),
            (3, 5, 4096, 8, 3),
        ] {
            let draw = |rows: usize, seed: u64| {
                crate::ops::tensor::seeded_randn(&[heads, rows, d], seed)
                    .to_dtype(candle_core::DType::BF16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            };
            let (q, k, v) = (draw(n, seed), draw(m, seed + 10), draw(m, seed + 20));
            let scale = 1.0 / (d as f64).sqrt();
            let reference = composed(&q, &k, &v, scale).unwrap();
            let out = attention_with_bf16_products(&q, &k, &v, scale).unwrap();
            let diff = max_diff(&out, &reference);
            // Measured: 1.6e-3, 1.0e-3, 1.2e-4.
            assert!(diff < 4e-3, "{heads}x{n}x{m}x{d}: {diff}");
        }
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
            let op = Attention {
                scale,
                max_scores,
                bf16_products: false,
            };
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

    /// The blocked forward pass equals the composed attention where query blocks are cut at a
    /// head's end (N not a multiple of the block), with many keys and a value width of its own.
    #[test]
    fn blocked_forward_matches_with_partial_blocks() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 2 * QUERY_BLOCK + 9, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 300, 8), &device).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 300, 5), &device).unwrap();
        let reference = composed(&q, &k, &v, 0.35).unwrap();
        let out = memory_efficient_attention(&q, &k, &v, 0.35).unwrap();
        assert_eq!(out.dims(), reference.dims());
        assert!(max_diff(&out, &reference) < 1e-5);
    }
}
