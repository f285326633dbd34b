//! 3x3 convolutions at stride 1 with one pixel of zero padding over batches of small maps (a
//! training step's), computed directly from the tensors as they lie: no column matrix, no
//! per-call packing of the activations.
//!
//! Forward: `out[o, p] = bias[o] + sum over c, ky, kx of w[o, c, ky, kx] x[c, p + s(ky, kx)]`
//! with the tap's shift `s = (ky - 1) W + kx - 1`, zero where the tap falls outside the image. A
//! micro-tile keeps 8 output channels by 48 output pixels (three runs of 16 pixels, each run
//! inside one image, so that one tile can span the small maps of several images) in 24 AVX-512
//! registers. Each (channel, tap) step loads the three runs of the input at the tap's shift, with
//! masks that zero the lanes whose tap lies in the padding (a masked-off lane is never read, so
//! the shifted address may lie outside the plane), and broadcasts 8 filter values, which are
//! packed per call in the order the tile reads them (im2col instead writes nine shifted copies of
//! the input, which the gemm crate then packs again).
//!
//! The input gradient of such a convolution is the same convolution of the output gradient with
//! the kernel transposed on its channels and flipped (`conv_gemm`), so the forward kernel serves
//! it too.
//!
//! Weight gradient: `dw[o, c, tap] = sum over images and p of dout[o, p] x[c, p + s(tap)]`, a
//! product over pixels. For each group of images x is copied once onto a grid with a zero
//! border (rows W + 1 wide, so that one zero column pads both sides, and one zero row between
//! images), dout once into strips of 64 output channels (32 where a layer has no more) on the
//! same grid, and for each tap the `gemm_f32` micro-tile multiplies the strips by x's channel
//! rows read at the tap's shift.

use super::gemm_bf16::OutPtr;
use super::gemm_f32::{AlignedFloats, Tile, HALF_TILE_ROWS};
pub use super::gemm_f32::{HALF_STRIP, STRIP};
use super::winograd::SameConv3x3;
use rayon::prelude::*;

/// Pixels of one run: one 16-lane register.
const RUN: usize = 16;
/// Runs per micro-tile.
const RUNS: usize = 3;
/// Output channels per micro-tile: 8 x 3 = 24 accumulators, with the three runs and a broadcast
/// 28 of the 32 vector registers; 8 divides the channel counts of the models here (6 x 4 left a
/// third of the last block of 32 or 64 channels empty).
const TILE_CHANNELS: usize = 8;
/// Rows of `gemm_f32`'s micro-tile, which the weight gradient runs.
const GRADIENT_TILE_ROWS: usize = 6;
const TAPS: usize = 9;
/// Images whose weight gradients are summed into one matrix before the groups are summed in
/// order: the same sums in the same order however rayon shares the groups out, so a training run
/// repeats bit for bit; 8 images of 16x16 with 64 channels keep both grids (about 600 KiB each)
/// in a core's L2.
const IMAGES_PER_GROUP: usize = 8;
/// Grid positions per k block of the weight gradient's products (as `gemm_f32`'s: a strip's
/// block is 24 KiB of L1).
const K_BLOCK: usize = 96;
/// Micro-tiles of input channels whose weight-gradient sums are finished before the next ones
/// start.
const CHUNK_TILES: usize = 2;

/// The output-gradient strips of a weight gradient: 64 channels wide, or 32 where a layer has
/// 32 (a 64-wide strip would multiply zeros half the time).
#[derive(Clone, Copy)]
struct GradientStrips {
    width: usize,
    tile_rows: usize,
}

impl GradientStrips {
    fn for_channels(out_channels: usize) -> Self {
        if out_channels <= HALF_STRIP {
            Self {
                width: HALF_STRIP,
                tile_rows: HALF_TILE_ROWS,
            }
        } else {
            Self {
                width: STRIP,
                tile_rows: GRADIENT_TILE_ROWS,
            }
        }
    }

    fn padded(&self, out_channels: usize) -> usize {
        out_channels.div_ceil(self.width) * self.width
    }
}

/// Whether this CPU runs these kernels (AVX-512 Foundation).
pub fn available() -> bool {
    super::gemm_f32::available()
}

/// Pixels `first..first + len` (at most [`RUN`]) of one image's planes.
#[derive(Debug, Clone, Copy)]
struct Run {
    image: usize,
    first: usize,
    len: usize,
}

/// Where the runs of a micro-tile read and write, and which of their lanes each tap reads.
struct TileRuns {
    /// Offsets of each run's first pixel in the batch's input (channel 0) and output (channel 0).
    input: [usize; RUNS],
    output: [usize; RUNS],
    /// Lanes of each run inside the image, by tap: the lanes whose tap reads inside the image.
    reads: [[u16; RUNS]; TAPS],
    writes: [u16; RUNS],
}

/// The direct kernels of a same 3x3 convolution, beside Winograd's (`ops::winograd`) on the same
/// shapes.
impl SameConv3x3 {
    fn plane(&self) -> usize {
        self.height * self.width
    }

    /// The shift of tap (ky, kx) in a plane of rows `pitch` apart.
    fn shift(tap: usize, pitch: usize) -> isize {
        let (ky, kx) = ((tap / 3) as isize, (tap % 3) as isize);
        (ky - 1) * pitch as isize + kx - 1
    }

    fn runs(&self) -> Vec<Run> {
        let plane = self.plane();
        (0..self.batch)
            .flat_map(|image| {
                (0..plane).step_by(RUN).map(move |first| Run {
                    image,
                    first,
                    len: RUN.min(plane - first),
                })
            })
            .collect()
    }

    /// The lanes of a run of `len` pixels from plane pixel `first` whose tap reads inside the
    /// plane, by tap: the same for the runs at one place of every image, so made once a call.
    fn run_reads(&self, first: usize, len: usize) -> [u16; TAPS] {
        let (h, w) = (self.height as isize, self.width as isize);
        let mut reads = [0u16; TAPS];
        for lane in 0..len {
            let pixel = first + lane;
            let (y, x) = ((pixel / self.width) as isize, (pixel % self.width) as isize);
            for (tap, read) in reads.iter_mut().enumerate() {
                let (dy, dx) = ((tap / 3) as isize - 1, (tap % 3) as isize - 1);
                if (0..h).contains(&(y + dy)) && (0..w).contains(&(x + dx)) {
                    *read |= 1 << lane;
                }
            }
        }
        reads
    }

    /// `run_reads` for the runs of one image, in order.
    fn image_run_reads(&self) -> Vec<[u16; TAPS]> {
        let plane = self.plane();
        (0..plane)
            .step_by(RUN)
            .map(|first| self.run_reads(first, RUN.min(plane - first)))
            .collect()
    }

    fn tile_runs(&self, runs: &[Run], image_reads: &[[u16; TAPS]]) -> TileRuns {
        let plane = self.plane();
        let mut tile = TileRuns {
            input: [0; RUNS],
            output: [0; RUNS],
            reads: [[0; RUNS]; TAPS],
            writes: [0; RUNS],
        };
        for (slot, run) in runs.iter().enumerate() {
            tile.input[slot] = run.image * self.channels * plane + run.first;
            tile.output[slot] = run.image * self.out_channels * plane + run.first;
            tile.writes[slot] = ((1u32 << run.len) - 1) as u16;
            for (reads, read) in tile.reads.iter_mut().zip(image_reads[run.first / RUN]) {
                reads[slot] = read;
            }
        }
        tile
    }

    /// The kernel (O, C, 3, 3) as blocks of [`TILE_CHANNELS`] output channels, each
    /// `[c][tap][8]`, the last block's channels past O zero.
    fn packed_filters(&self, weight: &[f32]) -> Vec<f32> {
        let depth = self.channels * TAPS;
        let blocks = self.out_channels.div_ceil(TILE_CHANNELS);
        let mut packed = vec![0f32; blocks * depth * TILE_CHANNELS];
        for (o, filter) in weight.chunks_exact(depth).enumerate() {
            let block = &mut packed[o / TILE_CHANNELS * depth * TILE_CHANNELS..];
            for (k, value) in filter.iter().enumerate() {
                block[k * TILE_CHANNELS + o % TILE_CHANNELS] = *value;
            }
        }
        packed
    }

    /// Panics unless `x` holds the batch's input and each other operand its length, on a CPU
    /// with AVX-512: the callers check the tensors' shapes, so a mismatch here is a bug.
    fn check_operands(&self, x: &[f32], operands: &[(&[f32], usize, &str)]) {
        let input = self.batch * self.channels * self.plane();
        assert_eq!(x.len(), input, "direct conv: the input");
        for (values, len, what) in operands {
            assert_eq!(values.len(), *len, "direct conv: the {what}");
        }
        assert!(available(), "direct conv: this CPU has no AVX-512");
    }

    /// The convolution of `x` (B, C, H, W) plus `bias`, as (B, O, H, W), on all threads. Panics
    /// on operands of other lengths or a CPU without AVX-512 (see [`available`]).
    pub fn direct_forward(&self, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let plane = self.plane();
        let weight_len = self.out_channels * self.channels * TAPS;
        self.check_operands(
            x,
            &[
                (weight, weight_len, "weight"),
                (bias, self.out_channels, "bias"),
            ],
        );
        let filters = self.packed_filters(weight);
        let runs = self.runs();
        let image_reads = self.image_run_reads();
        // SAFETY: every output pixel lies in exactly one run, and each run's tile writes all of
        // its output channels.
        let mut out =
            unsafe { super::tensor::unwritten_f32(self.batch * self.out_channels * plane) };
        let out_ptr = OutPtr(out.as_mut_ptr());
        runs.par_chunks(RUNS).with_min_len(4).for_each(|runs| {
            let tile = self.tile_runs(runs, &image_reads);
            // SAFETY: the lengths are checked above and the CPU has AVX-512; no two tiles write
            // the same output pixel.
            unsafe { self.tile_all_channels(x, &filters, bias, &tile, out_ptr) };
        });
        out
    }

    /// Every block of output channels over one tile's runs.
    ///
    /// # Safety
    /// `x` must be the batch's input and `out` its output, with AVX-512.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_all_channels(
        &self,
        x: &[f32],
        filters: &[f32],
        bias: &[f32],
        tile: &TileRuns,
        out: OutPtr,
    ) {
        let out = out.0;
        let depth = self.channels * TAPS;
        let shifts: [isize; TAPS] = std::array::from_fn(|tap| Self::shift(tap, self.width));
        let sources = tile.input.map(|offset| x.as_ptr().wrapping_add(offset));
        for first in (0..self.out_channels).step_by(TILE_CHANNELS) {
            let rows = TILE_CHANNELS.min(self.out_channels - first);
            let block = Block {
                sources,
                reads: &tile.reads,
                shifts: &shifts,
                plane: self.plane(),
                channels: self.channels,
                filters: filters[first * depth..].as_ptr(),
                bias: &bias[first..first + rows],
                outputs: tile
                    .output
                    .map(|offset| out.wrapping_add(offset + first * self.plane())),
                writes: tile.writes,
            };
            macro_rules! rows {
                ($($n:literal)*) => {
                    match rows {
                        $($n => block.run::<$n>(),)*
                        _ => unreachable!("a block has 1 to {TILE_CHANNELS} channels"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8)
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile_all_channels(
        &self,
        _x: &[f32],
        _filters: &[f32],
        _bias: &[f32],
        _tile: &TileRuns,
        _out: OutPtr,
    ) {
        unreachable!("`direct_forward` refuses CPUs without AVX-512")
    }

    /// The weight gradient (O, C, 3, 3) from the input `x` (B, C, H, W) and the output gradient
    /// `dout` (B, O, H, W), on all threads. Panics as [`Self::direct_forward`].
    pub fn direct_weight_gradient(&self, x: &[f32], dout: &[f32]) -> Vec<f32> {
        let gradient = self.batch * self.out_channels * self.plane();
        self.check_operands(x, &[(dout, gradient, "output gradient")]);
        let groups: Vec<std::ops::Range<usize>> = (0..self.batch)
            .step_by(IMAGES_PER_GROUP)
            .map(|first| first..(first + IMAGES_PER_GROUP).min(self.batch))
            .collect();
        let sums: Vec<Vec<f32>> = groups
            .into_par_iter()
            .map(|images| self.group_weight_gradient(x, dout, images))
            .collect();
        // Sums are [tap][c][o] rows of whole strips; the gradient is [o][c][tap].
        let padded_out = GradientStrips::for_channels(self.out_channels).padded(self.out_channels);
        let mut dweight = vec![0f32; self.out_channels * self.channels * TAPS];
        dweight
            .par_chunks_mut(self.channels * TAPS)
            .enumerate()
            .for_each(|(o, filter)| {
                for (k, value) in filter.iter_mut().enumerate() {
                    let (c, tap) = (k / TAPS, k % TAPS);
                    let at = (tap * self.channels + c) * padded_out + o;
                    *value = sums.iter().map(|sum| sum[at]).sum();
                }
            });
        dweight
    }

    /// One group's `sum over images and p of dout[o, p] x[c, p + s(tap)]` as [tap][c][o] with
    /// the output channels padded to whole strips.
    #[cfg(target_arch = "x86_64")]
    fn group_weight_gradient(
        &self,
        x: &[f32],
        dout: &[f32],
        images: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let (height, width, plane) = (self.height, self.width, self.plane());
        // The grid: rows `pitch` apart, one zero column (the right padding of a row is the left
        // of the next) and one zero row above each image (the bottom padding of the one before).
        let pitch = width + 1;
        let image_grid = (height + 1) * pitch;
        let positions = images.len() * image_grid;
        let margin = pitch + 1;
        let row = margin + positions + pitch + margin;
        let at = |image: usize, y: usize, x: usize| image * image_grid + (y + 1) * pitch + x + 1;
        let mut grid = vec![0f32; self.channels * row];
        for (c, channel) in grid.chunks_exact_mut(row).enumerate() {
            for (index, image) in images.clone().enumerate() {
                let source = &x[(image * self.channels + c) * plane..][..plane];
                for (y, line) in source.chunks_exact(width).enumerate() {
                    channel[margin + at(index, y, 0)..][..width].copy_from_slice(line);
                }
            }
        }
        let layout = GradientStrips::for_channels(self.out_channels);
        let strip_width = layout.width;
        let strips = self.out_channels.div_ceil(strip_width);
        let mut gradient_strips: Vec<AlignedFloats> =
            (0..strips).map(|_| AlignedFloats::default()).collect();
        for (s, strip) in gradient_strips.iter_mut().enumerate() {
            let values = strip.resized(positions * strip_width);
            values.fill(0.0);
            let channels = s * strip_width..(s * strip_width + strip_width).min(self.out_channels);
            // A transpose, 16 pixels of a row at a time: the strip rows they land in (2-4 KiB)
            // stay in L1 while every channel writes its column.
            for (index, image) in images.clone().enumerate() {
                let planes = &dout[image * self.out_channels * plane..];
                for y in 0..height {
                    for x0 in (0..width).step_by(RUN) {
                        let run = RUN.min(width - x0);
                        let first = at(index, y, x0) * strip_width;
                        let rows = &mut values[first..first + run * strip_width];
                        for o in channels.clone() {
                            let source = &planes[o * plane + y * width + x0..][..run];
                            for (value, row) in
                                source.iter().zip(rows.chunks_exact_mut(strip_width))
                            {
                                row[o % strip_width] = *value;
                            }
                        }
                    }
                }
            }
        }
        let padded_out = strips * strip_width;
        let mut sums = vec![0f32; TAPS * self.channels * padded_out];
        let tile_rows = layout.tile_rows;
        let chunk_channels = CHUNK_TILES * tile_rows;
        // Channels in chunks whose sums (9 x 24 x O floats) stay in L2 while the k blocks pass;
        // within a k block each strip's block stays in L1 across the taps and channel tiles.
        for chunk in (0..self.channels).step_by(chunk_channels) {
            let chunk = chunk..(chunk + chunk_channels).min(self.channels);
            for (s, strip) in gradient_strips.iter().enumerate() {
                for k0 in (0..positions).step_by(K_BLOCK) {
                    let depth = K_BLOCK.min(positions - k0);
                    let tile = Tile {
                        b: strip.values()[k0 * strip_width..].as_ptr(),
                        depth,
                        a_row: row,
                        a_col: 1,
                        out_row: padded_out,
                        cols: strip_width,
                        accumulate: k0 > 0,
                    };
                    for tap in 0..TAPS {
                        let first_read = (margin + k0) as isize + Self::shift(tap, pitch);
                        for c in chunk.clone().step_by(tile_rows) {
                            let rows = tile_rows.min(chunk.end - c);
                            let a = &grid[c * row + first_read as usize..];
                            let y = &mut sums
                                [(tap * self.channels + c) * padded_out + s * strip_width..];
                            // SAFETY: A's rows lie inside the grid (the margins cover every
                            // shift), y's inside `sums`; the CPU has AVX-512 (checked by the
                            // caller).
                            unsafe {
                                if strip_width == HALF_STRIP {
                                    tile.run_half(rows, a.as_ptr(), y.as_mut_ptr())
                                } else {
                                    tile.run(rows, a.as_ptr(), y.as_mut_ptr())
                                }
                            };
                        }
                    }
                }
            }
        }
        sums
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn group_weight_gradient(&self, _: &[f32], _: &[f32], _: std::ops::Range<usize>) -> Vec<f32> {
        unreachable!("`direct_weight_gradient` refuses CPUs without AVX-512")
    }
}

/// One block of output channels over a tile's runs.
struct Block<'a> {
    sources: [*const f32; RUNS],
    reads: &'a [[u16; RUNS]; TAPS],
    shifts: &'a [isize; TAPS],
    plane: usize,
    channels: usize,
    /// The block's packed filters, `[c][tap][8]`.
    filters: *const f32,
    bias: &'a [f32],
    outputs: [*mut f32; RUNS],
    writes: [u16; RUNS],
}

#[cfg(target_arch = "x86_64")]
impl Block<'_> {
    /// # Safety
    /// The CPU must have AVX-512; every lane a mask keeps must lie inside the input and output.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); RUNS]; R];
        for (acc_row, &bias) in acc.iter_mut().zip(self.bias) {
            *acc_row = [_mm512_set1_ps(bias); RUNS];
        }
        let mut filters = self.filters;
        for c in 0..self.channels {
            let channel = c * self.plane;
            for (&shift, reads) in self.shifts.iter().zip(self.reads) {
                let mut inputs = [_mm512_setzero_ps(); RUNS];
                for (v, input) in inputs.iter_mut().enumerate() {
                    let at = self.sources[v].wrapping_add(channel).wrapping_offset(shift);
                    *input = _mm512_maskz_loadu_ps(reads[v], at);
                }
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let weight = _mm512_set1_ps(*filters.add(r));
                    for (sum, &input) in acc_row.iter_mut().zip(&inputs) {
                        *sum = _mm512_fmadd_ps(weight, input, *sum);
                    }
                }
                filters = filters.add(TILE_CHANNELS);
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, &value) in acc_row.iter().enumerate() {
                let dst = self.outputs[v].wrapping_add(r * self.plane);
                _mm512_mask_storeu_ps(dst, self.writes[v], value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::tensor::hashed_values as values;

    /// x[image, c, y + dy, x + dx], zero outside the plane.
    fn tap_value(
        conv: &SameConv3x3,
        x: &[f32],
        (image, c, y, xx): (usize, usize, usize, usize),
        tap: usize,
    ) -> f64 {
        let (y, xx) = (
            y as isize + (tap / 3) as isize - 1,
            xx as isize + (tap % 3) as isize - 1,
        );
        if !(0..conv.height as isize).contains(&y) || !(0..conv.width as isize).contains(&xx) {
            return 0.0;
        }
        x[((image * conv.channels + c) * conv.height + y as usize) * conv.width + xx as usize]
            as f64
    }

    fn reference_forward(conv: &SameConv3x3, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for image in 0..conv.batch {
            for o in 0..conv.out_channels {
                for y in 0..conv.height {
                    for xx in 0..conv.width {
                        let mut sum = bias[o] as f64;
                        for c in 0..conv.channels {
                            for tap in 0..TAPS {
                                let w = weight[(o * conv.channels + c) * TAPS + tap] as f64;
                                sum += w * tap_value(conv, x, (image, c, y, xx), tap);
                            }
                        }
                        out.push(sum as f32);
                    }
                }
            }
        }
        out
    }

    fn reference_weight_gradient(conv: &SameConv3x3, x: &[f32], dout: &[f32]) -> Vec<f32> {
        let plane = conv.height * conv.width;
        let mut dweight = Vec::new();
        for o in 0..conv.out_channels {
            for c in 0..conv.channels {
                for tap in 0..TAPS {
                    let mut sum = 0f64;
                    for image in 0..conv.batch {
                        for p in 0..plane {
                            let d = dout[(image * conv.out_channels + o) * plane + p] as f64;
                            let at = (image, c, p / conv.width, p % conv.width);
                            sum += d * tap_value(conv, x, at, tap);
                        }
                    }
                    dweight.push(sum as f32);
                }
            }
        }
        dweight
    }

    fn assert_close(got: &[f32], expected: &[f32], what: &str) {
        assert_eq!(got.len(), expected.len(), "{what}");
        let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= 1e-5 * scale, "{what} [{i}]: {g} vs {e}");
        }
    }

    /// Shapes with runs across images (maps under 16 pixels), partial runs and tiles, partial
    /// channel blocks, one-pixel and one-column maps, several gradient groups and strips.
    const CASES: [SameConv3x3; 8] = [
        SameConv3x3 {
            batch: 3,
            channels: 5,
            out_channels: 7,
            height: 5,
            width: 6,
        },
        SameConv3x3 {
            batch: 2,
            channels: 16,
            out_channels: 13,
            height: 16,
            width: 16,
        },
        SameConv3x3 {
            batch: 11,
            channels: 3,
            out_channels: 70,
            height: 4,
            width: 4,
        },
        SameConv3x3 {
            batch: 2,
            channels: 1,
            out_channels: 1,
            height: 1,
            width: 1,
        },
        SameConv3x3 {
            batch: 3,
            channels: 8,
            out_channels: 6,
            height: 7,
            width: 1,
        },
        SameConv3x3 {
            batch: 9,
            channels: 7,
            out_channels: 9,
            height: 3,
            width: 9,
        },
        SameConv3x3 {
            batch: 1,
            channels: 12,
            out_channels: 130,
            height: 9,
            width: 13,
        },
        // Half strips: two groups of images, a chunk of channels and a partial one.
        SameConv3x3 {
            batch: 9,
            channels: 30,
            out_channels: 32,
            height: 6,
            width: 5,
        },
    ];

    #[test]
    fn forward_matches_a_direct_sum() {
        if !available() {
            return;
        }
        for conv in CASES {
            let plane = conv.height * conv.width;
            let x = values(conv.batch * conv.channels * plane, 1);
            let weight = values(conv.out_channels * conv.channels * TAPS, 2);
            let bias = values(conv.out_channels, 3);
            let got = conv.direct_forward(&x, &weight, &bias);
            assert_close(
                &got,
                &reference_forward(&conv, &x, &weight, &bias),
                &format!("{conv:?}"),
            );
        }
    }

    #[test]
    fn weight_gradient_matches_a_direct_sum() {
        if !available() {
            return;
        }
        for conv in CASES {
            let plane = conv.height * conv.width;
            let x = values(conv.batch * conv.channels * plane, 4);
            let dout = values(conv.batch * conv.out_channels * plane, 5);
            let got = conv.direct_weight_gradient(&x, &dout);
            let expected = reference_weight_gradient(&conv, &x, &dout);
            assert_close(&got, &expected, &format!("{conv:?}"));
        }
    }
}
