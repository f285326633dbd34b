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
//! caches. The products are f32 ([`SameConv3x3::forward`]) or bf16 pair products with f32 sums
//! ([`SameConv3x3::forward_bf16`], a bf16 model's convolutions where the CPU has AMX tiles).

use crate::ops::gemm_bf16::{self, PairProduct, ProductInput, STRIP};
use crate::ops::tensor::single_thread_product;
use candle_core::Result;
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
        let matrix = self.channels * tiles;
        self.transform_channels(x, block, 0..self.channels, (matrix, tiles), patches);
    }

    /// [`Self::transform_patches`] of `channels` only, `V_ξ[c][t]` written at `ξ strides.0 + (c
    /// - channels.start) strides.1 + t`.
    fn transform_channels(
        &self,
        x: &[f32],
        block: &[Segment],
        channels: std::ops::Range<usize>,
        (position_stride, channel_stride): (usize, usize),
        patches: &mut [f32],
    ) {
        let plane = self.height * self.width;
        let longest = block.iter().map(|s| s.len).max().unwrap_or(0);
        // Four input rows of a segment, two columns wider on each side than its tiles need.
        let span = 2 * longest + 2;
        let mut rows = vec![0f32; 4 * span];
        let mut vertical = vec![0f32; 4 * span];
        let (mut even, mut odd) = (vec![0f32; longest + 1], vec![0f32; longest + 1]);
        for channel in channels.clone() {
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
                    let at = |position: usize| {
                        position * position_stride
                            + (channel - channels.start) * channel_stride
                            + column
                    };
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

    /// The block's `V_ξ` as pair words, strip by strip (`[ξ][strip][pair][32]`), through
    /// [`Self::transform_channels`] one pair of channels at a time.
    fn pair_words(
        &self,
        x: &[f32],
        block: &[Segment],
        tiles: usize,
        cols: usize,
        patches: &mut Vec<f32>,
        words: &mut [u32],
    ) {
        let (channels, pairs) = (self.channels, self.channels.div_ceil(2));
        let strip_words = pairs * STRIP;
        patches.resize(2 * POSITIONS * tiles, 0.0);
        for p in 0..pairs {
            let pair_channels = 2 * p..(2 * p + 2).min(channels);
            let two = pair_channels.len() == 2;
            let strides = (tiles, POSITIONS * tiles);
            self.transform_channels(x, block, pair_channels, strides, patches);
            let (lo_rows, hi_rows) = patches.split_at(POSITIONS * tiles);
            for position in 0..POSITIONS {
                let lo = &lo_rows[position * tiles..][..tiles];
                let hi = two.then(|| &hi_rows[position * tiles..][..tiles]);
                let matrix = &mut words[position * pairs * cols..][..pairs * cols];
                for (strip, first) in (0..tiles).step_by(STRIP).enumerate() {
                    let n = (tiles - first).min(STRIP);
                    let dst = &mut matrix[strip * strip_words + p * STRIP..][..n];
                    let hi = hi.map(|hi| &hi[first..first + n]);
                    f32::interleave_rows(&lo[first..first + n], hi, dst);
                }
            }
        }
    }

    /// [`Self::pair_words`] of channel pair `pair` in AVX-512, sixteen tiles of a tile row a
    /// step: each of the four input rows is loaded as its tiles' four columns (even and odd
    /// lanes of two loads, and of the same two moved on by two columns), `B^T d B` is 32 vector
    /// additions, and each position's two channels go out as one vector of pair words.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512_BF16; `x` must hold the whole input and `words` the
    /// sixteen (pairs x `cols`) matrices.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pair_words_avx512(
        &self,
        x: &[f32],
        block: &[Segment],
        pair: usize,
        cols: usize,
        words: &mut [u32],
    ) {
        use std::arch::x86_64::*;
        let plane = self.height * self.width;
        let pairs = self.channels.div_ceil(2);
        let strip_words = pairs * STRIP;
        let matrix = pairs * cols;
        let has_hi = 2 * pair + 1 < self.channels;
        let mut column = 0;
        for segment in block {
            let image = segment.image * self.channels;
            let lo_plane = x.as_ptr().add((image + 2 * pair) * plane);
            let hi_plane = x.as_ptr().add((image + 2 * pair + has_hi as usize) * plane);
            let mut done = 0;
            while done < segment.len {
                let col = column + done;
                let n = (segment.len - done).min(16).min(STRIP - col % STRIP);
                let tile = segment.first + done;
                let lo = self.patch_vectors_avx512(lo_plane, segment.row, tile);
                let hi = match has_hi {
                    true => self.patch_vectors_avx512(hi_plane, segment.row, tile),
                    false => [_mm512_setzero_ps(); POSITIONS],
                };
                let mask: __mmask16 = ((1u32 << n) - 1) as u16;
                let offset = (col / STRIP) * strip_words + pair * STRIP + col % STRIP;
                for position in 0..POSITIONS {
                    let word = gemm_bf16::pair_words_of(lo[position], hi[position]);
                    let dst = words.as_mut_ptr().add(position * matrix + offset);
                    _mm512_mask_storeu_epi32(dst.cast(), mask, word);
                }
                done += n;
            }
            column += segment.len;
        }
    }

    /// `V = B^T d B` of tiles `first..first + 16` of tile row `row` of one channel's plane,
    /// position ξ in vector ξ, a tile a lane (taps outside the plane read zero).
    ///
    /// # Safety
    /// The CPU must have AVX512F; `plane` must hold `height x width` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn patch_vectors_avx512(
        &self,
        plane: *const f32,
        row: usize,
        first: usize,
    ) -> [std::arch::x86_64::__m512; POSITIONS] {
        use std::arch::x86_64::*;
        let (height, width) = (self.height as isize, self.width as isize);
        let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        // Input columns start - 1 .. start + 33 of the tiles' four columns.
        let start = 2 * first as isize - 1;
        let load = |line: *const f32, from: isize| -> __m512 {
            let valid_from = (-from).clamp(0, 16);
            let valid_to = (width - from).clamp(0, 16);
            if valid_to <= valid_from {
                return _mm512_setzero_ps();
            }
            let mask = (((1u32 << valid_to) - 1) & !((1u32 << valid_from) - 1)) as u16;
            _mm512_maskz_loadu_ps(mask, line.wrapping_offset(from))
        };
        // d[k][m]: input row k of the tiles' 4 x 4 patches, column m.
        let mut d = [[_mm512_setzero_ps(); 4]; 4];
        for (k, columns) in d.iter_mut().enumerate() {
            let y = 2 * row as isize - 1 + k as isize;
            if !(0..height).contains(&y) {
                continue;
            }
            let line = plane.wrapping_offset(y * width);
            let (a, b, c) = (
                load(line, start),
                load(line, start + 16),
                load(line, start + 32),
            );
            let (a2, b2) = (
                _mm512_castsi512_ps(_mm512_alignr_epi32::<2>(
                    _mm512_castps_si512(b),
                    _mm512_castps_si512(a),
                )),
                _mm512_castsi512_ps(_mm512_alignr_epi32::<2>(
                    _mm512_castps_si512(c),
                    _mm512_castps_si512(b),
                )),
            );
            columns[0] = _mm512_permutex2var_ps(a, even, b);
            columns[1] = _mm512_permutex2var_ps(a, odd, b);
            columns[2] = _mm512_permutex2var_ps(a2, even, b2);
            columns[3] = _mm512_permutex2var_ps(a2, odd, b2);
        }
        // B^T d down the columns, then (B^T d) B along the rows.
        let [d0, d1, d2, d3] = d;
        let rows = [
            std::array::from_fn::<_, 4, _>(|m| _mm512_sub_ps(d0[m], d2[m])),
            std::array::from_fn::<_, 4, _>(|m| _mm512_add_ps(d1[m], d2[m])),
            std::array::from_fn::<_, 4, _>(|m| _mm512_sub_ps(d2[m], d1[m])),
            std::array::from_fn::<_, 4, _>(|m| _mm512_sub_ps(d1[m], d3[m])),
        ];
        let mut v = [_mm512_setzero_ps(); POSITIONS];
        for (i, t) in rows.iter().enumerate() {
            v[4 * i] = _mm512_sub_ps(t[0], t[2]);
            v[4 * i + 1] = _mm512_add_ps(t[1], t[2]);
            v[4 * i + 2] = _mm512_sub_ps(t[2], t[1]);
            v[4 * i + 3] = _mm512_sub_ps(t[1], t[3]);
        }
        v
    }

    /// [`Self::transform_outputs`], in AVX-512 where the CPU has it.
    ///
    /// # Safety
    /// As [`Self::transform_outputs`].
    unsafe fn outputs(
        &self,
        products: &[f32],
        bias: &[f32],
        block: &[Segment],
        tiles: usize,
        out: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: as the caller's; the CPU has AVX512F.
            unsafe { self.transform_outputs_avx512(products, bias, block, tiles, out) };
            return;
        }
        // SAFETY: as the caller's.
        unsafe { self.transform_outputs(products, bias, block, tiles, out) }
    }

    /// [`Self::transform_outputs`] sixteen tiles a step: `A^T M A` in vector additions, the
    /// tiles' two output columns interleaved by two permutes into a row of 32 pixels.
    ///
    /// # Safety
    /// As [`Self::transform_outputs`]; the CPU must have AVX512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn transform_outputs_avx512(
        &self,
        products: &[f32],
        bias: &[f32],
        block: &[Segment],
        tiles: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let plane = self.height * self.width;
        let matrix = self.out_channels * tiles;
        let first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        let second_half =
            _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        let lanes = |count: usize| -> __mmask16 { ((1u32 << count.min(16)) - 1) as u16 };
        for (channel, &channel_bias) in bias.iter().enumerate().take(self.out_channels) {
            let b = _mm512_set1_ps(channel_bias);
            let mut column = 0;
            for segment in block {
                let base = (segment.image * self.out_channels + channel) * plane;
                let mut done = 0;
                while done < segment.len {
                    let n = (segment.len - done).min(16);
                    let at = products.as_ptr().add(channel * tiles + column + done);
                    let m = |position: usize| {
                        _mm512_maskz_loadu_ps(lanes(n), at.add(position * matrix))
                    };
                    // A^T M: two rows of four.
                    let columns: [[__m512; 4]; 4] =
                        std::array::from_fn(|j| [m(j), m(4 + j), m(8 + j), m(12 + j)]);
                    let s = [
                        columns.map(|[m0, m1, m2, _]| _mm512_add_ps(_mm512_add_ps(m0, m1), m2)),
                        columns.map(|[_, m1, m2, m3]| _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3)),
                    ];
                    let x0 = 2 * (segment.first + done);
                    let width = (2 * n).min(self.width - x0);
                    for (k, r) in s.iter().enumerate() {
                        let y = 2 * segment.row + k;
                        if y >= self.height {
                            continue;
                        }
                        let left = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), b);
                        let right =
                            _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]), b);
                        let target = out.add(base + y * self.width + x0);
                        let low = _mm512_permutex2var_ps(left, first_half, right);
                        let high = _mm512_permutex2var_ps(left, second_half, right);
                        _mm512_mask_storeu_ps(target, lanes(width), low);
                        if width > 16 {
                            _mm512_mask_storeu_ps(target.add(16), lanes(width - 16), high);
                        }
                    }
                    done += n;
                }
                column += segment.len;
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
                    unsafe { self.outputs(products, bias, block, tiles, target.0) };
                },
            );
        out
    }
}

impl SameConv3x3 {
    /// The transformed filters `U_ξ` as the left operands of bf16 pair products
    /// ([`gemm_bf16::PairProduct`]): sixteen (O x C / 2) matrices of pair words one after another,
    /// each in AMX tile order where the tiles read it. Made once, when a model loads: 16 words a
    /// filter pair where the direct kernel keeps 9.
    pub fn pack_filters_bf16(&self, weight: &[f32]) -> Vec<u32> {
        let filters = self.transform_filters(weight);
        let (channels, out_channels) = (self.channels, self.out_channels);
        let pairs = channels.div_ceil(2);
        let tiled = gemm_bf16::conv_kernel_tiled(out_channels, pairs);
        let mut words = vec![0u32; POSITIONS * out_channels * pairs];
        words
            .par_chunks_mut((out_channels * pairs).max(1))
            .enumerate()
            .for_each(|(position, matrix)| {
                for (o, row) in matrix.chunks_mut(pairs.max(1)).enumerate() {
                    let u = &filters[(o * POSITIONS + position) * channels..][..channels];
                    f32::pair_row(u, row);
                }
                if tiled {
                    let ordered = gemm_bf16::to_tile_order(matrix, pairs);
                    matrix.copy_from_slice(&ordered);
                }
            });
        words
    }

    /// [`Self::forward`] with the sixteen products `M_ξ = U_ξ V_ξ` in bf16 with f32 sums: the
    /// transformed patches are rounded to bf16 pair words, stored strip by strip so that the
    /// rows of an AMX tile of `V_ξ` lie in one aligned run, and `filters` are
    /// [`Self::pack_filters_bf16`]'s. Every tile of every product is then read from aligned
    /// rows, where the direct convolution's shifted inputs start off the cache lines for 8 of
    /// the 9 taps.
    pub fn forward_bf16(&self, x: &[f32], filters: &[u32], bias: &[f32]) -> Result<Vec<f32>> {
        let (channels, out_channels) = (self.channels, self.out_channels);
        let pairs = channels.div_ceil(2);
        if filters.len() != POSITIONS * out_channels * pairs
            || bias.len() != out_channels
            || x.len() != self.batch * channels * self.height * self.width
        {
            candle_core::bail!(
                "winograd-bf16: operands do not match {channels} -> {out_channels} channels"
            )
        }
        let tiled = gemm_bf16::conv_kernel_tiled(out_channels, pairs);
        let len = self.batch * out_channels * self.height * self.width;
        // SAFETY: the blocks' tiles cover every pixel of every output plane, and
        // `transform_outputs` writes each pixel of its tiles.
        let mut out = unsafe { crate::ops::tensor::unwritten_f32(len) };
        let target = OutputPointer(out.as_mut_ptr());
        self.blocks(rayon::current_num_threads())
            .par_iter()
            .try_for_each_init(
                || (Vec::new(), AlignedWords::default(), Vec::new()),
                |(patches, words, products): &mut (Vec<f32>, AlignedWords, Vec<f32>),
                 block|
                 -> Result<()> {
                    let tiles: usize = block.iter().map(|s| s.len).sum();
                    let cols = tiles.next_multiple_of(STRIP);
                    let words = words.aligned(POSITIONS * pairs * cols);
                    #[cfg(target_arch = "x86_64")]
                    if gemm_bf16::dot_available() {
                        for p in 0..pairs {
                            // SAFETY: the CPU has AVX512F and AVX512_BF16; `words` holds the
                            // sixteen (pairs x cols) matrices, `x` the whole input.
                            unsafe { self.pair_words_avx512(x, block, p, cols, words) };
                        }
                    } else {
                        self.pair_words(x, block, tiles, cols, patches, words);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    self.pair_words(x, block, tiles, cols, patches, words);
                    pad_strips(words, pairs, tiles, cols);
                    products.resize(POSITIONS * out_channels * cols, 0.0);
                    for position in 0..POSITIONS {
                        PairProduct {
                            rows: out_channels,
                            cols,
                            pairs,
                            lhs: &filters[position * out_channels * pairs..]
                                [..out_channels * pairs],
                            lhs_row: pairs,
                            lhs_tap: pairs,
                            rhs: &words[position * pairs * cols..][..pairs * cols],
                            rhs_row: STRIP,
                            rhs_strip: pairs * STRIP,
                            shifts: &[0],
                            lhs_tiled: tiled,
                        }
                        .run_here(&mut products[position * out_channels * cols..], cols)?;
                    }
                    let target = &target;
                    // SAFETY: blocks hold disjoint tiles, so no two threads write the same pixel;
                    // the products' rows are `cols` apart.
                    unsafe { self.outputs(products, bias, block, cols, target.0) };
                    Ok(())
                },
            )?;
        Ok(out)
    }
}

/// Zero pair words in the columns past the last tile of the last strip of each pair row.
fn pad_strips(words: &mut [u32], pairs: usize, tiles: usize, cols: usize) {
    if tiles == cols {
        return;
    }
    let (last_strip, used) = (tiles / STRIP, tiles % STRIP);
    for matrix in words.chunks_exact_mut(pairs * cols) {
        let strip = &mut matrix[last_strip * pairs * STRIP..][..pairs * STRIP];
        for row in strip.chunks_exact_mut(STRIP) {
            row[used..].fill(0);
        }
    }
}

/// Pair words whose first lies on a cache line (an AMX tile load of rows that straddle two
/// lines costs several times one that does not).
#[derive(Default)]
struct AlignedWords(Vec<u32>);

impl AlignedWords {
    const LINE_WORDS: usize = 16;

    /// `len` words starting on a 64-byte boundary, holding what they held before.
    fn aligned(&mut self, len: usize) -> &mut [u32] {
        self.0.resize(len + Self::LINE_WORDS, 0);
        let offset = self.0.as_ptr().align_offset(64).min(Self::LINE_WORDS);
        &mut self.0[offset..offset + len]
    }
}

/// A "same" 3x3 convolution of f32 activations by Winograd's F(2x2, 3x3) with bf16 products
/// (CPU, inference): `x.apply_op2_no_bwd(&filters, &WinogradBf16 { .. })` with `filters` the U32
/// tensor of [`SameConv3x3::pack_filters_bf16`]; the output f32.
pub struct WinogradBf16 {
    pub channels: usize,
    pub out_channels: usize,
    /// One per output channel (zeros for none).
    pub bias: Vec<f32>,
}

impl candle_core::CustomOp2 for WinogradBf16 {
    fn name(&self) -> &'static str {
        "winograd-bf16"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        w_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        if channels != self.channels {
            candle_core::bail!(
                "winograd-bf16: the input has {channels} channels, the filters expect {}",
                self.channels
            )
        }
        let conv = SameConv3x3 {
            batch,
            channels,
            out_channels: self.out_channels,
            height,
            width,
        };
        let x = crate::ops::tensor::contiguous_f32(x, x_layout, "winograd-bf16", "the input")?;
        let (CpuStorage::U32(w), Some((w0, w1))) = (w, w_layout.contiguous_offsets()) else {
            candle_core::bail!("winograd-bf16: the filters must be contiguous u32 words")
        };
        let y = conv.forward_bf16(x, &w[w0..w1], &self.bias)?;
        let shape = candle_core::Shape::from((batch, self.out_channels, height, width));
        Ok((CpuStorage::F32(y), shape))
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

    /// A convolution of these shapes with input, kernel and bias drawn from seeds `seed`,
    /// `seed + 1` and `seed + 2`.
    fn case(
        batch: usize,
        channels: usize,
        out_channels: usize,
        height: usize,
        width: usize,
        seed: u64,
    ) -> (SameConv3x3, Vec<f32>, Vec<f32>, Vec<f32>) {
        let conv = SameConv3x3 {
            batch,
            channels,
            out_channels,
            height,
            width,
        };
        let x = values(batch * channels * height * width, seed);
        let weight = values(out_channels * channels * 9, seed + 1);
        let bias = values(out_channels, seed + 2);
        (conv, x, weight, bias)
    }

    /// The largest |got - want|.
    fn worst_difference(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max)
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
            let (conv, x, weight, bias) = case(batch, channels, out_channels, height, width, 1);
            let got = conv.forward(&x, &weight, &bias);
            let want = direct(&conv, &x, &weight, &bias);
            let worst = worst_difference(&got, &want);
            assert!(worst < 1e-5, "{conv:?}: max |diff| {worst}");
        }
    }

    /// The bf16 products against the f64 sum: every output within a bound on rounding the
    /// transformed filters and patches to bf16 (values in [-1, 1]: a transformed patch value is at
    /// most 4 and a filter value 2.25 in magnitude, each rounded within 2^-9 of itself; the
    /// errors of C channels grow as sqrt C) and within 2% of the largest output, with and
    /// without AMX tile order (64 -> 64 channels is tiled where the CPU has AMX), odd channel
    /// counts, maps that split tile rows between blocks and blocks that end inside a strip.
    #[test]
    fn bf16_products_match_the_direct_convolution() {
        for (batch, channels, out_channels, height, width) in [
            (2, 64, 64, 12, 10),
            (1, 5, 7, 9, 11),
            (1, 32, 96, 3, 600),
            (3, 6, 4, 17, 33),
        ] {
            let (conv, x, weight, bias) = case(batch, channels, out_channels, height, width, 4);
            let filters = conv.pack_filters_bf16(&weight);
            let got = conv.forward_bf16(&x, &filters, &bias).unwrap();
            let want = direct(&conv, &x, &weight, &bias);
            let bound = 4.0 * 2.25 * 2.0 * 2f64.powi(-9) * (channels as f64).sqrt() * 4.0;
            let worst = worst_difference(&got, &want);
            assert!(
                worst < bound,
                "{conv:?}: max |diff| {worst} (bound {bound})"
            );
            let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
            assert!(
                worst < 0.02 * scale,
                "{conv:?}: max |diff| {worst} of {scale}"
            );
        }
    }

    /// A filter tensor of the wrong size is refused, not read past its end.
    #[test]
    fn bf16_products_refuse_mismatched_filters() {
        let conv = SameConv3x3 {
            batch: 1,
            channels: 4,
            out_channels: 4,
            height: 4,
            width: 4,
        };
        let x = values(64, 1);
        let error = conv.forward_bf16(&x, &[0; 10], &[0.0; 4]).unwrap_err();
        assert!(error.to_string().contains("winograd-bf16"), "{error}");
    }

    /// The AVX-512 transforms against the portable ones they stand in for, block by block:
    /// the same pair words (both round to nearest even) and the same outputs, on odd sizes,
    /// odd channel counts and blocks that split tile rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_transforms_match_the_portable_ones() {
        if !gemm_bf16::dot_available() {
            return;
        }
        for (batch, channels, out_channels, height, width) in
            [(2, 6, 5, 9, 13), (1, 3, 4, 7, 600), (3, 8, 3, 4, 4)]
        {
            let conv = SameConv3x3 {
                batch,
                channels,
                out_channels,
                height,
                width,
            };
            let pairs = channels.div_ceil(2);
            let x = values(batch * channels * height * width, 7);
            let bias = values(out_channels, 8);
            let len = batch * out_channels * height * width;
            let (mut portable_out, mut vector_out) = (vec![0f32; len], vec![0f32; len]);
            for block in conv.blocks(2) {
                let tiles: usize = block.iter().map(|s| s.len).sum();
                let cols = tiles.next_multiple_of(STRIP);
                let mut portable = vec![u32::MAX; POSITIONS * pairs * cols];
                let mut vector = portable.clone();
                conv.pair_words(&x, &block, tiles, cols, &mut Vec::new(), &mut portable);
                for p in 0..pairs {
                    // SAFETY: the CPU has AVX512F and AVX512_BF16; `vector` holds the matrices.
                    unsafe { conv.pair_words_avx512(&x, &block, p, cols, &mut vector) };
                }
                pad_strips(&mut portable, pairs, tiles, cols);
                pad_strips(&mut vector, pairs, tiles, cols);
                assert_eq!(portable, vector, "{conv:?}: pair words of a block");
                let products = values(POSITIONS * out_channels * cols, 9);
                // SAFETY: the outputs hold the whole (B, O, H, W) map; one thread writes.
                unsafe {
                    let portable = portable_out.as_mut_ptr();
                    conv.transform_outputs(&products, &bias, &block, cols, portable);
                    let vector = vector_out.as_mut_ptr();
                    conv.transform_outputs_avx512(&products, &bias, &block, cols, vector);
                }
            }
            assert_eq!(portable_out, vector_out, "{conv:?}: output transform");
        }
    }
}
