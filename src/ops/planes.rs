//! Whole-plane ops on (B, C, H, W) f32 CPU feature maps in training, one pass each with its own
//! backward pass:
//!
//! - nearest-neighbour 2x upsampling, whose gradient sums each 2x2 block of the output gradient
//!   (composed from a reshape and a broadcast, candle copies the broadcast value by value and sums
//!   the gradient back over interleaved dimensions: 11 ms forward and backward for a batch of 64
//!   maps of 32 x 14 x 14 on a 2-core Xeon);
//! - the time embedding's shift of every plane by one value per (image, channel), whose gradient
//!   is the output gradient itself and its plane sums (composed: a broadcast add and a sum over H
//!   and W, 3.5 ms at 64 x 32 x 28 x 28).

use super::tensor::{contiguous_f32, unwritten_f32};
use super::vector_math;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether these ops take `x`: f32 on the CPU (elsewhere the composed ops serve).
pub fn applies_to(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Nearest-neighbour 2x upsampling of (B, C, H, W) to (B, C, 2H, 2W), with a backward pass.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2x)
}

/// `x + shifts[b, c]` on every value of plane (b, c), for `x` (B, C, H, W) and `shifts` (B, C),
/// with a backward pass.
pub fn add_plane_shifts(x: &Tensor, shifts: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&shifts.contiguous()?, PlaneShift)
}

struct Upsample2x;

/// (B, C, 2H, 2W) -> (B, C, H, W): each 2x2 block's sum.
struct Upsample2xGradient;

struct PlaneShift;

/// (B, C, H, W) -> (B, C): each plane's sum.
struct PlaneSums;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout, self.name(), "the input")?;
        let (in_plane, out_plane) = (h * w, 4 * h * w);
        // SAFETY: every row of every output plane is written below.
        let mut out = unsafe { unwritten_f32(b * c * out_plane) };
        if out_plane > 0 {
            out.par_chunks_mut(out_plane)
                .zip(x.par_chunks(in_plane))
                .for_each(|(plane, source)| {
                    for (rows, row) in plane.chunks_exact_mut(4 * w).zip(source.chunks_exact(w)) {
                        let (top, bottom) = rows.split_at_mut(2 * w);
                        for (pair, value) in top.chunks_exact_mut(2).zip(row) {
                            pair.fill(*value);
                        }
                        bottom.copy_from_slice(top);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&Upsample2xGradient)?,
        ))
    }
}

impl CustomOp1 for Upsample2xGradient {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x-gradient"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = layout.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!(
                "{}: gradient {:?} is not 2x a map",
                self.name(),
                layout.shape()
            )
        }
        let grad = contiguous_f32(storage, layout, self.name(), "the gradient")?;
        let (h, w) = (h2 / 2, w2 / 2);
        // SAFETY: every value of every input plane is written below.
        let mut dx = unsafe { unwritten_f32(b * c * h * w) };
        if h * w > 0 {
            dx.par_chunks_mut(h * w)
                .zip(grad.par_chunks(4 * h * w))
                .for_each(|(plane, source)| {
                    for (row, rows) in plane.chunks_exact_mut(w).zip(source.chunks_exact(4 * w)) {
                        let (top, bottom) = rows.split_at(2 * w);
                        for ((value, up), down) in row
                            .iter_mut()
                            .zip(top.chunks_exact(2))
                            .zip(bottom.chunks_exact(2))
                        {
                            *value = (up[0] + up[1]) + (down[0] + down[1]);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
}

impl CustomOp2 for PlaneShift {
    fn name(&self) -> &'static str {
        "add-plane-shifts"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        shift_storage: &CpuStorage,
        shift_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = x_layout.shape().dims4()?;
        if shift_layout.shape().dims() != [b, c] {
            candle_core::bail!(
                "{}: shifts {:?} are not one per plane of {:?}",
                self.name(),
                shift_layout.shape(),
                x_layout.shape()
            )
        }
        let x = contiguous_f32(x_storage, x_layout, self.name(), "the input")?;
        let shifts = contiguous_f32(shift_storage, shift_layout, self.name(), "the shifts")?;
        let plane = h * w;
        // SAFETY: every value of every plane is written below.
        let mut out = unsafe { unwritten_f32(x.len()) };
        if plane > 0 {
            out.par_chunks_mut(plane)
                .zip(x.par_chunks(plane).zip(shifts.par_iter()))
                .for_each(|(out, (x, shift))| {
                    for (value, source) in out.iter_mut().zip(x) {
                        *value = source + shift;
                    }
                });
        }
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _shifts: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = grad.contiguous()?.apply_op1_no_bwd(&PlaneSums)?;
        Ok((Some(grad.clone()), Some(sums)))
    }
}

impl CustomOp1 for PlaneSums {
    fn name(&self) -> &'static str {
        "plane-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let values = contiguous_f32(storage, layout, self.name(), "the input")?;
        let plane = h * w;
        let sums: Vec<f32> = if plane == 0 {
            vec![0.0; b * c]
        } else {
            values
                .par_chunks(plane)
                .map(|plane| vector_math::sum(plane) as f32)
                .collect()
        };
        Ok((CpuStorage::F32(sums), Shape::from((b, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::{max_abs, probe_gradient, seeded_randn};
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap()).unwrap()
    }

    /// The values and the input's gradient equal the composed reshape-and-broadcast, over odd
    /// and one-pixel maps.
    #[test]
    fn upsampling_matches_the_composed_broadcast() {
        for dims in [[2, 3, 5, 7], [1, 2, 1, 1], [3, 1, 4, 2]] {
            let x = Var::from_tensor(&seeded_randn(&dims, 1)).unwrap();
            let [b, c, h, w] = dims;
            let composed = x
                .reshape((b, c, h, 1, w, 1))
                .unwrap()
                .broadcast_as((b, c, h, 2, w, 2))
                .unwrap()
                .reshape((b, c, 2 * h, 2 * w))
                .unwrap();
            let fused = upsample_nearest_2x(&x).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            assert_eq!(max_diff(&fused, &composed), 0.0, "{dims:?}");
            let probe = seeded_randn(composed.dims(), 2);
            let (a, b) = (
                probe_gradient(&fused, &probe, &x),
                probe_gradient(&composed, &probe, &x),
            );
            assert!(max_diff(&a, &b) < 1e-6, "{dims:?}: gradient");
        }
    }

    /// The values and both gradients equal the composed broadcast add.
    #[test]
    fn plane_shifts_match_the_composed_broadcast_add() {
        let x = Var::from_tensor(&seeded_randn(&[3, 4, 5, 6], 3)).unwrap();
        let shifts = Var::from_tensor(&seeded_randn(&[3, 4], 4)).unwrap();
        let composed = x
            .broadcast_add(&shifts.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
            .unwrap();
        let fused = add_plane_shifts(&x, &shifts).unwrap();
        assert_eq!(max_diff(&fused, &composed), 0.0);
        let probe = seeded_randn(&[3, 4, 5, 6], 5);
        for var in [&x, &shifts] {
            let (a, b) = (
                probe_gradient(&fused, &probe, var),
                probe_gradient(&composed, &probe, var),
            );
            assert!(max_diff(&a, &b) < 1e-5, "gradient");
        }
    }

    /// Shifts that are not one per plane are an error naming both shapes.
    #[test]
    fn mismatched_shifts_are_named() {
        let x = seeded_randn(&[2, 3, 4, 4], 1);
        let err = add_plane_shifts(&x, &seeded_randn(&[2, 4], 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 4]") && err.contains("[2, 3, 4, 4]"),
            "{err}"
        );
    }
}
