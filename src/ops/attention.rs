//! Scaled dot-product attention on the CPU that never holds the whole (N x M) score matrix.
//! The forward pass works through blocks of query rows whose scores stay in cache (inference and
//! training alike). Composed of candle ops, softmax(Q K^T / sqrt(d)) V would hold its scores,
//! their softmax and three intermediates per head until the backward pass: at SD 1.5's 64x64
//! latent (4096 tokens, 8 heads) 537 MB each, 19 GB over the five such layers. Here the graph
//! holds only Q, K, V and the output; the backward pass recomputes the probabilities a block of
//! query rows at a time, as FlashAttention does (Dao et al. 2022, algorithm 4, with whole rows
//! instead of tiles): one more Q K^T product for a fraction of the memory.

use super::gemm_bf16::{HeadScratch, PackedHeads};
use super::gemm_f32;
use super::vector_math::{self, with_wide_vectors};
use crate::ops::tensor::{
    contiguous_f32, single_thread_product, single_thread_product_into as product, storage_f32,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows whose probabilities and score gradients one thread holds at once in the backward
/// pass: 128 rows of 4096 keys are 2 MiB each.
const BACKWARD_ROWS: usize = 128;

/// Query rows per task of the forward pass: 64 rows of 4096 scores are 1 MiB, cache-sized.
const QUERY_BLOCK: usize = 64;
// The strips' forward pass holds a block's queries as one strip.
const _: () = assert!(QUERY_BLOCK == gemm_f32::STRIP);
/// Query rows per task with bf16 products: 32 rows of 4096 scores (512 KiB, and their bf16
/// numerators) stay in L2 between the product that writes them and the softmax that reads
/// them.
const BF16_QUERY_BLOCK: usize = 32;

/// Sets the scores of keys past their query to -inf in rows of scores for the queries
/// `first..`, one row a query (`row_len` apart, M keys each): their numerators become 0.
fn mask_future_rows(scores: &mut [f32], row_len: usize, m: usize, first: usize) {
    for (r, row) in scores.chunks_mut(row_len).enumerate() {
        let allowed = (first + r + 1).min(m);
        row[allowed..m].fill(f32::NEG_INFINITY);
    }
}

/// A thread's buffers for the forward pass through `gemm_f32`'s strips, which works on the
/// transposed scores of a block of (at most 64) queries: S^T = K Q^T with the block's Q^T as the
/// one strip (K read where it lies), the softmax down its columns, and O^T = V^T P^T with P^T,
/// the numerators just written, as the strip (V read where it lies, as V^T). The gemm crate would
/// copy K into panels for every block; its products for these shapes (40 or 80 deep, 40 or 80
/// wide) ran at 125-145 GFLOP/s a core against 180-190 for the strips (2-core Xeon).
#[derive(Default)]
struct TransposedScratch {
    queries: gemm_f32::Strip,
    scores: gemm_f32::Strip,
    out_t: Vec<f32>,
}

impl TransposedScratch {
    /// softmax(scale q_block K^T) V into `out_block` (rows x dv); with `causal`, the block's
    /// first query being query `first`, each query sees only the keys up to its own index.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        q_block: &[f32],
        k_head: &[f32],
        v_head: &[f32],
        (d, dv): (usize, usize),
        scale: f32,
        causal: Option<usize>,
        out_block: &mut [f32],
    ) -> Result<()> {
        const WIDTH: usize = gemm_f32::STRIP;
        let rows = out_block.len() / dv;
        let m = k_head.len() / d.max(1);
        let queries = self.queries.rows_mut(d);
        // Columns past the block's queries score 0 against every key: computed and dropped.
        queries.fill(0.0);
        for (r, query) in q_block.chunks_exact(d).enumerate() {
            for (p, &value) in query.iter().enumerate() {
                queries[p * WIDTH + r] = value;
            }
        }
        let scores = self.scores.rows_mut(m);
        self.queries.product(k_head, (d, 1), m, scores, WIDTH)?;
        if let Some(first) = causal {
            // Key j is hidden from the block's columns c with first + c < j.
            for (j, row) in scores.chunks_exact_mut(WIDTH).enumerate().skip(first + 1) {
                row[..(j - first).min(WIDTH)].fill(f32::NEG_INFINITY);
            }
        }
        // SAFETY: `gemm_f32::available` (checked by the caller) is AVX-512 Foundation.
        let sums = unsafe { vector_math::softmax_columns_avx512(scores, m, scale) };
        self.out_t.resize(dv * WIDTH, 0.0);
        self.scores
            .product(v_head, (1, dv), dv, &mut self.out_t, WIDTH)?;
        for (r, (row, sum)) in out_block
            .chunks_exact_mut(dv)
            .zip(sums)
            .enumerate()
            .take(rows)
        {
            let inverse = 1.0 / sum;
            for (c, value) in row.iter_mut().enumerate() {
                *value = self.out_t[c * WIDTH + r] * inverse;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Attention {
    scale: f64,
    /// Query rows per block of the backward pass.
    backward_rows: usize,
    /// Both products through the bf16 pair dot product (`gemm_bf16`), inference only: Q, K, V
    /// and the probabilities rounded to bf16, the sums in f32.
    bf16_products: bool,
    /// Query i attends to keys 0..=i only (a text encoder's causal mask).
    causal: bool,
    /// The f32 forward pass through `gemm_f32`'s strips (where the CPU has AVX-512), else
    /// through the gemm crate.
    strips: bool,
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
        let block_rows = if self.bf16_products {
            BF16_QUERY_BLOCK
        } else {
            QUERY_BLOCK
        };
        let blocks_per_head = n.div_ceil(block_rows);
        let mut tasks: Vec<(usize, usize, &mut [f32])> =
            Vec::with_capacity(heads * blocks_per_head);
        for (head, head_out) in out.chunks_mut(n * dv).enumerate() {
            for (block, block_out) in head_out.chunks_mut(block_rows * dv).enumerate() {
                tasks.push((head, block * block_rows, block_out));
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
                    if self.causal {
                        mask_future_rows(scores, score_row, m, first);
                    }
                    packed.softmax_numerators(scores, scale, scratch, sums);
                    packed.weighted_values(head, scratch, out_block)?;
                    for (row, sum) in out_block.chunks_exact_mut(dv).zip(sums.iter()) {
                        let inverse = 1.0 / sum;
                        row.iter_mut().for_each(|value| *value *= inverse);
                    }
                    Ok(())
                },
            )?;
            return Ok((CpuStorage::F32(out), Shape::from((heads, n, dv))));
        }
        if self.strips && gemm_f32::available() {
            tasks.into_par_iter().try_for_each_init(
                TransposedScratch::default,
                |scratch, (head, first, out_block)| {
                    let rows = out_block.len() / dv;
                    let q_block = &q[(head * n + first) * d..][..rows * d];
                    let k_head = &k[head * m * d..][..m * d];
                    let v_head = &v[head * m * dv..][..m * dv];
                    let causal = self.causal.then_some(first);
                    scratch.block(q_block, k_head, v_head, (d, dv), scale, causal, out_block)
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
                if self.causal {
                    mask_future_rows(scores, m, m, first);
                }
                sums.clear();
                sums.extend(
                    scores
                        .chunks_exact_mut(m)
                        .map(|row| vector_math::softmax_numerators(row, scale)),
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
    /// dV = P^T dO, dP = dO V^T, dS = scale P (dP - rowsum(dP P)), dQ = dS K, dK = dS^T Q.
    /// One task per head; within it, blocks of query rows whose P and dS stay in cache, dV and
    /// dK summed over the blocks.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (heads, n, d) = q.dims3()?;
        let (_, m, dv) = v.dims3()?;
        let grad_out = grad_out.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (g_storage, g_layout) = grad_out.storage_and_layout();
        let (q, k, v, grad_out) = (
            storage_f32(&q_storage, q_layout, "attention", "the queries")?,
            storage_f32(&k_storage, k_layout, "attention", "the keys")?,
            storage_f32(&v_storage, v_layout, "attention", "the values")?,
            storage_f32(&g_storage, g_layout, "attention", "the output's gradient")?,
        );
        let mut dq = vec![0f32; heads * n * d];
        let mut dk = vec![0f32; heads * m * d];
        let mut dv_all = vec![0f32; heads * m * dv];
        let scale = self.scale as f32;
        let rows_per_block = self.backward_rows.max(1);
        dq.par_chunks_mut(n * d)
            .zip(dk.par_chunks_mut(m * d))
            .zip(dv_all.par_chunks_mut(m * dv))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(p, ds): &mut (Vec<f32>, Vec<f32>), (head, ((dq, dk), dv_head))| {
                    let q = &q[head * n * d..][..n * d];
                    let k = &k[head * m * d..][..m * d];
                    let v = &v[head * m * dv..][..m * dv];
                    let grad_out = &grad_out[head * n * dv..][..n * dv];
                    for first in (0..n).step_by(rows_per_block) {
                        let rows = rows_per_block.min(n - first);
                        let accumulate = first > 0;
                        let q_block = &q[first * d..][..rows * d];
                        let g_block = &grad_out[first * dv..][..rows * dv];
                        p.resize(rows * m, 0.0);
                        ds.resize(rows * m, 0.0);
                        // SAFETY (every product below): each matrix holds the elements its
                        // shape and strides name.
                        unsafe { product((rows, m, d), p, m, q_block, (d, 1), k, (1, d), false) };
                        if self.causal {
                            mask_future_rows(p, m, m, first);
                        }
                        for row in p.chunks_exact_mut(m) {
                            let inverse = 1.0 / vector_math::softmax_numerators(row, scale);
                            scale_in_place(row, inverse);
                        }
                        unsafe {
                            product(
                                (m, dv, rows),
                                dv_head,
                                dv,
                                p,
                                (1, m),
                                g_block,
                                (dv, 1),
                                accumulate,
                            );
                            product((rows, m, dv), ds, m, g_block, (dv, 1), v, (1, dv), false);
                        }
                        for (ds_row, p_row) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)) {
                            score_gradient(ds_row, p_row, scale);
                        }
                        let dq_block = &mut dq[first * d..][..rows * d];
                        unsafe {
                            product((rows, d, m), dq_block, d, ds, (m, 1), k, (d, 1), false);
                            product((m, d, rows), dk, d, ds, (1, m), q_block, (d, 1), accumulate);
                        }
                    }
                },
            );
        let shaped = |data: Vec<f32>, rows: usize, width: usize| {
            Tensor::from_vec(data, (heads, rows, width), &candle_core::Device::Cpu)
        };
        Ok((
            Some(shaped(dq, n, d)?),
            Some(shaped(dk, m, d)?),
            Some(shaped(dv_all, m, dv)?),
        ))
    }
}

/// Multiplies every value of `row` by `factor`.
fn scale_in_place(row: &mut [f32], factor: f32) {
    with_wide_vectors(
        #[inline(always)]
        || row.iter_mut().for_each(|value| *value *= factor),
    )
}

/// Turns a row of dP into the row of dS = scale P (dP - sum_j dP_j P_j): the gradient of the
/// softmax's input (its Jacobian is diag(P) - P P^T) times the score scale.
fn score_gradient(ds_row: &mut [f32], p_row: &[f32], scale: f32) {
    with_wide_vectors(
        #[inline(always)]
        || {
            // Eight running sums, kept in one vector register.
            let mut lanes = [0f32; 8];
            let mut chunks = ds_row.chunks_exact(8).zip(p_row.chunks_exact(8));
            for (dp, p) in &mut chunks {
                for ((lane, dp), p) in lanes.iter_mut().zip(dp).zip(p) {
                    *lane += dp * p;
                }
            }
            let tail = ds_row.len() / 8 * 8;
            let row_sum = lanes.iter().sum::<f32>()
                + ds_row[tail..]
                    .iter()
                    .zip(&p_row[tail..])
                    .map(|(dp, p)| dp * p)
                    .sum::<f32>();
            for (dp, p) in ds_row.iter_mut().zip(p_row) {
                *dp = scale * p * (*dp - row_sum);
            }
        },
    )
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
        backward_rows: BACKWARD_ROWS,
        bf16_products: false,
        causal: false,
        strips: true,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`memory_efficient_attention`] under a causal mask: query i attends to keys 0..=i only (the
/// CLIP text encoder's self-attention), with its backward pass.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention {
        scale,
        backward_rows: BACKWARD_ROWS,
        bf16_products: false,
        causal: true,
        strips: true,
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
        backward_rows: BACKWARD_ROWS,
        bf16_products: true,
        causal: false,
        strips: true,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

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

    /// The op's output, and the gradients of q, k and v through `probe`, against the
    /// reference's.
    fn assert_op_matches(
        op: Attention,
        [q, k, v]: [&Var; 3],
        probe: &Tensor,
        reference: &Tensor,
        reference_grads: &candle_core::backprop::GradStore,
        what: &str,
    ) {
        let out = q
            .as_tensor()
            .apply_op3(k.as_tensor(), v.as_tensor(), op)
            .unwrap();
        assert!(max_diff(&out, reference) < 1e-5, "{what}: output");
        let grads = (&out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("q", q), ("k", k), ("v", v)] {
            let diff = max_diff(grads.get(var).unwrap(), reference_grads.get(var).unwrap());
            assert!(diff < 1e-5, "{what}: d{name} differs by {diff}");
        }
    }

    /// Output and all three gradients match the composed attention, also when the backward pass
    /// works through blocks of one, two and three query rows (the last one partial); rows of
    /// fewer keys than a vector and of several vectors and a tail, values of their own width.
    #[test]
    fn matches_the_composed_attention_and_its_gradients() {
        let device = Device::Cpu;
        for (heads, n, m, d, dv) in [(3, 5, 7, 4, 4), (2, 19, 21, 6, 5)] {
            let q = Var::randn(0f32, 1., (heads, n, d), &device).unwrap();
            let k = Var::randn(0f32, 1., (heads, m, d), &device).unwrap();
            let v = Var::randn(0f32, 1., (heads, m, dv), &device).unwrap();
            let probe = Tensor::randn(0f32, 1., (heads, n, dv), &device).unwrap();
            let scale = 0.5;
            let reference = composed(&q, &k, &v, scale).unwrap();
            let reference_grads = (&reference * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (backward_rows, strips) in
                [(BACKWARD_ROWS, true), (1, false), (2, true), (3, false)]
            {
                let op = Attention {
                    scale,
                    backward_rows,
                    bf16_products: false,
                    causal: false,
                    strips,
                };
                let what = format!("{heads}x{n}x{m}, {backward_rows} rows a block");
                assert_op_matches(
                    op,
                    [&q, &k, &v],
                    &probe,
                    &reference,
                    &reference_grads,
                    &what,
                );
            }
        }
    }

    /// Causal attention equals the composed attention with -inf above the diagonal, forward and
    /// gradients, over several query blocks (and through backward blocks of a few rows).
    #[test]
    fn causal_attention_matches_the_masked_composed_attention() {
        let device = Device::Cpu;
        let (heads, n, d) = (2, QUERY_BLOCK + 13, 8);
        let q = Var::randn(0f32, 1., (heads, n, d), &device).unwrap();
        let k = Var::randn(0f32, 1., (heads, n, d), &device).unwrap();
        let v = Var::randn(0f32, 1., (heads, n, 6), &device).unwrap();
        let probe = Tensor::randn(0f32, 1., (heads, n, 6), &device).unwrap();
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), &device).unwrap();
        let scale = 0.4;
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let reference = candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap();
        let reference_grads = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for strips in [true, false] {
            let op = Attention {
                scale,
                backward_rows: BACKWARD_ROWS,
                bf16_products: false,
                causal: true,
                strips,
            };
            let what = format!("causal, strips: {strips}");
            assert_op_matches(
                op,
                [&q, &k, &v],
                &probe,
                &reference,
                &reference_grads,
                &what,
            );
        }
        let out = causal_attention(&q, &k, &v, scale).unwrap();
        assert!(max_diff(&out, &reference) < 1e-5);
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
