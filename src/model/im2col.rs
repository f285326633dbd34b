//! im2col ("unfold") as a differentiable candle op, so that training convolutions are matrix
//! products forward and backward. candle 0.11's CPU conv2d backward computes the input gradient
//! with a direct transposed-convolution loop and the kernel gradient as a convolution whose kernel
//! is the whole feature map; both are far slower than the matrix products used here.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The geometry of one square-kernel convolution.
#[derive(Debug, Clone, Copy)]
pub struct Unfold {
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
}

/// The adjoint of [`Unfold`] (col2im): columns back to an image of the given size, overlapping
/// taps summed.
#[derive(Debug, Clone, Copy)]
struct Fold {
    unfold: Unfold,
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl Unfold {
    /// The geometry of a convolution with `weight` (O, C, kh, kw).
    fn for_kernel(weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (_, _, kernel_h, kernel_w) = weight.dims4()?;
        Ok(Self {
            kernel_h,
            kernel_w,
            stride,
            padding,
        })
    }

    fn out_size(&self, height: usize, width: usize) -> (usize, usize) {
        (
            (height + 2 * self.padding - self.kernel_h) / self.stride + 1,
            (width + 2 * self.padding - self.kernel_w) / self.stride + 1,
        )
    }

    /// The first input column of output column `ox` (negative inside the left padding).
    fn first_column(&self, ox: usize) -> isize {
        (ox * self.stride) as isize - self.padding as isize
    }

    /// The input row that kernel row `ky` of output row `oy` reads, if it is inside the image.
    fn input_row(&self, oy: usize, ky: usize, height: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|iy| *iy < height)
    }

    /// The output row whose kernel row `ky` reads input row `iy`, if there is one.
    fn output_row(&self, iy: usize, ky: usize, out_h: usize) -> Option<usize> {
        let offset = (iy + self.padding).checked_sub(ky)?;
        (offset % self.stride == 0)
            .then_some(offset / self.stride)
            .filter(|oy| *oy < out_h)
    }

    /// Calls `f(input column, patch offset, length)` for the runs of pixel `ox`'s kernel row
    /// that lie inside an image `width` wide, in units of pixels: one run of `kernel_w` pixels
    /// in the interior, shorter at the edges where the padding taps are skipped.
    fn row_run(&self, ox: usize, width: usize, mut f: impl FnMut(usize, usize, usize)) {
        let first = self.first_column(ox);
        let skip = (-first).max(0) as usize;
        let end = (first + self.kernel_w as isize).min(width as isize);
        if end > first + skip as isize {
            f(
                (first + skip as isize) as usize,
                skip,
                (end - first) as usize - skip,
            );
        }
    }

    /// Writes output row `oy` of one channels-last (H, W, C) image as Wo patch rows of
    /// (ky, kx, c). A kernel row of a patch is one contiguous run of the input row, so each is a
    /// single copy; taps in the padding stay zero.
    fn unfold_row(
        &self,
        image: &[f32],
        (h, w, c): (usize, usize, usize),
        oy: usize,
        rows: &mut [f32],
    ) {
        let patch = self.kernel_h * self.kernel_w * c;
        for (ox, row) in rows.chunks_exact_mut(patch).enumerate() {
            for ky in 0..self.kernel_h {
                let Some(iy) = self.input_row(oy, ky, h) else {
                    continue;
                };
                let kernel_row = &mut row[ky * self.kernel_w * c..][..self.kernel_w * c];
                self.row_run(ox, w, |ix, kx, len| {
                    kernel_row[kx * c..(kx + len) * c]
                        .copy_from_slice(&image[(iy * w + ix) * c..][..len * c]);
                });
            }
        }
    }

    /// The adjoint of [`Self::unfold_row`] for input row `iy` of one image: adds back every patch
    /// entry that read a pixel of `target` (W, C). `rows` are all the patch rows of the image.
    fn fold_row(
        &self,
        rows: &[f32],
        (h, w, c): (usize, usize, usize),
        iy: usize,
        target: &mut [f32],
    ) {
        let (out_h, out_w) = self.out_size(h, w);
        let patch = self.kernel_h * self.kernel_w * c;
        for ky in 0..self.kernel_h {
            let Some(oy) = self.output_row(iy, ky, out_h) else {
                continue;
            };
            for ox in 0..out_w {
                let kernel_row = &rows[(oy * out_w + ox) * patch + ky * self.kernel_w * c..];
                self.row_run(ox, w, |ix, kx, len| {
                    let sums = &mut target[ix * c..(ix + len) * c];
                    for (sum, value) in sums.iter_mut().zip(&kernel_row[kx * c..(kx + len) * c]) {
                        *sum += value;
                    }
                });
            }
        }
    }
}

fn f32_input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is implemented")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    /// Channels-last (B, H, W, C) -> (B Ho Wo, kh kw C): one row per output pixel, its patch
    /// ordered (ky, kx, c) as a channels-last kernel flattens. With the pixels as the long side of
    /// the matrix product, the gemm crate runs about twice as fast as with the transposed layout.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let input = f32_input(storage, layout, "unfold")?;
        let (out_h, out_w) = self.out_size(h, w);
        let patch = self.kernel_h * self.kernel_w * c;
        let mut out = vec![0f32; b * out_h * out_w * patch];
        // One task per output row of one image, so that a single image still uses every core.
        out.par_chunks_mut(out_w * patch)
            .enumerate()
            .for_each(|(index, rows)| {
                let (image, oy) = (index / out_h, index % out_h);
                let image = &input[image * h * w * c..][..h * w * c];
                self.unfold_row(image, (h, w, c), oy, rows);
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((b * out_h * out_w, patch)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (batch, height, width, channels) = arg.dims4()?;
        let fold = Fold {
            unfold: *self,
            batch,
            channels,
            height,
            width,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    /// (B Ho Wo, kh kw C) patch rows -> channels-last (B, H, W, C), overlapping taps summed.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let columns = f32_input(storage, layout, "fold")?;
        let (b, c, h, w) = (self.batch, self.channels, self.height, self.width);
        let (out_h, out_w) = self.unfold.out_size(h, w);
        let per_image = out_h * out_w * self.unfold.kernel_h * self.unfold.kernel_w * c;
        let mut image = vec![0f32; b * h * w * c];
        // One task per input row: no two tasks write the same pixel.
        image
            .par_chunks_mut(w * c)
            .enumerate()
            .for_each(|(index, target)| {
                let (batch_index, iy) = (index / h, index % h);
                let rows = &columns[batch_index * per_image..][..per_image];
                self.unfold.fold_row(rows, (h, w, c), iy, target);
            });
        Ok((CpuStorage::F32(image), Shape::from((b, h, w, c))))
    }
}

/// conv2d(x, weight) + bias as unfold and one matrix product over the whole batch (f32,
/// groups 1, dilation 1).
pub fn conv2d_unfolded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (o, c, kh, kw) = weight.dims4()?;
    let unfold = Unfold::for_kernel(weight, stride, padding)?;
    let (out_h, out_w) = unfold.out_size(h, w);
    // Channels last, so that every kernel row of a patch is one contiguous run of the input and
    // a 1x1 convolution needs no unfolding at all.
    let channels_last = x.permute((0, 2, 3, 1))?.contiguous()?;
    let columns = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        channels_last.reshape((b * h * w, c))?
    } else {
        channels_last.apply_op1(unfold)?
    };
    // (B Ho Wo, K) x (K, O) -> (B Ho Wo, O), then to (B, O, Ho, Wo) with the bias added.
    let kernel = weight.permute((0, 2, 3, 1))?.reshape((o, kh * kw * c))?;
    let pixels_by_channel = columns.matmul(&kernel.t()?)?;
    let bias = match bias {
        Some(bias) => bias.clone(),
        None => Tensor::zeros(o, pixels_by_channel.dtype(), pixels_by_channel.device())?,
    };
    pixels_by_channel
        .apply_op2(
            &bias,
            ChannelsFirst {
                batch: b,
                spatial: out_h * out_w,
            },
        )?
        .reshape((b, o, out_h, out_w))
}

/// conv2d(x, weight) + bias with the unfolding made of shifted views stacked (one per kernel tap)
/// and one batched matrix product: only ops that every candle backend has, forward and backward.
/// Used for training on GPUs, where candle 0.11 computes conv2d's input gradient with a direct
/// transposed-convolution kernel instead of a matrix product.
pub fn conv2d_taps(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let unfold = Unfold::for_kernel(weight, stride, padding)?;
    let (out_h, out_w) = unfold.out_size(h, w);
    // Tap (ky, kx) reads rows ky, ky + s, ..., so the padded image needs ky + s Ho rows; the
    // extra zero rows at the far edge are never read for a real output.
    let extra_h = (kh - 1 + stride * out_h).saturating_sub(h + 2 * padding);
    let extra_w = (kw - 1 + stride * out_w).saturating_sub(w + 2 * padding);
    let padded = x
        .pad_with_zeros(2, padding, padding + extra_h)?
        .pad_with_zeros(3, padding, padding + extra_w)?;
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let tap = padded
                .narrow(2, ky, stride * out_h)?
                .narrow(3, kx, stride * out_w)?;
            let tap = if stride == 1 {
                tap
            } else {
                tap.reshape((b, c, out_h, stride, out_w, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, out_h, out_w))?
            };
            taps.push(tap);
        }
    }
    // (B, C, kh kw, Ho, Wo): the row order (c, ky, kx) of the flattened kernel.
    let columns = Tensor::stack(&taps, 2)?.reshape((b, c * kh * kw, out_h * out_w))?;
    let kernel = weight
        .reshape((1, o, c * kh * kw))?
        .broadcast_as((b, o, c * kh * kw))?;
    let out = kernel
        .contiguous()?
        .matmul(&columns)?
        .reshape((b, o, out_h, out_w))?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(out),
    }
}

/// (B HW, C) channels-last rows to (B, C, HW) with a per-channel bias added, in one pass. Its
/// backward transposes the gradient back and sums it per channel for the bias directly;
/// as a permute plus a broadcast add, candle would reduce over the batch and spatial axes with
/// a strided sum, several times slower.
#[derive(Debug, Clone, Copy)]
struct ChannelsFirst {
    batch: usize,
    spatial: usize,
}

/// The backward of [`ChannelsFirst`] on (B, C, HW): [(B HW, C) gradient, (C) bias gradient].
#[derive(Debug, Clone, Copy)]
struct ChannelsFirstBackward {
    batch: usize,
    spatial: usize,
}

impl candle_core::CustomOp2 for ChannelsFirst {
    fn name(&self) -> &'static str {
        "channels-first-bias"
    }

    fn cpu_fwd(
        &self,
        rows: &CpuStorage,
        rows_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = f32_input(rows, rows_layout, "channels-first")?;
        let bias = f32_input(bias, bias_layout, "channels-first")?;
        let (hw, c) = (self.spatial, bias.len());
        let mut out = vec![0f32; self.batch * c * hw];
        out.par_chunks_mut(c * hw)
            .zip(rows.par_chunks(hw * c))
            .for_each(|(planes, rows)| {
                for (channel, plane) in planes.chunks_mut(hw).enumerate() {
                    let b = bias[channel];
                    for (p, v) in plane.iter_mut().enumerate() {
                        *v = rows[p * c + channel] + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((self.batch, c, hw))))
    }

    fn bwd(
        &self,
        _rows: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = bias.dim(0)?;
        let n = self.batch * self.spatial * c;
        let both = grad
            .contiguous()?
            .apply_op1_no_bwd(&ChannelsFirstBackward {
                batch: self.batch,
                spatial: self.spatial,
            })?;
        let grad_rows = both
            .narrow(0, 0, n)?
            .reshape((self.batch * self.spatial, c))?;
        let grad_bias = both.narrow(0, n, c)?;
        Ok((Some(grad_rows), Some(grad_bias)))
    }
}

impl CustomOp1 for ChannelsFirstBackward {
    fn name(&self) -> &'static str {
        "channels-first-bias-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let grad = f32_input(storage, layout, "channels-first backward")?;
        let hw = self.spatial;
        let c = grad.len() / (self.batch * hw);
        let mut out = vec![0f32; self.batch * hw * c + c];
        let (rows, bias) = out.split_at_mut(self.batch * hw * c);
        let partial: Vec<Vec<f64>> = rows
            .par_chunks_mut(hw * c)
            .zip(grad.par_chunks(c * hw))
            .map(|(rows, planes)| {
                let mut sums = vec![0f64; c];
                for (channel, plane) in planes.chunks(hw).enumerate() {
                    for (p, v) in plane.iter().enumerate() {
                        rows[p * c + channel] = *v;
                        sums[channel] += *v as f64;
                    }
                }
                sums
            })
            .collect();
        for (channel, total) in bias.iter_mut().enumerate() {
            *total = partial.iter().map(|s| s[channel]).sum::<f64>() as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        let mut noise = crate::sampler::noise::SeededNoise::new(seed);
        noise.randn(shape).unwrap()
    }

    type Conv = fn(&Tensor, &Tensor, Option<&Tensor>, usize, usize) -> Result<Tensor>;

    /// Forward values and all three gradients of both unfolded convolutions equal candle's own
    /// conv2d, for stride 1 and 2, odd and even sizes, 3x3 and 1x1 kernels.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let variants: [(&str, Conv); 2] = [
            ("conv2d_unfolded", conv2d_unfolded),
            ("conv2d_taps", conv2d_taps),
        ];
        let cases = [
            (3, 1, 1, 7),
            (3, 2, 1, 7),
            (3, 2, 1, 8),
            (3, 1, 0, 5),
            (1, 1, 0, 6),
        ];
        for (name, conv) in variants {
            for (kernel, stride, padding, size) in cases {
                let x = Var::from_tensor(&seeded(&[2, 3, size, size], 1)).unwrap();
                let weight = Var::from_tensor(&seeded(&[4, 3, kernel, kernel], 2)).unwrap();
                let bias = Var::from_tensor(&seeded(&[4], 3)).unwrap();
                let reference = x
                    .conv2d(&weight, padding, stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap();
                let ours = conv(&x, &weight, Some(&bias), stride, padding).unwrap();
                assert_eq!(ours.dims(), reference.dims(), "{name}");
                let diff =
                    |a: &Tensor, b: &Tensor| crate::tensor_ops::max_abs(&(a - b).unwrap()).unwrap();
                assert!(diff(&ours, &reference) < 1e-5, "{name}");
                let probe = seeded(ours.dims(), 4);
                let g_ref = (&reference * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_ours = (&ours * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for var in [&x, &weight, &bias] {
                    let (a, b) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
                    assert!(
                        diff(a, b) < 1e-4,
                        "{name} kernel {kernel} stride {stride} size {size}: {}",
                        diff(a, b)
                    );
                }
            }
        }
        let _ = Device::Cpu;
    }
}
