//! 2-D convolution on the CPU as matrix products in the NCHW layout, forward and backward.
//!
//! A convolution is `out[o, p] = bias[o] + sum_k weight[o, k] * columns[k, p]` with `k` running
//! over (input channel, kernel row, kernel column) and `p` over output pixels (im2col). The
//! weight of a PyTorch-layout kernel (O, C, kh, kw) already is that (O, C kh kw) matrix and the
//! product's rows are the output's channel planes, so only the columns are ever built, one band
//! of output rows at a time and never kept: the backward pass builds them again. Its gradients
//! are the two other products, `dweight = dout columns^T` and `dcolumns = weight^T dout`, whose
//! columns fold back onto the input (col2im); where the output has the input's size, the input
//! gradient is instead the convolution of dout with the flipped, transposed kernel.
//!
//! A 3x3 convolution at stride 1 with one pixel of padding over large maps goes through
//! Winograd's F(2x2, 3x3) instead ([`crate::ops::winograd`]), and so does its input gradient,
//! which is such a convolution too. Over a batch of small maps (a training step) such
//! convolutions run image by image through the direct kernels of [`crate::ops::direct_conv`]
//! where the CPU has AVX-512, and so does their weight gradient where it has 64 output channels.
//!
//! A batch of small maps (a training step) goes image by image, one image per thread, so that
//! each image's columns are built, multiplied and used in one core's cache; one image or large
//! maps go band by band, each product on all threads ([`Plan`]).
//!
//! candle 0.11's CPU convolution instead re-lays the input out channels-last and re-flattens the
//! kernel on one thread at every call, gathers its columns element by element and copies the
//! product into place (perf of SD 1.5's U-Net step: about a quarter of its time), and its
//! backward pass computes the input gradient with a direct transposed-convolution loop.

use super::vector_math;
use crate::ops::direct_conv;
use crate::ops::tensor::contiguous_f32;
use crate::ops::winograd::SameConv3x3;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Columns of one band are at most this many floats (16 MiB): enough pixels for the matrix
/// product to run at full speed, few enough that a 512x512 VAE layer does not build a gigabyte
/// of columns at once.
const COLUMN_BAND_FLOATS: usize = 1 << 22;

/// A batch whose images' columns are at most this many floats each (4 MiB) runs image by image,
/// one image per thread ([`Plan::PerImage`]).
const PER_IMAGE_FLOATS: usize = 1 << 20;

/// The weight gradient of a [`Plan::PerImage`] call sums its images in groups of this many,
/// each group into its own matrix, and then the groups in order: the same sums in the same order
/// however rayon shares the groups out, so a training run repeats bit for bit.
const IMAGES_PER_GRADIENT_GROUP: usize = 8;

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

/// How one call's work is shared between the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Images in parallel, each on one thread, whose columns are built, multiplied and consumed
    /// while they are still in that core's cache: a batch of small maps (a training step),
    /// where a product shared by all threads would be small and its columns would go through
    /// memory between the passes.
    PerImage,
    /// Bands one after another, each product on all threads: one image, or large maps.
    Bands,
}

/// Who runs a piece of work: the calling thread alone or all of rayon's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Threads {
    One,
    All,
}

impl Threads {
    /// gemm's parallelism for a product run by these threads.
    fn parallelism(self) -> gemm::Parallelism {
        match self {
            Threads::One => gemm::Parallelism::None,
            Threads::All => crate::ops::tensor::all_threads(),
        }
    }
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

/// The output columns whose kernel column reads inside the input row, and the input column
/// that the first of them reads.
#[derive(Debug, Clone)]
struct Span {
    outputs: std::ops::Range<usize>,
    first_input: usize,
}

/// How a tap reads the input plane in a [`Geometry::rows_aligned`] convolution, for a band of one
/// image: band pixel i reads plane pixel i + offset for i in `reads`, except where the tap falls
/// in the left or right padding (a few entries of each row); band rows outside `rows` read
/// the top or bottom padding.
#[derive(Debug, Clone)]
struct Shift {
    reads: std::ops::Range<usize>,
    offset: isize,
    rows: std::ops::Range<usize>,
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

    /// Image by image when there are images enough to keep every thread busy and each one's
    /// columns are small.
    fn plan(&self, threads: usize) -> Plan {
        if threads > 1
            && self.batch >= threads
            && self.depth() * self.out_pixels() <= PER_IMAGE_FLOATS
        {
            Plan::PerImage
        } else {
            Plan::Bands
        }
    }

    fn whole_image(&self, image: usize) -> Band {
        Band {
            first_image: image,
            images: 1,
            first_row: 0,
            rows: self.out_h,
        }
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

    /// The input row that output row `oy` reads through kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let y = (oy * self.stride + ky) as isize - self.padding as isize;
        (0..self.height as isize).contains(&y).then_some(y as usize)
    }

    /// The band's columns (C kh kw rows of band pixels) from the input `x` (B, C, H, W); taps in
    /// the padding are zero.
    fn fill_columns(&self, x: &[f32], band: &Band, columns: &mut [f32], threads: Threads) {
        let pixels = band.pixels(self);
        let fill = |(row, column): (usize, &mut [f32])| {
            let (channel, ky, kx) = self.tap(row);
            let span = self.span(kx);
            let shift = self.rows_aligned().then(|| self.shift(band, ky, kx));
            for (index, image_rows) in column.chunks_exact_mut(band.rows * self.out_w).enumerate() {
                let plane = &x
                    [((band.first_image + index) * self.channels + channel) * self.in_pixels()..]
                    [..self.in_pixels()];
                if let Some(shift) = &shift {
                    self.gather_shifted(plane, shift, &span, image_rows);
                    continue;
                }
                for (offset, out_row) in image_rows.chunks_exact_mut(self.out_w).enumerate() {
                    match self.input_row(band.first_row + offset, ky) {
                        Some(y) => {
                            self.gather_row(&plane[y * self.width..][..self.width], &span, out_row)
                        }
                        None => out_row.fill(0.0),
                    }
                }
            }
        };
        let rows = &mut columns[..self.depth() * pixels];
        match threads {
            Threads::One => rows.chunks_mut(pixels).enumerate().for_each(fill),
            Threads::All => rows.par_chunks_mut(pixels).enumerate().for_each(fill),
        }
    }

    /// Adds the band's column gradients back onto `planes`, the input planes (C, H, W) of the
    /// band's images: the adjoint of [`Self::fill_columns`]. One task per plane: no two write
    /// the same pixel.
    fn fold_columns(&self, columns: &[f32], band: &Band, planes: &mut [f32], threads: Threads) {
        let pixels = band.pixels(self);
        let taps = self.kernel_h * self.kernel_w;
        let fold = |(index, plane): (usize, &mut [f32])| {
            let (image, channel) = (index / self.channels, index % self.channels);
            for tap in 0..taps {
                let (ky, kx) = (tap / self.kernel_w, tap % self.kernel_w);
                let column = &columns[(channel * taps + tap) * pixels..][..pixels];
                let image_rows =
                    &column[image * band.rows * self.out_w..][..band.rows * self.out_w];
                let span = self.span(kx);
                for (offset, out_row) in image_rows.chunks_exact(self.out_w).enumerate() {
                    if let Some(y) = self.input_row(band.first_row + offset, ky) {
                        self.scatter_row(
                            out_row,
                            &span,
                            &mut plane[y * self.width..][..self.width],
                        );
                    }
                }
            }
        };
        let planes = &mut planes[..band.images * self.channels * self.in_pixels()];
        match threads {
            Threads::One => planes
                .chunks_mut(self.in_pixels())
                .enumerate()
                .for_each(fold),
            Threads::All => planes
                .par_chunks_mut(self.in_pixels())
                .enumerate()
                .for_each(fold),
        }
    }

    /// The convolution whose output is this one's input gradient, where the output has the
    /// input's size at stride 1: dx[c, y, x] = sum over o, ky, kx of
    /// weight[o, c, ky, kx] dout[o, y - ky + p, x - kx + p], which is a convolution of dout with
    /// the kernel transposed on its channels and flipped in both directions, padded by k - 1 - p.
    /// It writes dx in place with C kh kw deep products, where folding `weight^T dout` back
    /// would add every column into place and multiply through only O.
    fn transposed(&self) -> Option<Geometry> {
        let same_size = self.stride == 1 && self.out_h == self.height && self.out_w == self.width;
        (same_size && self.kernel_h == self.kernel_w).then_some(Geometry {
            channels: self.out_channels,
            out_channels: self.channels,
            padding: self.kernel_h - 1 - self.padding,
            ..*self
        })
    }

    /// The kernel of [`Self::transposed`]: (C, O, kh, kw) from (O, C, kh, kw), flipped.
    fn transposed_kernel(&self, weight: &[f32]) -> Vec<f32> {
        let taps = self.kernel_h * self.kernel_w;
        let mut kernel = vec![0f32; weight.len()];
        for (o, filters) in weight.chunks_exact(self.depth()).enumerate() {
            for (c, filter) in filters.chunks_exact(taps).enumerate() {
                let target = &mut kernel[(c * self.out_channels + o) * taps..][..taps];
                for (value, flipped) in target.iter_mut().zip(filter.iter().rev()) {
                    *value = *flipped;
                }
            }
        }
        kernel
    }

    /// This convolution's shapes if it is a 3x3 "same" one (stride 1, one pixel of padding).
    fn same_3x3(&self) -> Option<SameConv3x3> {
        let same =
            self.kernel_h == 3 && self.kernel_w == 3 && self.stride == 1 && self.padding == 1;
        same.then_some(SameConv3x3 {
            batch: self.batch,
            channels: self.channels,
            out_channels: self.out_channels,
            height: self.height,
            width: self.width,
        })
    }

    /// A 3x3 "same" convolution large enough for Winograd's F(2x2, 3x3) to pay.
    fn winograd(&self) -> Option<SameConv3x3> {
        self.same_3x3().filter(SameConv3x3::pays)
    }

    /// Output rows as wide as input rows at stride 1 (a "same" convolution): a tap then reads
    /// the input plane at one fixed offset from each output pixel, so a column row is one
    /// shifted copy of the plane.
    fn rows_aligned(&self) -> bool {
        self.stride == 1 && self.out_w == self.width
    }

    /// For [`Self::rows_aligned`] geometry: where tap (ky, kx) reads for a band of one image.
    fn shift(&self, band: &Band, ky: usize, kx: usize) -> Shift {
        let width = self.width as isize;
        let (rows, first_row) = (band.rows as isize, band.first_row as isize);
        let dy = ky as isize - self.padding as isize;
        let dx = kx as isize - self.padding as isize;
        let first_valid = (-dy - first_row).clamp(0, rows);
        let end_valid = (self.height as isize - dy - first_row).clamp(first_valid, rows);
        let offset = (first_row + dy) * width + dx;
        let plane = (self.height * self.width) as isize;
        let start = (first_valid * width).max(-offset).min(end_valid * width);
        let end = (end_valid * width).min(plane - offset).max(start);
        Shift {
            reads: start as usize..end as usize,
            offset,
            rows: first_valid as usize..end_valid as usize,
        }
    }

    /// One image's share of a column row, for [`Self::rows_aligned`] geometry.
    fn gather_shifted(&self, plane: &[f32], shift: &Shift, span: &Span, out: &mut [f32]) {
        out[..shift.reads.start].fill(0.0);
        out[shift.reads.end..].fill(0.0);
        if !shift.reads.is_empty() {
            let source = (shift.reads.start as isize + shift.offset) as usize;
            out[shift.reads.clone()].copy_from_slice(&plane[source..][..shift.reads.len()]);
        }
        self.zero_padding_taps(shift, span, out);
    }

    /// Zero where a tap falls in the left or right padding: the shifted copy wrapped those
    /// entries round to the neighbouring row.
    fn zero_padding_taps(&self, shift: &Shift, span: &Span, out: &mut [f32]) {
        if span.outputs.len() == self.out_w {
            return;
        }
        for row in shift.rows.clone() {
            let values = &mut out[row * self.out_w..][..self.out_w];
            zero_few(&mut values[..span.outputs.start]);
            zero_few(&mut values[span.outputs.end..]);
        }
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

    /// Where kernel column `kx` reads inside an input row: output column `ox` reads input
    /// column `ox * stride + kx - padding`.
    fn span(&self, kx: usize) -> Span {
        let offset = kx as isize - self.padding as isize;
        let stride = self.stride as isize;
        let out_w = self.out_w as isize;
        let first = (((-offset).max(0) + stride - 1) / stride).clamp(0, out_w);
        let end = ((self.width as isize - offset + stride - 1) / stride).clamp(first, out_w);
        Span {
            outputs: first as usize..end as usize,
            first_input: (first * stride + offset).max(0) as usize,
        }
    }

    /// out_row[ox] = input_row[ox * stride + kx - padding], zero in the padding.
    fn gather_row(&self, input_row: &[f32], span: &Span, out_row: &mut [f32]) {
        let inside = span.outputs.clone();
        out_row[..inside.start].fill(0.0);
        out_row[inside.end..].fill(0.0);
        if inside.is_empty() {
            return;
        }
        let sources = &input_row[span.first_input..];
        if self.stride == 1 {
            out_row[inside.clone()].copy_from_slice(&sources[..inside.len()]);
        } else {
            for (value, source) in out_row[inside]
                .iter_mut()
                .zip(sources.iter().step_by(self.stride))
            {
                *value = *source;
            }
        }
    }

    /// input_row[ox * stride + kx - padding] += out_row[ox]: the adjoint of `gather_row`.
    fn scatter_row(&self, out_row: &[f32], span: &Span, input_row: &mut [f32]) {
        let inside = span.outputs.clone();
        if inside.is_empty() {
            return;
        }
        let targets = &mut input_row[span.first_input..];
        if self.stride == 1 {
            for (target, value) in targets[..inside.len()].iter_mut().zip(&out_row[inside]) {
                *target += value;
            }
        } else {
            for (target, value) in targets
                .iter_mut()
                .step_by(self.stride)
                .zip(&out_row[inside])
            {
                *target += value;
            }
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
    fn band_columns(
        &self,
        x: &[f32],
        band: &Band,
        columns: &mut Vec<f32>,
        threads: Threads,
    ) -> Matrix {
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
        self.fill_columns(x, band, columns, threads);
        Matrix {
            data: columns.as_ptr(),
            row_stride: pixels,
        }
    }

    /// Adds the band's convolution into `planes`, the output planes (O, Ho, Wo) of the band's
    /// images.
    fn forward_band(
        &self,
        band: &Band,
        x: &[f32],
        weight: &[f32],
        planes: &mut [f32],
        (columns, scratch): (&mut Vec<f32>, &mut Vec<f32>),
        threads: Threads,
    ) {
        let (pixels, out_pixels) = (band.pixels(self), self.out_pixels());
        let rhs = self.band_columns(x, band, columns, threads);
        let single = band.images == 1;
        let (dst, dst_row_stride) = if single {
            (planes[band.first_pixel(self)..].as_mut_ptr(), out_pixels)
        } else {
            scratch.resize(self.out_channels * pixels, 0.0);
            (scratch.as_mut_ptr(), pixels)
        };
        // SAFETY: the band's rows of every output plane lie inside `planes`, and `scratch`
        // holds out_channels rows of `pixels` floats.
        unsafe {
            crate::ops::tensor::matrix_product(
                (self.out_channels, pixels, self.depth()),
                dst,
                (dst_row_stride, 1),
                single,
                weight.as_ptr(),
                (self.depth(), 1),
                rhs.data,
                (rhs.row_stride, 1),
                threads.parallelism(),
            )
        };
        if single {
            return;
        }
        // Several whole images: each image's share of the product added into place.
        planes[..band.images * self.out_channels * out_pixels]
            .par_chunks_mut(out_pixels)
            .enumerate()
            .for_each(|(index, plane)| {
                let (image, channel) = (index / self.out_channels, index % self.out_channels);
                let part = &scratch[channel * pixels + image * out_pixels..][..out_pixels];
                for (value, added) in plane.iter_mut().zip(part) {
                    *value += added;
                }
            });
    }

    /// Adds the band's input gradient into `planes`, the input planes (C, H, W) of the band's
    /// images: `weight^T dout` as columns folded back (same-size convolutions, pointwise ones
    /// included, take [`Self::transposed`] instead).
    fn input_gradient_band(
        &self,
        band: &Band,
        grad: &[f32],
        weight: &[f32],
        planes: &mut [f32],
        (columns, scratch): (&mut Vec<f32>, &mut Vec<f32>),
        threads: Threads,
    ) {
        let pixels = band.pixels(self);
        let dout = self.band_of_output(grad, band, scratch);
        columns.resize(self.depth() * pixels, 0.0);
        // SAFETY: `columns` holds depth rows of `pixels` floats.
        unsafe {
            crate::ops::tensor::matrix_product(
                (self.depth(), pixels, self.out_channels),
                columns.as_mut_ptr(),
                (pixels, 1),
                false,
                weight.as_ptr(),
                (1, self.depth()),
                dout.data,
                (dout.row_stride, 1),
                threads.parallelism(),
            )
        };
        self.fold_columns(columns, band, planes, threads);
    }

    /// Adds the band's `dout columns^T` into `dweight` (O, C kh kw).
    fn weight_gradient_band(
        &self,
        band: &Band,
        x: &[f32],
        grad: &[f32],
        dweight: &mut [f32],
        (columns, scratch): (&mut Vec<f32>, &mut Vec<f32>),
        threads: Threads,
    ) {
        let pixels = band.pixels(self);
        let dout = self.band_of_output(grad, band, scratch);
        let cols = self.band_columns(x, band, columns, threads);
        // SAFETY: `dweight` holds out_channels rows of depth floats; the columns are read
        // transposed (pixels x depth).
        unsafe {
            crate::ops::tensor::matrix_product(
                (self.out_channels, self.depth(), pixels),
                dweight.as_mut_ptr(),
                (self.depth(), 1),
                true,
                dout.data,
                (dout.row_stride, 1),
                cols.data,
                (1, cols.row_stride),
                threads.parallelism(),
            )
        };
    }

    /// A 3x3 "same" convolution of a batch of small maps that the direct kernels
    /// ([`crate::ops::direct_conv`]) take, image by image, on a CPU with AVX-512: with 8 input
    /// channels or more (on a 2-core Xeon, 1.05-1.65x faster than the columns over SD-style
    /// U-Net shapes from 4x4 to 28x28; the 1-channel input layer of a pixel model ran 15%
    /// slower).
    fn direct(&self, plan: Plan) -> Option<SameConv3x3> {
        let taken = plan == Plan::PerImage
            && self.channels >= 8
            && self.batch * self.out_pixels() >= DIRECT_MIN_PIXELS
            && direct_conv::available();
        self.same_3x3().filter(|_| taken)
    }

    /// Whether the direct weight gradient pays: its output gradient is one whole strip of 64
    /// channels or one half strip of 32, and the maps 7x7 or more (1.05-1.6x faster than the
    /// columns there; at 8x8 and below with 128 channels or more the columns won).
    fn direct_weight_gradient(&self, plan: Plan) -> Option<SameConv3x3> {
        self.direct(plan).filter(|_| {
            matches!(
                self.out_channels,
                direct_conv::STRIP | direct_conv::HALF_STRIP
            ) && self.out_pixels() >= 49
        })
    }

    /// The convolution of `x` (B, C, H, W) plus `bias`, as (B, O, Ho, Wo).
    fn forward(&self, x: &[f32], weight: &[f32], bias: &[f32], plan: Plan) -> Vec<f32> {
        if let Some(winograd) = self.winograd().filter(|_| plan == Plan::Bands) {
            return winograd.forward(x, weight, bias);
        }
        if let Some(direct) = self.direct(plan) {
            return direct.direct_forward(x, weight, bias);
        }
        let image_floats = self.out_channels * self.out_pixels();
        // SAFETY: every plane of every image is filled with its bias below (image by image or
        // all at once) before any product adds to it.
        let mut out = unsafe { crate::ops::tensor::unwritten_f32(self.batch * image_floats) };
        let fill_bias = |planes: &mut [f32]| {
            for (plane, channel_bias) in planes.chunks_mut(self.out_pixels()).zip(bias) {
                plane.fill(*channel_bias);
            }
        };
        match plan {
            Plan::PerImage => out.par_chunks_mut(image_floats).enumerate().for_each_init(
                || (Vec::new(), Vec::new()),
                |(columns, scratch), (image, planes)| {
                    fill_bias(planes);
                    let band = self.whole_image(image);
                    self.forward_band(&band, x, weight, planes, (columns, scratch), Threads::One);
                },
            ),
            Plan::Bands => {
                out.par_chunks_mut(image_floats).for_each(fill_bias);
                let (mut columns, mut scratch) = (Vec::new(), Vec::new());
                for band in self.bands() {
                    let planes = &mut out[band.first_image * image_floats..];
                    let buffers = (&mut columns, &mut scratch);
                    self.forward_band(&band, x, weight, planes, buffers, Threads::All);
                }
            }
        }
        out
    }

    /// The input gradient (B, C, H, W) from the output gradient `grad` (B, O, Ho, Wo).
    fn input_gradient(&self, grad: &[f32], weight: &[f32], plan: Plan) -> Vec<f32> {
        if let Some(transposed) = self.transposed() {
            let kernel = self.transposed_kernel(weight);
            let no_bias = vec![0f32; self.channels];
            return transposed.forward(grad, &kernel, &no_bias, plan);
        }
        let image_floats = self.channels * self.in_pixels();
        let mut dx = vec![0f32; self.batch * image_floats];
        match plan {
            Plan::PerImage => dx.par_chunks_mut(image_floats).enumerate().for_each_init(
                || (Vec::new(), Vec::new()),
                |(columns, scratch), (image, planes)| {
                    let band = self.whole_image(image);
                    let buffers = (columns, scratch);
                    self.input_gradient_band(&band, grad, weight, planes, buffers, Threads::One);
                },
            ),
            Plan::Bands => {
                let (mut columns, mut scratch) = (Vec::new(), Vec::new());
                for band in self.bands() {
                    let planes = &mut dx[band.first_image * image_floats..];
                    let buffers = (&mut columns, &mut scratch);
                    self.input_gradient_band(&band, grad, weight, planes, buffers, Threads::All);
                }
            }
        }
        dx
    }

    /// The weight gradient (O, C kh kw) from the input `x` and the output gradient `grad`.
    fn weight_gradient(&self, x: &[f32], grad: &[f32], plan: Plan) -> Vec<f32> {
        if let Some(direct) = self.direct_weight_gradient(plan) {
            return direct.direct_weight_gradient(x, grad);
        }
        let weight_count = self.out_channels * self.depth();
        match plan {
            Plan::PerImage => {
                let groups: Vec<std::ops::Range<usize>> = (0..self.batch)
                    .step_by(IMAGES_PER_GRADIENT_GROUP)
                    .map(|first| first..(first + IMAGES_PER_GRADIENT_GROUP).min(self.batch))
                    .collect();
                let sums: Vec<Vec<f32>> = groups
                    .into_par_iter()
                    .map(|images| {
                        let mut dweight = vec![0f32; weight_count];
                        let (mut columns, mut scratch) = (Vec::new(), Vec::new());
                        for image in images {
                            let band = self.whole_image(image);
                            let buffers = (&mut columns, &mut scratch);
                            self.weight_gradient_band(
                                &band,
                                x,
                                grad,
                                &mut dweight,
                                buffers,
                                Threads::One,
                            );
                        }
                        dweight
                    })
                    .collect();
                let mut sums = sums.into_iter();
                let mut dweight = sums.next().unwrap_or_else(|| vec![0f32; weight_count]);
                for sum in sums {
                    for (total, value) in dweight.iter_mut().zip(sum) {
                        *total += value;
                    }
                }
                dweight
            }
            Plan::Bands => {
                let mut dweight = vec![0f32; weight_count];
                let (mut columns, mut scratch) = (Vec::new(), Vec::new());
                for band in self.bands() {
                    let buffers = (&mut columns, &mut scratch);
                    self.weight_gradient_band(&band, x, grad, &mut dweight, buffers, Threads::All);
                }
                dweight
            }
        }
    }

    /// `dout` summed over images and pixels, per output channel.
    fn bias_gradient(&self, grad: &[f32]) -> Vec<f32> {
        let out_pixels = self.out_pixels();
        (0..self.out_channels)
            .into_par_iter()
            .map(|channel| {
                let plane = |image: usize| {
                    &grad[(image * self.out_channels + channel) * out_pixels..][..out_pixels]
                };
                let total: f64 = (0..self.batch)
                    .map(|image| vector_math::sum(plane(image)))
                    .sum();
                total as f32
            })
            .collect()
    }
}

/// Zeroes a few values (a padding's width): one store for the usual single value, where
/// `fill` calls memset, which for one value per row was 3% of a training step.
#[inline(always)]
fn zero_few(values: &mut [f32]) {
    match values {
        [] => {}
        [value] => *value = 0.0,
        _ => values.fill(0.0),
    }
}

/// Output pixels of a whole call below which the direct kernels are not taken: they pack the
/// filters per call (O x C x 9 floats), which a batch of so few pixels does not pay back. An
/// inference step's 8x8 and 4x4 maps at 1280 channels (59 MB of filters for 128 or 32 pixels)
/// ran a 256x256 U-Net step at twice im2col's time; a training batch has 1,024 or more.
const DIRECT_MIN_PIXELS: usize = 1024;

/// The plan for this machine's thread count.
fn plan(g: &Geometry) -> Plan {
    g.plan(candle_core::utils::get_num_threads())
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
        let out = g.forward(x, weight, bias, plan(&g));
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
        let dx = g.input_gradient(grad, weight, plan(&g));
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
        let mut out = g.weight_gradient(x, grad, plan(&g));
        out.extend(g.bias_gradient(grad));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::ops::tensor::seeded_randn as seeded;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::ops::tensor::max_abs(&(a - b).unwrap()).unwrap()
    }

    /// (batch, channels, out_channels, kernel, stride, padding, height, width): 3x3 and 1x1
    /// kernels, strides 1 and 2, with and without padding, odd and even sizes, bands of several
    /// whole images (small images) and of some rows of one image (a depth of 4608 over 1000
    /// pixels is past the band size), and same 3x3 convolutions of one image large enough for
    /// Winograd's F(2x2, 3x3) (forward and input gradient).
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
    const CASES: [Case; 17] = [
        (3, 3, 5, 3, 1, 1, 7, 9),
        // Strided cases square: candle's own input gradient has the wrong width for non-square
        // inputs at stride 2.
        (2, 3, 5, 3, 2, 1, 8, 8),
        (2, 3, 5, 3, 2, 1, 7, 7),
        (2, 4, 6, 3, 2, 0, 9, 9),
        (3, 3, 4, 1, 1, 0, 6, 5),
        (2, 2, 3, 1, 2, 0, 6, 6),
        (2, 3, 2, 3, 1, 0, 5, 6),
        // Padding wider than the image: some kernel columns read nothing at all.
        (2, 2, 3, 3, 1, 2, 1, 2),
        // Images of one pixel and of 2x2 (a U-Net's deepest level).
        (2, 3, 4, 3, 1, 1, 1, 1),
        (3, 3, 4, 3, 1, 1, 2, 2),
        (2, 512, 2, 3, 1, 1, 40, 25),
        (2, 512, 3, 1, 1, 0, 90, 100),
        // Batches of small maps the direct kernels take (the weight gradient too where there are
        // 64 or 32 output channels).
        (22, 8, 64, 3, 1, 1, 7, 7),
        (52, 9, 10, 3, 1, 1, 5, 4),
        (19, 13, 32, 3, 1, 1, 7, 8),
        (1, 16, 24, 3, 1, 1, 30, 21),
        (1, 9, 8, 3, 1, 1, 33, 64),
    ];

    fn case_geometry(case: &Case) -> Geometry {
        let (batch, channels, out_channels, kernel, stride, padding, height, width) = *case;
        Geometry::new(
            &Conv2dGemm { stride, padding },
            &Shape::from((batch, channels, height, width)),
            &Shape::from((out_channels, channels, kernel, kernel)),
        )
        .unwrap()
    }

    /// The last two cases are the ones Winograd's F(2x2, 3x3) takes, forward and backward.
    #[test]
    fn winograd_cases_take_winograd() {
        for (index, case) in CASES.iter().enumerate() {
            let g = case_geometry(case);
            let banded = g.plan(2) == Plan::Bands;
            let winograd = g.winograd().is_some() && banded;
            // The input gradient runs the transposed convolution in the forward's plan.
            let transposed = g.transposed().is_some_and(|t| t.winograd().is_some()) && banded;
            let expected = index >= CASES.len() - 2;
            assert_eq!(winograd, expected, "{g:?}");
            assert_eq!(transposed, expected, "{g:?}");
        }
    }

    /// The two cases before them are the ones the direct kernels take on two threads where the
    /// CPU has AVX-512: forward and input gradient both, the weight gradient the first.
    #[test]
    fn direct_cases_take_the_direct_kernels() {
        for (index, case) in CASES.iter().enumerate() {
            let g = case_geometry(case);
            let direct_case = (CASES.len() - 5..CASES.len() - 2).contains(&index);
            let expected = direct_case && direct_conv::available();
            assert_eq!(g.direct(g.plan(2)).is_some(), expected, "{g:?}");
            let transposed = g.transposed().and_then(|t| t.direct(t.plan(2)));
            assert_eq!(transposed.is_some(), expected, "{g:?}");
            let weight = g.direct_weight_gradient(g.plan(2)).is_some();
            assert_eq!(weight, expected && index != CASES.len() - 4, "{g:?}");
        }
    }

    /// Values and all three gradients equal candle's own conv2d plus bias over [`CASES`].
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        for (batch, channels, out_channels, kernel, stride, padding, height, width) in CASES {
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
            let scale = crate::ops::tensor::max_abs(&reference).unwrap().max(1.0);
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
                let scale = crate::ops::tensor::max_abs(b).unwrap().max(1.0);
                assert!(
                    max_diff(a, b) <= 1e-5 * scale,
                    "{name}: {what} gradient off by {}",
                    max_diff(a, b)
                );
            }
        }
    }

    /// Image by image and in shared bands (several whole images, or rows of one) give the same
    /// values and gradients over [`CASES`]; which one a call takes depends on the machine's
    /// thread count, so each is run here directly.
    #[test]
    fn per_image_and_banded_plans_agree() {
        for (batch, channels, out_channels, kernel, stride, padding, height, width) in CASES {
            let conv = Conv2dGemm { stride, padding };
            let input = Shape::from((batch, channels, height, width));
            let g = Geometry::new(
                &conv,
                &input,
                &Shape::from((out_channels, channels, kernel, kernel)),
            )
            .unwrap();
            let values = |shape: &[usize], seed| {
                seeded(shape, seed)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let x = values(&[batch, channels, height, width], 1);
            let weight = values(&[out_channels, channels, kernel, kernel], 2);
            let bias = values(&[out_channels], 3);
            let grad = values(&[batch, out_channels, g.out_h, g.out_w], 4);
            let close = |what: &str, a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst <= 1e-5 * scale, "{what} {input:?}: off by {worst}");
            };
            let [per_image, banded] = [Plan::PerImage, Plan::Bands];
            close(
                "output",
                &g.forward(&x, &weight, &bias, per_image),
                &g.forward(&x, &weight, &bias, banded),
            );
            close(
                "input gradient",
                &g.input_gradient(&grad, &weight, per_image),
                &g.input_gradient(&grad, &weight, banded),
            );
            close(
                "weight gradient",
                &g.weight_gradient(&x, &grad, per_image),
                &g.weight_gradient(&x, &grad, banded),
            );
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
