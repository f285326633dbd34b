//! 2-D convolution on the CPU as matrix products in the NCHW layout, forward and backward.
//!
//! A convolution is `out[o, p] = bias[o] + sum_k weight[o, k] * columns[k, p]` with `k` running
//! over (input channel, kernel row, kernel column) and `p` over output pixels (im2col). The
//! weight of a PyTorch-layout kernel (O, C, kh, kw) already is that (O, C kh kw) matrix and the
//! product's rows are the output's channel planes, so only the columns are ever built, one band
//! of output rows at a time and never kept: the backward pass builds them again. Its gradients
//! are the two other products, `dweight = dout columns^T` and `dcolumns = weight^T dout`, whose
//! columns fold back onto the input (col2im).
//!
//! candle 0.11's CPU convolution instead re-lays the input out channels-last and re-flattens the
//! kernel on one thread at every call, gathers its columns element by element and copies the
//! product into place (perf of SD 1.5's U-Net step: about a quarter of its time), and its
//! backward pass computes the input gradient with a direct transposed-convolution loop.

use crate::tensor_ops::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Columns of one band are at most this many floats (16 MiB): enough pixels for the matrix
/// product to run at full speed, few enough that a 512x512 VAE layer does not build a gigabyte
/// of columns at once.
const COLUMN_BAND_FLOATS: usize = 1 << 22;

/// conv2d(x, weight) + bias for f32 CPU tensors, square stride and padding, dilation 1, one
/// group: `x.apply_op3(weight, bias, Conv2dGemm { .. })`, with a backward pass.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dGemm {
    pub stride: usize,
    pub padding: usize,
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    stride: usize,
    padding: usize,
    batch: usize,
    channels: usize,
    out_channels: usize,
    height: usize,
    width: usize,
    kernel_h: usize,
    kernel_w: usize,
    out_h: usize,
    out_w: usize,
}

/// Output rows `first_row..first_row + rows` of images `first_image..first_image + images`: a
/// run of whole images when one image's columns fit the band size, else rows of one image.
#[derive(Debug, Clone, Copy)]
struct Band {
    first_image: usize,
    images: usize,
    first_row: usize,
    rows: usize,
}

impl Band {
    fn pixels(&self, g: &Geometry) -> usize {
        self.images * self.rows * g.out_w
    }

    /// Where the band's pixels start in an image's output plane.
    fn first_pixel(&self, g: &Geometry) -> usize {
        self.first_row * g.out_w
    }
}

/// A row-major matrix somewhere in memory: its data from the first element on and its row
/// stride (columns are adjacent).
#[derive(Clone, Copy)]
struct Matrix {
    data: *const f32,
    row_stride: usize,
}

impl Geometry {
    fn new(conv: &Conv2dGemm, input: &Shape, weight: &Shape) -> Result<Self> {
        let (batch, channels, height, width) = input.dims4()?;
        let (out_channels, weight_channels, kernel_h, kernel_w) = weight.dims4()?;
        if weight_channels != channels {
            candle_core::bail!(
                "conv2d-gemm: input {input:?} and weight {weight:?} do not fit together"
            )
        }
        let out_size = |size: usize, kernel: usize| {
            (size + 2 * conv.padding).saturating_sub(kernel) / conv.stride + 1
        };
        Ok(Self {
            stride: conv.stride,
            padding: conv.padding,
            batch,
            channels,
            out_channels,
            height,
            width,
            kernel_h,
            kernel_w,
            out_h: out_size(height, kernel_h),
            out_w: out_size(width, kernel_w),
        })
    }

    /// Rows of the column matrix: C kh kw.
    fn depth(&self) -> usize {
        self.channels * self.kernel_h * self.kernel_w
    }

    fn in_pixels(&self) -> usize {
        self.height * self.width
    }

    fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// A 1x1 convolution whose columns are the input itself.
    fn pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }

    fn bands(&self) -> Vec<Band> {
        let image_floats = self.depth() * self.out_pixels();
        if image_floats <= COLUMN_BAND_FLOATS {
            let per_band = (COLUMN_BAND_FLOATS / image_floats.max(1)).clamp(1, self.batch);
            (0..self.batch)
                .step_by(per_band)
                .map(|first_image| Band {
                    first_image,
                    images: per_band.min(self.batch - first_image),
                    first_row: 0,
                    rows: self.out_h,
                })
                .collect()
        } else {
            let rows_per_band =
                (COLUMN_BAND_FLOATS / (self.depth() * self.out_w)).clamp(1, self.out_h);
            (0..self.batch)
                .flat_map(|image| {
                    (0..self.out_h)
                        .step_by(rows_per_band)
                        .map(move |first_row| Band {
                            first_image: image,
                            images: 1,
                            first_row,
                            rows: rows_per_band.min(self.out_h - first_row),
                        })
                })
                .collect()
        }
    }

    /// The input column of output column 0 for kernel column `kx` (negative in the padding).
    fn column_offset(&self, kx: usize) -> isize {
        kx as isize - self.padding as isize
    }

    /// The input row that output row `oy` reads through kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let y = (oy * self.stride + ky) as isize - self.padding as isize;
        (0..self.height as isize).contains(&y).then_some(y as usize)
    }

    /// The band's columns (C kh kw rows of band pixels) from the input `x` (B, C, H, W); taps in
    /// the padding are zero.
    fn fill_columns(&self, x: &[f32], band: &Band, columns: &mut [f32]) {
        let pixels = band.pixels(self);
        columns[..self.depth() * pixels]
            .par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(row, column)| {
                let (channel, ky, kx) = self.tap(row);
                for (index, image_rows) in
                    column.chunks_exact_mut(band.rows * self.out_w).enumerate()
                {
                    let plane = &x[((band.first_image + index) * self.channels + channel)
                        * self.in_pixels()..][..self.in_pixels()];
                    for (offset, out_row) in image_rows.chunks_exact_mut(self.out_w).enumerate() {
                        match self.input_row(band.first_row + offset, ky) {
                            Some(y) => {
                                self.gather_row(&plane[y * self.width..][..self.width], kx, out_row)
                            }
                            None => out_row.fill(0.0),
                        }
                    }
                }
            });
    }

    /// Adds the band's column gradients back onto `dx` (B, C, H, W), the adjoint of
    /// [`Self::fill_columns`]. One task per input plane: no two write the same pixel.
    fn fold_columns(&self, columns: &[f32], band: &Band, dx: &mut [f32]) {
        let pixels = band.pixels(self);
        let taps = self.kernel_h * self.kernel_w;
        let planes = &mut dx[band.first_image * self.channels * self.in_pixels()..]
            [..band.images * self.channels * self.in_pixels()];
        planes
            .par_chunks_mut(self.in_pixels())
            .enumerate()
            .for_each(|(index, plane)| {
                let (image, channel) = (index / self.channels, index % self.channels);
                for tap in 0..taps {
                    let (ky, kx) = (tap / self.kernel_w, tap % self.kernel_w);
                    let column = &columns[(channel * taps + tap) * pixels..][..pixels];
                    let image_rows =
                        &column[image * band.rows * self.out_w..][..band.rows * self.out_w];
                    for (offset, out_row) in image_rows.chunks_exact(self.out_w).enumerate() {
                        if let Some(y) = self.input_row(band.first_row + offset, ky) {
                            self.scatter_row(
                                out_row,
                                kx,
                                &mut plane[y * self.width..][..self.width],
                            );
                        }
                    }
                }
            });
    }

    /// (channel, ky, kx) of a column-matrix row.
    fn tap(&self, row: usize) -> (usize, usize, usize) {
        let taps = self.kernel_h * self.kernel_w;
        (
            row / taps,
            (row % taps) / self.kernel_w,
            row % self.kernel_w,
        )
    }

    /// The output columns `ox` whose kernel column `kx` reads inside the input row, and the
    /// input column that the first of them reads.
    fn inside(&self, kx: usize, out_w: usize) -> (std::ops::Range<usize>, isize) {
        let offset = self.column_offset(kx);
        let stride = self.stride as isize;
        // ox * stride + offset in [0, width)
        let first = ((-offset).max(0) + stride - 1) / stride;
        let end = ((self.width as isize - offset) + stride - 1) / stride;
        let first = first.clamp(0, out_w as isize) as usize;
        let end = end.clamp(first as isize, out_w as isize) as usize;
        (first..end, first as isize * stride + offset)
    }

    /// out_row[ox] = input_row[ox * stride + kx - padding], zero in the padding.
    fn gather_row(&self, input_row: &[f32], kx: usize, out_row: &mut [f32]) {
        let (inside, start) = self.inside(kx, out_row.len());
        out_row[..inside.start].fill(0.0);
        out_row[inside.end..].fill(0.0);
        if inside.is_empty() {
            return;
        }
        let start = start as usize;
        if self.stride == 1 {
            out_row[inside.clone()].copy_from_slice(&input_row[start..start + inside.len()]);
        } else {
            for (value, source) in out_row[inside]
                .iter_mut()
                .zip(input_row[start..].iter().step_by(self.stride))
            {
                *value = *source;
            }
        }
    }

    /// input_row[ox * stride + kx - padding] += out_row[ox]: the adjoint of `gather_row`.
    fn scatter_row(&self, out_row: &[f32], kx: usize, input_row: &mut [f32]) {
        let (inside, start) = self.inside(kx, out_row.len());
        if inside.is_empty() {
            return;
        }
        let targets = input_row[start as usize..].iter_mut().step_by(self.stride);
        for (target, value) in targets.zip(&out_row[inside]) {
            *target += value;
        }
    }

    /// The band's rows of an (B, O, Ho, Wo) tensor as an (O, band pixels) matrix: in place for a
    /// band inside one image, else gathered into `scratch`.
    fn band_of_output(&self, planes: &[f32], band: &Band, scratch: &mut Vec<f32>) -> Matrix {
        let out_pixels = self.out_pixels();
        if band.images == 1 {
            let start = band.first_image * self.out_channels * out_pixels + band.first_pixel(self);
            return Matrix {
                data: planes[start..].as_ptr(),
                row_stride: out_pixels,
            };
        }
        let pixels = band.pixels(self);
        scratch.resize(self.out_channels * pixels, 0.0);
        scratch
            .par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(channel, row)| {
                for (image, part) in row.chunks_exact_mut(out_pixels).enumerate() {
                    let plane = (band.first_image + image) * self.out_channels + channel;
                    part.copy_from_slice(&planes[plane * out_pixels..][..out_pixels]);
                }
            });
        Matrix {
            data: scratch.as_ptr(),
            row_stride: pixels,
        }
    }

    /// The band's columns: the input itself for a pointwise band inside one image, else built
    /// into `columns`.
    fn band_columns(&self, x: &[f32], band: &Band, columns: &mut Vec<f32>) -> Matrix {
        if self.pointwise() && band.images == 1 {
            let start =
                band.first_image * self.channels * self.in_pixels() + band.first_pixel(self);
            return Matrix {
                data: x[start..].as_ptr(),
                row_stride: self.in_pixels(),
            };
        }
        let pixels = band.pixels(self);
        columns.resize(self.depth() * pixels, 0.0);
        self.fill_columns(x, band, columns);
        Matrix {
            data: columns.as_ptr(),
            row_stride: pixels,
        }
    }
}

/// `dst (m x n) = alpha dst + lhs (m x k) rhs (k x n)` on the gemm crate's threads, every matrix
/// given by its data and (row, column) strides.
///
/// # Safety
/// Every matrix must hold its m, n, k elements at those strides, and nothing else may touch
/// `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
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
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
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
        let g = Geometry::new(self, x_layout.shape(), weight_layout.shape())?;
        if bias_layout.shape().elem_count() != g.out_channels {
            candle_core::bail!(
                "conv2d-gemm: bias {:?} and weight {:?} do not fit together",
                bias_layout.shape(),
                weight_layout.shape()
            )
        }
        let x = contiguous_f32(x, x_layout, "conv2d-gemm", "the input")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d-gemm", "the weight")?;
        let bias = contiguous_f32(bias, bias_layout, "conv2d-gemm", "the bias")?;
        let out_pixels = g.out_pixels();
        let mut out = vec![0f32; g.batch * g.out_channels * out_pixels];
        out.par_chunks_mut(out_pixels)
            .enumerate()
            .for_each(|(plane, values)| values.fill(bias[plane % g.out_channels]));
        let (mut columns, mut scratch) = (Vec::new(), Vec::new());
        for band in g.bands() {
            let pixels = band.pixels(&g);
            let rhs = g.band_columns(x, &band, &mut columns);
            if band.images == 1 {
                let start = band.first_image * g.out_channels * out_pixels + band.first_pixel(&g);
                // SAFETY: the band's rows of every output plane lie inside `out`.
                unsafe {
                    product(
                        (g.out_channels, pixels, g.depth()),
                        out[start..].as_mut_ptr(),
                        (out_pixels, 1),
                        true,
                        weight.as_ptr(),
                        (g.depth(), 1),
                        rhs.data,
                        (rhs.row_stride, 1),
                    )
                };
                continue;
            }
            // Several whole images: one product, then each image's share added into place.
            scratch.resize(g.out_channels * pixels, 0.0);
            // SAFETY: `scratch` holds out_channels rows of `pixels` floats.
            unsafe {
                product(
                    (g.out_channels, pixels, g.depth()),
                    scratch.as_mut_ptr(),
                    (pixels, 1),
                    false,
                    weight.as_ptr(),
                    (g.depth(), 1),
                    rhs.data,
                    (rhs.row_stride, 1),
                )
            };
            let planes = &mut out[band.first_image * g.out_channels * out_pixels..]
                [..band.images * g.out_channels * out_pixels];
            planes
                .par_chunks_mut(out_pixels)
                .enumerate()
                .for_each(|(index, plane)| {
                    let (image, channel) = (index / g.out_channels, index % g.out_channels);
                    let part = &scratch[channel * pixels + image * out_pixels..][..out_pixels];
                    for (value, added) in plane.iter_mut().zip(part) {
                        *value += added;
                    }
                });
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.out_channels, g.out_h, g.out_w)),
        ))
    }

    /// The input gradient where the input leads to a variable, the weight and bias gradients
    /// where they are trained (a frozen weight gets none, which a LoRA fine-tune relies on).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            let op = InputGradient {
                conv: *self,
                height: x.dim(2)?,
                width: x.dim(3)?,
            };
            Some(grad.apply_op2_no_bwd(&weight.contiguous()?, &op)?)
        } else {
            None
        };
        if !weight.track_op() && !bias.track_op() {
            return Ok((dx, None, None));
        }
        let op = WeightGradient {
            conv: *self,
            kernel: weight.dims4()?,
        };
        let both = x.contiguous()?.apply_op2_no_bwd(&grad, &op)?;
        let weight_count = weight.elem_count();
        let dweight = both.narrow(0, 0, weight_count)?.reshape(weight.shape())?;
        let dbias = both.narrow(0, weight_count, bias.elem_count())?;
        Ok((dx, Some(dweight), Some(dbias)))
    }
}

/// conv2d(x, weight) + bias of f32 CPU tensors (dilation 1, one group) through
/// [`Conv2dGemm`], with its backward pass.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let bias = match bias {
        Some(bias) => bias.clone(),
        None => Tensor::zeros(weight.dim(0)?, candle_core::DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias, Conv2dGemm { stride, padding })
}

/// (dout, weight) -> dx of [`Conv2dGemm`]: `weight^T dout` per band, folded onto the input.
#[derive(Debug, Clone, Copy)]
struct InputGradient {
    conv: Conv2dGemm,
    height: usize,
    width: usize,
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-gradient"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, _, _, _) = grad_layout.shape().dims4()?;
        let (_, channels, _, _) = weight_layout.shape().dims4()?;
        let input = Shape::from((batch, channels, self.height, self.width));
        let g = Geometry::new(&self.conv, &input, weight_layout.shape())?;
        let grad = contiguous_f32(grad, grad_layout, "conv2d-gemm", "the output gradient")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d-gemm", "the weight")?;
        let mut dx = vec![0f32; input.elem_count()];
        let (mut columns, mut scratch) = (Vec::new(), Vec::new());
        for band in g.bands() {
            let pixels = band.pixels(&g);
            let dout = g.band_of_output(grad, &band, &mut scratch);
            if g.pointwise() && band.images == 1 {
                let start = band.first_image * g.channels * g.in_pixels() + band.first_pixel(&g);
                // SAFETY: the band's rows of every input plane lie inside `dx`.
                unsafe {
                    product(
                        (g.channels, pixels, g.out_channels),
                        dx[start..].as_mut_ptr(),
                        (g.in_pixels(), 1),
                        true,
                        weight.as_ptr(),
                        (1, g.depth()),
                        dout.data,
                        (dout.row_stride, 1),
                    )
                };
                continue;
            }
            columns.resize(g.depth() * pixels, 0.0);
            // SAFETY: `columns` holds depth rows of `pixels` floats.
            unsafe {
                product(
                    (g.depth(), pixels, g.out_channels),
                    columns.as_mut_ptr(),
                    (pixels, 1),
                    false,
                    weight.as_ptr(),
                    (1, g.depth()),
                    dout.data,
                    (dout.row_stride, 1),
                )
            };
            g.fold_columns(&columns, &band, &mut dx);
        }
        Ok((CpuStorage::F32(dx), input))
    }
}

/// (x, dout) -> [dweight (O C kh kw), dbias (O)] of [`Conv2dGemm`], flat:
/// `dout columns^T` summed over the bands and `dout` summed per channel.
#[derive(Debug, Clone, Copy)]
struct WeightGradient {
    conv: Conv2dGemm,
    kernel: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.conv, x_layout.shape(), &Shape::from(self.kernel))?;
        let x = contiguous_f32(x, x_layout, "conv2d-gemm", "the input")?;
        let grad = contiguous_f32(grad, grad_layout, "conv2d-gemm", "the output gradient")?;
        let weight_count = g.out_channels * g.depth();
        let mut out = vec![0f32; weight_count + g.out_channels];
        let (dweight, dbias) = out.split_at_mut(weight_count);
        let (mut columns, mut scratch) = (Vec::new(), Vec::new());
        for band in g.bands() {
            let pixels = band.pixels(&g);
            let dout = g.band_of_output(grad, &band, &mut scratch);
            let cols = g.band_columns(x, &band, &mut columns);
            // SAFETY: `dweight` holds out_channels rows of depth floats; the columns are read
            // transposed (pixels x depth).
            unsafe {
                product(
                    (g.out_channels, g.depth(), pixels),
                    dweight.as_mut_ptr(),
                    (g.depth(), 1),
                    true,
                    dout.data,
                    (dout.row_stride, 1),
                    cols.data,
                    (1, cols.row_stride),
                )
            };
        }
        let out_pixels = g.out_pixels();
        dbias
            .par_iter_mut()
            .enumerate()
            .for_each(|(channel, total)| {
                let sum: f64 = (0..g.batch)
                    .map(|image| {
                        let plane =
                            &grad[(image * g.out_channels + channel) * out_pixels..][..out_pixels];
                        plane.iter().map(|v| *v as f64).sum::<f64>()
                    })
                    .sum();
                *total = sum as f32;
            });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::tensor_ops::seeded_randn as seeded;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::tensor_ops::max_abs(&(a - b).unwrap()).unwrap()
    }

    /// Values and all three gradients equal candle's own conv2d plus bias, for 3x3 and 1x1
    /// kernels, strides 1 and 2, with and without padding, odd and even sizes, bands of several
    /// whole images (small images) and of some rows of one image (a depth of 4608 over 1000
    /// pixels is past the band size).
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let cases = [
            // (batch, channels, out_channels, kernel, stride, padding, height, width)
            (3, 3, 5, 3, 1, 1, 7, 9),
            // Strided cases square: candle's own input gradient has the wrong width for
            // non-square inputs at stride 2.
            (2, 3, 5, 3, 2, 1, 8, 8),
            (2, 3, 5, 3, 2, 1, 7, 7),
            (2, 4, 6, 3, 2, 0, 9, 9),
            (3, 3, 4, 1, 1, 0, 6, 5),
            (2, 2, 3, 1, 2, 0, 6, 6),
            (2, 3, 2, 3, 1, 0, 5, 6),
            // Padding wider than the image: some kernel columns read nothing at all.
            (2, 2, 3, 3, 1, 2, 1, 2),
            (2, 512, 2, 3, 1, 1, 40, 25),
            (2, 512, 3, 1, 1, 0, 90, 100),
        ];
        for (batch, channels, out_channels, kernel, stride, padding, height, width) in cases {
            let name = format!(
                "batch {batch} channels {channels} kernel {kernel} stride {stride} \
                 padding {padding} {height}x{width}"
            );
            let x = Var::from_tensor(&seeded(&[batch, channels, height, width], 1)).unwrap();
            let weight =
                Var::from_tensor(&seeded(&[out_channels, channels, kernel, kernel], 2)).unwrap();
            let bias = Var::from_tensor(&seeded(&[out_channels], 3)).unwrap();
            let reference = x
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, out_channels, 1, 1)).unwrap())
                .unwrap();
            let ours = x
                .apply_op3(&weight, &bias, Conv2dGemm { stride, padding })
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{name}");
            let scale = crate::tensor_ops::max_abs(&reference).unwrap().max(1.0);
            assert!(max_diff(&ours, &reference) <= 1e-5 * scale, "{name}");
            let probe = seeded(ours.dims(), 4);
            let gradients = |out: &Tensor| {
                (out * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (g_ours, g_ref) = (gradients(&ours), gradients(&reference));
            for (what, var) in [("input", &x), ("weight", &weight), ("bias", &bias)] {
                let (a, b) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
                let scale = crate::tensor_ops::max_abs(b).unwrap().max(1.0);
                assert!(
                    max_diff(a, b) <= 1e-5 * scale,
                    "{name}: {what} gradient off by {}",
                    max_diff(a, b)
                );
            }
        }
    }

    /// A weight that is not trained (a plain tensor, as LoRA fine-tuning freezes them) gets no
    /// gradient, and an input that leads to no variable none either.
    #[test]
    fn frozen_arguments_get_no_gradient() {
        let x = seeded(&[1, 3, 5, 5], 1);
        let weight = seeded(&[4, 3, 3, 3], 2);
        let bias = Var::from_tensor(&seeded(&[4], 3)).unwrap();
        let out = x
            .apply_op3(
                &weight,
                &bias,
                Conv2dGemm {
                    stride: 1,
                    padding: 1,
                },
            )
            .unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&weight).is_none() && grads.get(&x).is_none());
        // d(sum out)/d bias[o] = the number of output pixels.
        let dbias = grads.get(&bias).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dbias, vec![25.0; 4]);
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
