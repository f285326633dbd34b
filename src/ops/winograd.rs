//! 3x3 convolutions at stride 1 with one pixel of zero padding (the "same" convolutions of every
//! U-Net, VAE and pixel model here) by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016, eq. 8):
//!
//! `Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A`
//!
//! for each 2x2 output tile `Y`, its 4x4 input patch `d` and each 3x3 filter `g`. Summed over
//! input channels, the element-wise products become sixteen matrix products (one per position ξ
//! of the 4x4 transformed tile), `M_ξ = U_ξ V_ξ` with `U_ξ` (O x C) the transformed filters and
//! `V_ξ` (C x tiles) the transformed patches: 16 multiply-adds per tile and channel pair where
//! the direct convolution spends 36, so 2.25x fewer. The transforms are additions only.
//!
//! Tiles go in blocks of [`TILES_PER_BLOCK`] (whole tile rows, or pieces of one tile row),
//! one block per thread at a time with its sixteen products on that thread, so that a block's
//! transformed patches are made, multiplied and consumed while they are still in its core's
//! caches.

use crate::ops::tensor::single_thread_product;
use rayon::prelude::*;

/// Tiles per block: enough columns that the products amortise packing the transformed filters
/// (O x C per position), few enough that a block's patches stay near the core.
const TILES_PER_BLOCK: usize = 256;

/// Positions of the 4x4 transformed tile.
const POSITIONS: usize = 16;

/// The shapes of one convolution: input (batch, channels, height, width), output
/// (batch, out_channels, height, width), kernel (out_channels, channels, 3, 3).
#[derive(Debug, Clone, Copy)]
pub struct SameConv3x3 {
    pub batch: usize,
    pub channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
}

/// Tiles `first..first + len` of tile row `row` of image `image`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    image: usize,
    row: usize,
    first: usize,
    len: usize,
}

impl SameConv3x3 {
    fn tile_rows(&self) -> usize {
        self.height.div_ceil(2)
    }

    fn tile_columns(&self) -> usize {
        self.width.div_ceil(2)
    }

    fn tiles(&self) -> usize {
        self.batch * self.tile_rows() * self.tile_columns()
    }

    /// Whether F(2x2, 3x3) pays here. The transformed filters (16 floats a filter, made at every
    /// call) must be cheap beside the products they save: always so with 256 tiles or more;
    /// with fewer, only while they fit in a cache (SD 1.5's 1280-channel layers at 16x16, 128
    /// tiles and 105 MB of them, ran 1.25x slower than the direct product on a 2-core Xeon;
    /// its 640-channel ones at 16x16, 26 MB, 1.45x faster).
    pub fn pays(&self) -> bool {
        const CACHED_FILTER_BYTES: usize = 32 << 20;
        let filter_bytes = POSITIONS * self.out_channels * self.channels * 4;
        let tiles = self.tiles();
        self.channels >= 8
            && self.out_channels >= 8
            && tiles >= 64
            && (tiles >= 256 || filter_bytes <= CACHED_FILTER_BYTES)
    }

    /// The blocks of at most [`TILES_PER_BLOCK`] tiles, each as its segments; smaller where
    /// that would leave a thread without a block.
    fn blocks(&self, threads: usize) -> Vec<Vec<Segment>> {
        let per_block = TILES_PER_BLOCK
            .min(self.tiles().div_ceil(threads.max(1)))
            .max(1);
        let columns = self.tile_columns();
        let mut blocks = Vec::new();
        let mut block: Vec<Segment> = Vec::new();
        let mut filled = 0;
        for image in 0..self.batch {
            for row in 0..self.tile_rows() {
                let mut first = 0;
                while first < columns {
                    let len = (columns - first).min(per_block - filled);
                    block.push(Segment {
                        image,
                        row,
                        first,
                        len,
                    });
                    filled += len;
                    first += len;
                    if filled == per_block {
                        blocks.push(std::mem::take(&mut block));
                        filled = 0;
                    }
                }
            }
        }
        if !block.is_empty() {
            blocks.push(block);
        }
        blocks
    }

    /// `U_ξ = (G g G^T)_ξ` for every filter, laid out (O, 16, C): `U_ξ` is the (O x C) matrix
    /// at offset ξ C with row stride 16 C. G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
    /// [0, 0, 1]].
    fn transform_filters(&self, weight: &[f32]) -> Vec<f32> {
        // SAFETY: each output channel's row holds, for every input channel, the 16 positions
        // written below.
        let mut filters =
            unsafe { super::tensor::unwritten_f32(POSITIONS * self.out_channels * self.channels) };
        filters
            .par_chunks_mut(POSITIONS * self.channels)
            .zip(weight.par_chunks(9 * self.channels))
            .for_each(|(rows, kernels)| {
                for (channel, g) in kernels.chunks_exact(9).enumerate() {
                    // G g: 4 rows of 3.
                    let mut gg = [[0f32; 3]; 4];
                    for column in 0..3 {
                        let (a, b, c) = (g[column], g[3 + column], g[6 + column]);
                        gg[0][column] = a;
                        gg[1][column] = 0.5 * (a + b + c);
                        gg[2][column] = 0.5 * (a - b + c);
                        gg[3][column] = c;
                    }
                    // (G g) G^T: 4 x 4.
                    for (row, values) in gg.iter().enumerate() {
                        let [a, b, c] = *values;
                        let at = |column: usize| (4 * row + column) * self.channels + channel;
                        rows[at(0)] = a;
                        rows[at(1)] = 0.5 * (a + b + c);
                        rows[at(2)] = 0.5 * (a - b + c);
                        rows[at(3)] = c;
                    }
                }
            });
        filters
    }

    /// `V_ξ = (B^T d B)_ξ` of the block's patches into `patches`, sixteen (C x tiles) matrices,
    /// with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; taps outside the
    /// image read zero.
    fn transform_patches(&self, x: &[f32], block: &[Segment], tiles: usize, patches: &mut [f32]) {
        let plane = self.height * self.width;
        let longest = block.iter().map(|s| s.len).max().unwrap_or(0);
        // Four input rows of a segment, two columns wider on each side than its tiles need.
        let span = 2 * longest + 2;
        let mut rows = vec![0f32; 4 * span];
        let mut vertical = vec![0f32; 4 * span];
        let (mut even, mut odd) = (vec![0f32; longest + 1], vec![0f32; longest + 1]);
        let matrix = self.channels * tiles;
        for channel in 0..self.channels {
            let mut column = 0;
            for segment in block {
                let source = &x[(segment.image * self.channels + channel) * plane..][..plane];
                let width = 2 * segment.len + 2;
                // Input columns 2 first - 1 .. 2 (first + len) + 1.
                let first_x = 2 * segment.first as isize - 1;
                for (k, row) in rows.chunks_exact_mut(span).enumerate() {
                    let y = 2 * segment.row as isize - 1 + k as isize;
                    let row = &mut row[..width];
                    if !(0..self.height as isize).contains(&y) {
                        row.fill(0.0);
                        continue;
                    }
                    let line = &source[y as usize * self.width..][..self.width];
                    let start = first_x.max(0) as usize;
                    let end = ((first_x + width as isize) as usize).min(self.width);
                    let offset = (start as isize - first_x) as usize;
                    row[..offset].fill(0.0);
                    row[offset..offset + (end - start)].copy_from_slice(&line[start..end]);
                    row[offset + (end - start)..].fill(0.0);
                }
                // B^T d: combinations of the four rows.
                {
                    let (r0, rest) = rows.split_at(span);
                    let (r1, rest) = rest.split_at(span);
                    let (r2, r3) = rest.split_at(span);
                    let (v0, rest) = vertical.split_at_mut(span);
                    let (v1, rest) = rest.split_at_mut(span);
                    let (v2, v3) = rest.split_at_mut(span);
                    for i in 0..width {
                        v0[i] = r0[i] - r2[i];
                        v1[i] = r1[i] + r2[i];
                        v2[i] = r2[i] - r1[i];
                        v3[i] = r1[i] - r3[i];
                    }
                }
                // (B^T d) B along each row: tile j reads columns 2j .. 2j + 3.
                for (i, line) in vertical.chunks_exact(span).enumerate() {
                    for j in 0..=segment.len {
                        even[j] = line[2 * j];
                        odd[j] = line[2 * j + 1];
                    }
                    let at = |position: usize| position * matrix + channel * tiles + column;
                    let n = segment.len;
                    let (a, b) = (&even[..n], &odd[..n]);
                    let (c, d) = (&even[1..=n], &odd[1..=n]);
                    for (target, (a, c)) in
                        patches[at(4 * i)..][..n].iter_mut().zip(a.iter().zip(c))
                    {
                        *target = a - c;
                    }
                    for (target, (b, c)) in patches[at(4 * i + 1)..][..n]
                        .iter_mut()
                        .zip(b.iter().zip(c))
                    {
                        *target = b + c;
                    }
                    for (target, (b, c)) in patches[at(4 * i + 2)..][..n]
                        .iter_mut()
                        .zip(b.iter().zip(c))
                    {
                        *target = c - b;
                    }
                    for (target, (b, d)) in patches[at(4 * i + 3)..][..n]
                        .iter_mut()
                        .zip(b.iter().zip(d))
                    {
                        *target = b - d;
                    }
                }
                column += segment.len;
            }
        }
    }

    /// `Y = A^T M A + bias` of the block's tiles into the output, with
    /// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]; the last row or column of tiles of an odd-sized
    /// map writes only what lies inside.
    ///
    /// # Safety
    /// `out` must point at the (B, O, H, W) output, and no other thread may write the block's
    /// tiles meanwhile.
    unsafe fn transform_outputs(
        &self,
        products: &[f32],
        bias: &[f32],
        block: &[Segment],
        tiles: usize,
        out: *mut f32,
    ) {
        let plane = self.height * self.width;
        let matrix = self.out_channels * tiles;
        let longest = block.iter().map(|s| s.len).max().unwrap_or(0);
        let mut top = vec![0f32; 2 * longest];
        let mut bottom = vec![0f32; 2 * longest];
        let (mut s0, mut s1) = (vec![0f32; 4 * longest], vec![0f32; 4 * longest]);
        for (channel, channel_bias) in bias.iter().enumerate().take(self.out_channels) {
            let mut column = 0;
            for segment in block {
                let n = segment.len;
                let m = |position: usize| {
                    &products[position * matrix + channel * tiles + column..][..n]
                };
                // A^T M: two rows of four, per tile.
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (m(j), m(4 + j), m(8 + j), m(12 + j));
                    let (t0, t1) = (&mut s0[j * longest..][..n], &mut s1[j * longest..][..n]);
                    for t in 0..n {
                        t0[t] = m0[t] + m1[t] + m2[t];
                        t1[t] = m1[t] - m2[t] - m3[t];
                    }
                }
                // (A^T M) A, interleaved into output rows.
                for (sums, line) in [(&s0, &mut top), (&s1, &mut bottom)] {
                    let (c0, c1) = (&sums[..n], &sums[longest..][..n]);
                    let (c2, c3) = (&sums[2 * longest..][..n], &sums[3 * longest..][..n]);
                    for t in 0..n {
                        line[2 * t] = c0[t] + c1[t] + c2[t] + channel_bias;
                        line[2 * t + 1] = c1[t] - c2[t] - c3[t] + channel_bias;
                    }
                }
                let x0 = 2 * segment.first;
                let width = (2 * n).min(self.width - x0);
                let base = (segment.image * self.out_channels + channel) * plane;
                for (k, line) in [&top, &bottom].into_iter().enumerate() {
                    let y = 2 * segment.row + k;
                    if y < self.height {
                        // SAFETY: row y, columns x0..x0 + width of this plane lie inside the
                        // output and belong to this block's tiles.
                        let target = unsafe { out.add(base + y * self.width + x0) };
                        unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), target, width) };
                    }
                }
                column += n;
            }
        }
    }

    /// The convolution of `x` (B, C, H, W) with `weight` (O, C, 3, 3), plus `bias` (O).
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let filters = self.transform_filters(weight);
        let len = self.batch * self.out_channels * self.height * self.width;
        // SAFETY: the blocks' tiles cover every pixel of every output plane, and
        // `transform_outputs` writes each pixel of its tiles.
        let mut out = unsafe { crate::ops::tensor::unwritten_f32(len) };
        let target = OutputPointer(out.as_mut_ptr());
        self.blocks(rayon::current_num_threads())
            .par_iter()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(patches, products): &mut (Vec<f32>, Vec<f32>), block| {
                    let tiles: usize = block.iter().map(|s| s.len).sum();
                    patches.resize(POSITIONS * self.channels * tiles, 0.0);
                    products.resize(POSITIONS * self.out_channels * tiles, 0.0);
                    self.transform_patches(x, block, tiles, patches);
                    for position in 0..POSITIONS {
                        // SAFETY: U_ξ is O x C at row stride 16 C, V_ξ C x tiles and M_ξ O x tiles
                        // at row stride `tiles`, all inside their buffers.
                        unsafe {
                            single_thread_product(
                                (self.out_channels, tiles, self.channels),
                                &mut products[position * self.out_channels * tiles..],
                                tiles,
                                &filters[position * self.channels..],
                                (POSITIONS * self.channels, 1),
                                &patches[position * self.channels * tiles..],
                                (tiles, 1),
                            )
                        };
                    }
                    let target = &target;
                    // SAFETY: blocks hold disjoint tiles, so no two threads write the same pixel.
                    unsafe { self.transform_outputs(products, bias, block, tiles, target.0) };
                },
            );
        out
    }
}

/// The output buffer shared by the blocks' threads, each writing its own tiles.
struct OutputPointer(*mut f32);

// SAFETY: the threads write disjoint pixels through it (see `SameConv3x3::forward`).
unsafe impl Sync for OutputPointer {}
unsafe impl Send for OutputPointer {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition, in f64.
    fn direct(conv: &SameConv3x3, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f64> {
        let (h, w) = (conv.height, conv.width);
        let mut out = vec![0f64; conv.batch * conv.out_channels * h * w];
        for b in 0..conv.batch {
            for o in 0..conv.out_channels {
                for y in 0..h {
                    for xx in 0..w {
                        let mut sum = bias[o] as f64;
                        for c in 0..conv.channels {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy == 0 || ix == 0 || iy > h || ix > w {
                                        continue;
                                    }
                                    let value =
                                        x[((b * conv.channels + c) * h + iy - 1) * w + ix - 1];
                                    let tap = weight[((o * conv.channels + c) * 3 + ky) * 3 + kx];
                                    sum += value as f64 * tap as f64;
                                }
                            }
                        }
                        out[((b * conv.out_channels + o) * h + y) * w + xx] = sum;
                    }
                }
            }
        }
        out
    }

    fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Odd and even sizes, maps narrower than a block and wider than one (so blocks split tile
    /// rows), several images: every output within f32 rounding of the direct sum.
    #[test]
    fn matches_the_direct_convolution() {
        for (batch, channels, out_channels, height, width) in [
            (1, 3, 5, 7, 9),
            (2, 8, 4, 6, 6),
            (1, 4, 3, 5, 600),
            (3, 5, 6, 33, 17),
            (1, 2, 2, 1, 1),
        ] {
            let conv = SameConv3x3 {
                batch,
                channels,
                out_channels,
                height,
                width,
            };
            let x = values(batch * channels * height * width, 1);
            let weight = values(out_channels * channels * 9, 2);
            let bias = values(out_channels, 3);
            let got = conv.forward(&x, &weight, &bias);
            let want = direct(&conv, &x, &weight, &bias);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{conv:?}: max |diff| {worst}");
        }
    }
}
