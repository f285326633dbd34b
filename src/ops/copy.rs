//! A strided f32 CPU tensor made contiguous on every thread. candle copies a permuted tensor on
//! the calling thread alone, element by element; the U-Net turns every 64x64 map into tokens and
//! back (10 MB each way at 512x512) and splits and joins attention heads around each attention,
//! and on two cores the other core waits out each copy (2-3% of the 512 step).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Side of the square tiles a transposing copy moves at a time, so that both the rows it reads
/// and the rows it writes stay in cache.
const TILE: usize = 32;

/// `x` with contiguous storage: as it is when it already is, through [`ParallelCopy`] for a
/// strided f32 CPU tensor, else candle's copy. Gradients pass through unchanged.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || !super::tensor::is_cpu_f32(x) || x.rank() < 2 {
        return x.contiguous();
    }
    x.apply_op1(ParallelCopy)
}

struct ParallelCopy;

/// One output row's source: the offset of its first element, and the stride between elements.
fn row_source(layout: &Layout, row: usize) -> usize {
    let dims = layout.dims();
    let strides = layout.stride();
    let rank = dims.len();
    let mut offset = layout.start_offset();
    let mut rest = row;
    for axis in (0..rank - 1).rev() {
        offset += (rest % dims[axis]) * strides[axis];
        rest /= dims[axis];
    }
    offset
}

impl CustomOp1 for ParallelCopy {
    fn name(&self) -> &'static str {
        "parallel-copy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = storage else {
            candle_core::bail!("parallel-copy: the input must be f32")
        };
        let dims = layout.dims();
        let rank = dims.len();
        if rank < 2 {
            candle_core::bail!("parallel-copy: the input needs at least two dimensions")
        }
        let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
        let (row_stride, col_stride) = (layout.stride()[rank - 2], layout.stride()[rank - 1]);
        let len = layout.shape().elem_count();
        // SAFETY: every plane of rows x cols is written below, tile by tile or row by row.
        let mut out = unsafe { super::tensor::unwritten_f32(len) };
        if len == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        let plane = rows * cols;
        if col_stride == 1 {
            out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
                let start = row_source(layout, row);
                dst.copy_from_slice(&src[start..start + cols]);
            });
        } else {
            // A transposing copy: tiles of TILE rows by TILE columns, read column-wise from the
            // source's rows (adjacent in memory when the row stride is 1) and written row-wise.
            let row_tiles = rows.div_ceil(TILE);
            out.par_chunks_mut(plane)
                .enumerate()
                .flat_map_iter(|(p, dst)| {
                    let mut tiles = Vec::with_capacity(row_tiles);
                    let mut rest = dst;
                    for t in 0..row_tiles {
                        let take = (rows - t * TILE).min(TILE) * cols;
                        let (tile, tail) = rest.split_at_mut(take);
                        tiles.push((p, t, tile));
                        rest = tail;
                    }
                    tiles
                })
                .for_each(|(p, t, dst)| {
                    let first_row = t * TILE;
                    let base = row_source(layout, p * rows + first_row);
                    let tile_rows = dst.len() / cols;
                    for c0 in (0..cols).step_by(TILE) {
                        let c1 = (c0 + TILE).min(cols);
                        for r in 0..tile_rows {
                            let from = base + r * row_stride;
                            let out_row = &mut dst[r * cols..][c0..c1];
                            for (c, value) in (c0..c1).zip(out_row) {
                                *value = src[from + c * col_stride];
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::seeded_randn;

    /// Every permutation of a rank-4 tensor and a narrowed view copy to what candle's copy gives,
    /// bit for bit.
    #[test]
    fn matches_candles_copy_for_permutations_and_views() {
        let x = seeded_randn(&[3, 37, 5, 70], 1);
        let orders = [
            (0, 1, 3, 2),
            (0, 2, 1, 3),
            (0, 2, 3, 1),
            (0, 3, 1, 2),
            (3, 2, 1, 0),
            (1, 0, 2, 3),
        ];
        for order in orders {
            let permuted = x.permute(order).expect("permute");
            let want = permuted.contiguous().expect("candle's copy");
            let got = contiguous(&permuted).expect("parallel copy");
            assert!(got.is_contiguous());
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(got, want, "{order:?}");
        }
        let view = x.narrow(3, 7, 40).unwrap().transpose(1, 3).unwrap();
        let got = contiguous(&view).unwrap().flatten_all().unwrap();
        let want = view.contiguous().unwrap().flatten_all().unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap()
        );
    }

    /// The gradient passes through the copy unchanged.
    #[test]
    fn passes_gradients_through() {
        let x = candle_core::Var::from_tensor(&seeded_randn(&[4, 6, 5], 2)).unwrap();
        let probe = seeded_randn(&[4, 5, 6], 3);
        let copied = contiguous(&x.as_tensor().transpose(1, 2).unwrap()).unwrap();
        let grad = crate::ops::tensor::probe_gradient(&copied, &probe, &x);
        let want = probe.transpose(1, 2).unwrap();
        let diff = (grad - want).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
