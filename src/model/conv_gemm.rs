//! Inference 2-D convolution on the CPU as matrix products written straight into the NCHW output.
//!
//! A convolution is `out[o, p] = bias[o] + sum_k weight[o, k] * columns[k, p]` with `k` running
//! over (input channel, kernel row, kernel column) and `p` over output pixels (im2col). The
//! weight of a PyTorch-layout kernel (O, C, kh, kw) already is that (O, C kh kw) matrix, and the
//! product's rows are the output's channel planes, so nothing but the columns is ever copied:
//! the product adds into an output that starts as the bias, one band of output rows at a time.
//! candle 0.11's CPU convolution instead re-lays the input out channels-last and re-flattens the
//! kernel on one thread at every call, gathers its columns element by element, and copies the
//! product into place; perf of SD 1.5's U-Net step puts those at about a quarter of its time.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Columns of one band of output rows are at most this many floats (16 MiB): enough pixels for
/// the matrix product to run at full speed, few enough that a 512x512 VAE layer does not build
/// a gigabyte of columns at once.
const COLUMN_BAND_FLOATS: usize = 1 << 22;

/// conv2d(x, weight) + bias for f32 CPU tensors, square stride and padding, dilation 1, one
/// group; `apply_op3_no_bwd(x, weight, bias)` (inference only: it has no backward pass).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dGemm {
    pub stride: usize,
    pub padding: usize,
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    channels: usize,
    height: usize,
    width: usize,
    kernel_h: usize,
    kernel_w: usize,
    out_h: usize,
    out_w: usize,
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("conv2d-gemm: {what} must be f32")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv2d-gemm: {what} must be contiguous"),
    }
}

impl Conv2dGemm {
    /// Fills `band` (C kh kw rows of `rows x out_w` pixels) with the input values that output
    /// rows `first_row..first_row + rows` read; taps in the padding are zero.
    fn fill_columns(&self, image: &[f32], g: &Geometry, first_row: usize, band: &mut [f32]) {
        let pixels = band.len() / (g.channels * g.kernel_h * g.kernel_w);
        band.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(row, column)| {
                let kx = row % g.kernel_w;
                let ky = (row / g.kernel_w) % g.kernel_h;
                let plane = &image[(row / (g.kernel_w * g.kernel_h)) * g.height * g.width..]
                    [..g.height * g.width];
                for (band_row, out_row) in column.chunks_exact_mut(g.out_w).enumerate() {
                    let input_y = ((first_row + band_row) * self.stride + ky) as isize
                        - self.padding as isize;
                    if input_y < 0 || input_y >= g.height as isize {
                        out_row.fill(0.0);
                        continue;
                    }
                    let input_row = &plane[input_y as usize * g.width..][..g.width];
                    self.fill_row(input_row, kx, out_row);
                }
            });
    }

    /// One output row's values of kernel column `kx`: `input_row[ox * stride + kx - padding]`,
    /// zero where that falls in the padding.
    fn fill_row(&self, input_row: &[f32], kx: usize, out_row: &mut [f32]) {
        let width = input_row.len() as isize;
        let offset = kx as isize - self.padding as isize;
        if self.stride == 1 {
            // One contiguous run between the zero edges.
            let first = (-offset).clamp(0, out_row.len() as isize) as usize;
            let end = (width - offset).clamp(first as isize, out_row.len() as isize) as usize;
            out_row[..first].fill(0.0);
            out_row[end..].fill(0.0);
            let start = (first as isize + offset) as usize;
            out_row[first..end].copy_from_slice(&input_row[start..start + end - first]);
        } else {
            for (ox, value) in out_row.iter_mut().enumerate() {
                let input_x = (ox * self.stride) as isize + offset;
                *value = if (0..width).contains(&input_x) {
                    input_row[input_x as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// `dst (m x n, row stride dst_rs) += lhs (m x k, row-major) * rhs (k x n, row-major)` on the
/// gemm crate's threads.
///
/// # Safety
/// `dst` must hold `m` rows `dst_rs` apart of `n` floats each, and no other thread may touch them.
unsafe fn add_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
) {
    debug_assert!(lhs.len() >= m * k && rhs.len() >= k * n);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        true,
        lhs.as_ptr(),
        1,
        k as isize,
        rhs.as_ptr(),
        1,
        n as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

impl CustomOp3 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        let (out_channels, weight_channels, kernel_h, kernel_w) = weight_layout.shape().dims4()?;
        if weight_channels != channels || bias_layout.shape().elem_count() != out_channels {
            candle_core::bail!(
                "conv2d-gemm: input {:?}, weight {:?} and bias {:?} do not fit together",
                x_layout.shape(),
                weight_layout.shape(),
                bias_layout.shape()
            )
        }
        let x = contiguous_f32(x, x_layout, "the input")?;
        let weight = contiguous_f32(weight, weight_layout, "the weight")?;
        let bias = contiguous_f32(bias, bias_layout, "the bias")?;
        let out_size = |size: usize, kernel: usize| {
            (size + 2 * self.padding).saturating_sub(kernel) / self.stride + 1
        };
        let g = Geometry {
            channels,
            height,
            width,
            kernel_h,
            kernel_w,
            out_h: out_size(height, kernel_h),
            out_w: out_size(width, kernel_w),
        };
        let out_pixels = g.out_h * g.out_w;
        let mut out = vec![0f32; batch * out_channels * out_pixels];
        out.par_chunks_mut(out_pixels)
            .enumerate()
            .for_each(|(plane, values)| values.fill(bias[plane % out_channels]));
        let depth = channels * kernel_h * kernel_w;
        let pointwise = kernel_h == 1 && kernel_w == 1 && self.stride == 1 && self.padding == 0;
        let rows_per_band = (COLUMN_BAND_FLOATS / (depth * g.out_w).max(1)).clamp(1, g.out_h);
        let mut columns = if pointwise {
            Vec::new()
        } else {
            vec![0f32; depth * rows_per_band * g.out_w]
        };
        for (image, out_image) in x
            .chunks_exact(channels * height * width)
            .zip(out.chunks_exact_mut(out_channels * out_pixels))
        {
            if pointwise {
                // The input image already is the (C, H W) column matrix.
                // SAFETY: `out_image` holds out_channels rows of out_pixels floats.
                unsafe {
                    add_product(
                        (out_channels, out_pixels, depth),
                        out_image.as_mut_ptr(),
                        out_pixels,
                        weight,
                        image,
                    )
                };
                continue;
            }
            for first_row in (0..g.out_h).step_by(rows_per_band) {
                let rows = rows_per_band.min(g.out_h - first_row);
                let band = &mut columns[..depth * rows * g.out_w];
                self.fill_columns(image, &g, first_row, band);
                // SAFETY: rows first_row.. of every channel plane lie inside `out_image`
                // (out_channels planes of out_pixels floats, the band's pixels from
                // first_row * out_w on).
                unsafe {
                    add_product(
                        (out_channels, rows * g.out_w, depth),
                        out_image[first_row * g.out_w..].as_mut_ptr(),
                        out_pixels,
                        weight,
                        band,
                    )
                };
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, out_channels, g.out_h, g.out_w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        let mut noise = crate::sampler::noise::SeededNoise::new(seed);
        noise.randn(shape).unwrap()
    }

    /// Equal to candle's own conv2d plus bias for 3x3 and 1x1 kernels, strides 1 and 2, with and
    /// without padding, odd and even sizes, several images, and bands of output rows smaller
    /// than the image (a large kernel depth forces several).
    #[test]
    fn matches_candle_conv2d() {
        let cases = [
            // (channels, out_channels, kernel, stride, padding, height, width)
            (3, 5, 3, 1, 1, 7, 9),
            (3, 5, 3, 2, 1, 7, 8),
            (4, 6, 3, 2, 0, 9, 9),
            (3, 4, 1, 1, 0, 6, 5),
            (2, 3, 1, 2, 0, 6, 6),
            (3, 2, 3, 1, 0, 5, 6),
            // depth 4608 x 1000 pixels is over the band size: several bands per image.
            (512, 2, 3, 1, 1, 40, 25),
        ];
        for (channels, out_channels, kernel, stride, padding, height, width) in cases {
            let x = seeded(&[2, channels, height, width], 1);
            let weight = seeded(&[out_channels, channels, kernel, kernel], 2);
            let bias = seeded(&[out_channels], 3);
            let reference = x
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, out_channels, 1, 1)).unwrap())
                .unwrap();
            let ours = x
                .apply_op3_no_bwd(&weight, &bias, &Conv2dGemm { stride, padding })
                .unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff = crate::tensor_ops::max_abs(&(&ours - &reference).unwrap()).unwrap();
            let scale = crate::tensor_ops::max_abs(&reference).unwrap();
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "channels {channels} kernel {kernel} stride {stride} padding {padding} \
                 {height}x{width}: {diff}"
            );
        }
        let _ = Device::Cpu;
    }

    #[test]
    fn names_a_mismatched_weight() {
        let x = seeded(&[1, 3, 5, 5], 1);
        let weight = seeded(&[4, 2, 3, 3], 2);
        let bias = seeded(&[4], 3);
        let err = x
            .apply_op3_no_bwd(
                &weight,
                &bias,
                &Conv2dGemm {
                    stride: 1,
                    padding: 1,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit together"), "{err}");
    }
}
