//! bf16 matrix products with f32 accumulation for CPU inference, built on AVX512_BF16's pair dot
//! product `vdpbf16ps`: each of 16 f32 lanes adds `a[2i] b[2i] + a[2i+1] b[2i+1]`, 32
//! multiply-adds an instruction where an f32 FMA does 16. Both operands are therefore stored as
//! pairs along k, two bf16 in one u32 (the even k in the low half):
//! - the left matrix A (M x K) row-major, so a row's pair at k is one 32-bit broadcast;
//! - the right matrix B (K x N) as rows of pairs, `[k / 2][n]`, so 16 adjacent columns of a pair
//!   row are one 512-bit load.
//!
//! A product may sum several "taps": the same A row read at another offset and B read some columns
//! further on. That is a stride-1 convolution without im2col: for kernel tap (ky, kx), B is the
//! zero-padded input itself, shifted by `ky * padded_width + kx` pixels, so the input is packed
//! once (C x pixels) rather than expanded nine times (9C x pixels), and every output pixel of a
//! padded row is computed (the few past the row's end are dropped).
//!
//! Where the CPU has AMX tiles ([`super::amx`]) the same operands feed `tdpbf16ps` in 32 x 32
//! blocks, 256 times the work of an AVX-512 instruction; the edges go through `vdpbf16ps`.
//! Without AVX512_BF16 the same packed operands go through a scalar loop (tests, and any caller
//! that asks); the models instead widen to f32 there, whose kernels are faster than that loop.

use super::{amx, vector_math};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Output columns per micro-tile: two 16-lane registers.
pub(super) const STRIP: usize = 32;
/// Output rows per micro-tile: 12 rows x 2 registers = 24 accumulators, with the two B loads and
/// the broadcast A pair 27 of the 32 vector registers.
const TILE_ROWS: usize = 12;
/// k pairs per cache block: a strip's B block (128 pairs x 32 columns x 4 bytes = 16 KiB) and a
/// group's A blocks (4 tiles x 12 rows x 128 pairs x 4 bytes = 24 KiB) share the 48 KiB L1.
const PAIRS_PER_BLOCK: usize = 128;
/// Output rows and columns of an AMX block: 2 x 2 tiles of 16 x 16 sums.
const TILE_BLOCK: usize = 32;
/// Words of one AMX tile (16 rows of 16 pair words).
const TILE_SIZE_WORDS: usize = amx::TILE_ROWS * amx::TILE_WORDS;
/// k pairs per cache block of the AMX kernel. The sums go back to memory once a block, which at
/// AMX's speed costs more than re-reading A from L2: SD 1.5's 512 U-Net step took 3.81 s with
/// blocks of 256 pairs, 3.41-3.60 with 768, 3.31-3.39 with 1536 and 3.33-3.39 with 4096 (2-core
/// Xeon with AMX).
const TILE_PAIRS_PER_BLOCK: usize = 1536;

/// The kernels of a [`PairProduct`], slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kernel {
    Scalar,
    /// AVX512_BF16's `vdpbf16ps`.
    Dot,
    /// AMX tiles (`tdpbf16ps`).
    Tiles,
}

impl Kernel {
    /// The fastest kernel this CPU has (the tiles' edges go through the pair dot product).
    fn best() -> Self {
        if dot_available() && amx::tiles_available() {
            Kernel::Tiles
        } else if dot_available() {
            Kernel::Dot
        } else {
            Kernel::Scalar
        }
    }

    /// The rows a task's share is a multiple of.
    fn tile_rows(self) -> usize {
        match self {
            Kernel::Tiles => TILE_BLOCK,
            _ => TILE_ROWS,
        }
    }
}

/// Whether a loaded weight is one this module packs: bf16, on the CPU, not trained (a variable
/// keeps its own storage), on a CPU with the pair dot product.
pub fn packs_weight(weight: &Tensor) -> bool {
    weight.dtype() == DType::BF16
        && weight.device().is_cpu()
        && !weight.is_variable()
        && dot_available()
}

/// Whether this CPU has the pair dot product (AVX512F and AVX512_BF16), detected at run time.
pub fn dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An activation element the products read: bf16 as it is, f32 rounded to bf16 while packing
/// (the mixed mode of bf16 weights and f32 activations between the products).
pub trait ProductInput: Copy + Send + Sync + 'static {
    fn to_bf16(self) -> bf16;

    /// A row of values as pair words (`dst` holds half the row, rounded up; an odd row's last
    /// word pairs its last value with 0).
    fn pair_row(src: &[Self], dst: &mut [u32]) {
        let mut chunks = src.chunks_exact(2);
        for (d, two) in dst.iter_mut().zip(&mut chunks) {
            *d = pair(two[0].to_bf16(), two[1].to_bf16());
        }
        if let ([last], Some(d)) = (chunks.remainder(), dst.get_mut(src.len() / 2)) {
            *d = pair(last.to_bf16(), bf16::ZERO);
        }
    }

    /// `dst[i]` = the pair word (lo[i], hi[i]) of two rows of equal length (hi zero when
    /// absent): a row of B whose pairs run across two channels or two keys.
    fn interleave_rows(lo: &[Self], hi: Option<&[Self]>, dst: &mut [u32]) {
        interleave_rows_scalar(lo, hi, dst);
    }
}

/// [`ProductInput::interleave_rows`] one value at a time (the half crate's rounding).
fn interleave_rows_scalar<T: ProductInput>(lo: &[T], hi: Option<&[T]>, dst: &mut [u32]) {
    match hi {
        Some(hi) => {
            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(l.to_bf16(), h.to_bf16());
            }
        }
        None => {
            for (d, &l) in dst.iter_mut().zip(lo) {
                *d = pair(l.to_bf16(), bf16::ZERO);
            }
        }
    }
}

impl ProductInput for bf16 {
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        self
    }
}

impl ProductInput for f32 {
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }

    /// Two adjacent values are one pair word, so a row's pairs are its bf16 values in order:
    /// converted 32 at a time by `vcvtne2ps2bf16` where the CPU has it (the scalar rounding of
    /// the half crate showed as a tenth of a bf16 attention).
    fn pair_row(src: &[f32], dst: &mut [u32]) {
        let even = src.len() / 2 * 2;
        #[cfg(target_arch = "x86_64")]
        if dot_available() && dst.len() * 2 >= even {
            // SAFETY: the CPU has AVX512F and AVX512_BF16; `dst` holds `even` u16 values.
            unsafe { bf16_bits_avx512(&src[..even], dst.as_mut_ptr().cast::<u16>()) };
            if let ([last], Some(d)) = (&src[even..], dst.get_mut(even / 2)) {
                *d = pair(last.to_bf16(), bf16::ZERO);
            }
            return;
        }
        let mut chunks = src.chunks_exact(2);
        for (d, two) in dst.iter_mut().zip(&mut chunks) {
            *d = pair(two[0].to_bf16(), two[1].to_bf16());
        }
        if let ([last], Some(d)) = (chunks.remainder(), dst.get_mut(src.len() / 2)) {
            *d = pair(last.to_bf16(), bf16::ZERO);
        }
    }

    /// Rounded 16 at a time by `vcvtneps2bf16` where the CPU has it (the half crate's scalar
    /// rounding of a convolution's input and of attention's values was 2% of SD's bf16 step).
    fn interleave_rows(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
        let len = lo.len().min(dst.len());
        let hi = hi.map(|hi| &hi[..len]);
        #[cfg(target_arch = "x86_64")]
        if dot_available() {
            // SAFETY: the CPU has AVX512F and AVX512_BF16; every slice holds `len` values.
            unsafe { interleave_rows_avx512(&lo[..len], hi, &mut dst[..len]) };
            return;
        }
        interleave_rows_scalar(lo, hi, dst);
    }
}

/// [`ProductInput::interleave_rows`] of f32 rows in AVX-512.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; `lo`, `hi` and `dst` must have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn interleave_rows_avx512(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let len = dst.len();
    let mut i = 0;
    while i + 16 <= len {
        let high = hi.map_or(_mm512_setzero_ps(), |hi| {
            _mm512_loadu_ps(hi.as_ptr().add(i))
        });
        let both = pair_words_of(_mm512_loadu_ps(lo.as_ptr().add(i)), high);
        _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), both);
        i += 16;
    }
    interleave_rows_scalar(&lo[i..], hi.map(|hi| &hi[i..]), &mut dst[i..]);
}

/// Sixteen pair words of two vectors rounded to bf16 (nearest even), `lo` in the low halves.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn pair_words_of(
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
    let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
    _mm512_or_si512(
        _mm512_cvtepu16_epi32(lo),
        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
    )
}

/// `dst[i]` = the bf16 bits of `src[i]`, rounded to nearest even.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; `dst` must hold `src.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_bits_avx512(src: &[f32], dst: *mut u16) {
    use std::arch::x86_64::*;
    let mut chunks = src.chunks_exact(32);
    let mut at = dst;
    for chunk in &mut chunks {
        let low = _mm512_loadu_ps(chunk.as_ptr());
        let high = _mm512_loadu_ps(chunk.as_ptr().add(16));
        // The second operand fills the low 16 values.
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
        _mm512_storeu_si512(at.cast(), both);
        at = at.add(32);
    }
    for &value in chunks.remainder() {
        *at = half::bf16::from_f32(value).to_bits();
        at = at.add(1);
    }
}

/// An op's output element: the input's dtype, written from the f32 sums.
trait ProductOutput: ProductInput + Default {
    /// Whether this is f32, the sums' own type.
    const IS_F32: bool;
    fn from_sum(sum: f32) -> Self;
    fn storage(values: Vec<Self>) -> CpuStorage;
    /// The value as f32 (exact for both types).
    fn widen(self) -> f32;
    /// The values of a storage of this dtype.
    fn values(storage: &CpuStorage) -> Option<&[Self]>;
}

impl ProductOutput for bf16 {
    const IS_F32: bool = false;
    #[inline(always)]
    fn from_sum(sum: f32) -> Self {
        bf16::from_f32(sum)
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(values)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn values(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(values) => Some(values),
            _ => None,
        }
    }
}

impl ProductOutput for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    fn from_sum(sum: f32) -> Self {
        sum
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    fn values(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(values) => Some(values),
            _ => None,
        }
    }
}

/// The dtype a network with `weights` of this dtype on `device` keeps its activations in during
/// inference: f32 for bf16 weights on a CPU with the pair dot product, whose products round
/// their inputs to bf16 as they pack them and accumulate in f32, so that every other op (norms,
/// attention, activations, sums) runs in the f32 kernels; otherwise the weights' own.
pub fn activation_dtype(weights: DType, device: &candle_core::Device) -> DType {
    if weights == DType::BF16 && device.is_cpu() && dot_available() {
        DType::F32
    } else {
        weights
    }
}

/// The dtype to hold weights asked for in `requested` on `device`: bf16 on a CPU without the
/// pair dot product is held as f32, since every bf16 product there would widen its operands to
/// f32 first (candle's bf16 kernels do it element by element): f32's speed, not slower, at
/// f32's memory. Anything else as asked.
pub fn weight_dtype(requested: DType, device: &candle_core::Device) -> DType {
    if requested == DType::BF16 && device.is_cpu() && !dot_available() {
        DType::F32
    } else {
        requested
    }
}

/// Two bf16 values as one pair word, `lo` in the low half.
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

/// A row length (in 4-byte words) of at least `words`, a whole number of strips, chosen so that
/// rows over 4 KiB long do not start at the same offset within a page: the rows of a k block
/// would otherwise share one set of the L1 cache (whose set index is the address modulo 4 KiB)
/// and evict each other, which made 256x256 VAE layers run at half speed.
fn row_stride(words: usize) -> usize {
    const PAGE_WORDS: usize = 1024;
    let words = round_up(words, STRIP);
    if words < PAGE_WORDS {
        return words;
    }
    // Two cache lines past a page multiple.
    words + (PAGE_WORDS + STRIP - words % PAGE_WORDS) % PAGE_WORDS
}

/// `round_up(x, m)`.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `out[r][c] = sum over taps t, pairs p of A[r][t * lhs_tap + p] . B[p][c + shifts[t]]`, where
/// `.` is the pair dot product. Reads `rows x (taps x pairs)` pairs of A and, for every computed
/// column `c < cols` (a multiple of 32), B's columns `c + shift`.
#[derive(Clone, Copy)]
pub struct PairProduct<'a> {
    pub rows: usize,
    /// Output columns computed: a multiple of 32 (callers pad B and drop what they do not need).
    pub cols: usize,
    /// k pairs per tap.
    pub pairs: usize,
    pub lhs: &'a [u32],
    /// Pair words from one row of A to the next.
    pub lhs_row: usize,
    /// Pair words from one tap's block of a row of A to the next.
    pub lhs_tap: usize,
    pub rhs: &'a [u32],
    /// Pair words from one pair row of B to the next.
    pub rhs_row: usize,
    /// Pair words from one strip of B's columns (32) to the next: [`STRIP`] where B is row-major,
    /// `pairs * STRIP` where it is stored strip by strip ([`pack_linear_weight`]), so that an AMX
    /// tile of B is 16 rows 128 bytes apart rather than a whole row of B apart.
    pub rhs_strip: usize,
    /// The column offset into B of each tap.
    pub shifts: &'a [usize],
    /// A is stored in AMX tile order ([`tile_ordered`]) rather than row by row; only for the
    /// tile kernel, with whole blocks of rows and taps of whole tiles of pairs.
    pub lhs_tiled: bool,
}

impl PairProduct<'_> {
    /// Where column `col` (a strip's first) of B's pair rows starts.
    fn rhs_column(&self, col: usize) -> usize {
        col / STRIP * self.rhs_strip + col % STRIP
    }

    fn check(&self, out: &[f32], out_row: usize) -> Result<()> {
        let taps = self.shifts.len();
        let max_shift = self.shifts.iter().copied().max().unwrap_or(0);
        let lhs_needed = (self.rows.max(1) - 1) * self.lhs_row
            + taps.saturating_sub(1) * self.lhs_tap
            + self.pairs;
        let rhs_needed = (self.cols / STRIP).saturating_sub(1) * self.rhs_strip
            + self.pairs.saturating_sub(1) * self.rhs_row
            + STRIP
            + max_shift;
        let tile_order_fits = self.rows.is_multiple_of(TILE_BLOCK)
            && self.lhs_row.is_multiple_of(amx::TILE_WORDS)
            && self.lhs_tap.is_multiple_of(amx::TILE_WORDS)
            && self.pairs.is_multiple_of(amx::TILE_WORDS);
        if self.lhs_tiled && !tile_order_fits {
            candle_core::bail!(
                "bf16 product: a tile-ordered A needs whole blocks of rows and of pairs, not {} rows x {} pairs",
                self.rows,
                self.pairs
            )
        }
        if !self.cols.is_multiple_of(STRIP)
            || out_row < self.cols
            || out.len() < self.rows * out_row
            || self.lhs.len() < lhs_needed
            || (self.pairs > 0 && self.rhs.len() < rhs_needed)
        {
            candle_core::bail!(
                "bf16 product: operands too short for {} rows x {} columns x {} pairs x {taps} taps",
                self.rows,
                self.cols,
                self.pairs
            )
        }
        Ok(())
    }

    /// Computes the product into `out` (`rows` rows of `out_row` floats), rows split between
    /// rayon's threads in groups of whole micro-tiles.
    pub fn run(&self, out: &mut [f32], out_row: usize) -> Result<()> {
        self.run_on(out, out_row, Kernel::best(), None)
    }

    /// [`Self::run`], then `finish` on each rectangle of the output as soon as its sums are
    /// final, while they are still in cache (a bias or a residual added there, rather than in
    /// a pass over the whole output after it: 84 MB for a GEGLU projection at 512x512).
    pub(super) fn run_then(&self, out: &mut [f32], out_row: usize, finish: &Finish) -> Result<()> {
        self.run_on(out, out_row, Kernel::best(), Some(finish))
    }

    /// [`Self::run`] with `kernel` (one the CPU has; otherwise the best it has).
    fn run_on(
        &self,
        out: &mut [f32],
        out_row: usize,
        kernel: Kernel,
        finish: Option<&Finish>,
    ) -> Result<()> {
        self.check(out, out_row)?;
        let kernel = kernel.min(Kernel::best());
        if self.lhs_tiled && kernel != Kernel::Tiles {
            candle_core::bail!("bf16 product: a tile-ordered A is read by the AMX tiles only")
        }
        let tile_rows = kernel.tile_rows();
        let (tiles, strips) = (self.rows.div_ceil(tile_rows), self.cols / STRIP);
        let split = if self.rows >= 8 * self.cols {
            split_rows_first(tiles, strips)
        } else {
            split_tasks(tiles, strips)
        };
        let out = OutPtr(out.as_mut_ptr());
        (0..split.tasks()).into_par_iter().for_each(|task| {
            let (tiles, strips) = split.task(task);
            let rows = tiles.start * tile_rows..(tiles.end * tile_rows).min(self.rows);
            if !rows.is_empty() && !strips.is_empty() {
                // SAFETY: `check` bounds every index of the product; the tasks' blocks of rows
                // and columns are disjoint, so no two threads write one element.
                unsafe { self.run_block(rows, strips, out, out_row, kernel, finish) };
            }
        });
        Ok(())
    }

    /// [`Self::run`] on this thread alone (for callers whose tasks are the parallel part).
    pub fn run_here(&self, out: &mut [f32], out_row: usize) -> Result<()> {
        self.check(out, out_row)?;
        // SAFETY: `check` bounds every index; `out` is borrowed mutably for the whole call.
        unsafe {
            self.run_block(
                0..self.rows,
                0..self.cols / STRIP,
                OutPtr(out.as_mut_ptr()),
                out_row,
                Kernel::best(),
                None,
            )
        };
        Ok(())
    }

    /// Rows `rows` by strips `strips` of the product on this thread: k blocks outermost, so that
    /// each strip's B block comes from memory once per task and is reused from L1 by every tile.
    ///
    /// # Safety
    /// `out` must hold the block (rows of `out_row` floats) and nothing else may touch it.
    unsafe fn run_block(
        &self,
        rows: std::ops::Range<usize>,
        strips: std::ops::Range<usize>,
        out: OutPtr,
        out_row: usize,
        kernel: Kernel,
        finish: Option<&Finish>,
    ) {
        let columns = strips.start * STRIP..strips.end * STRIP;
        let total_pairs = self.shifts.len() * self.pairs;
        if total_pairs == 0 {
            for row in rows.clone() {
                let first = out.0.add(row * out_row + strips.start * STRIP);
                std::ptr::write_bytes(first, 0, strips.len() * STRIP);
            }
            if let Some(finish) = finish {
                finish(rows, columns, out, out_row);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Tiles {
            self.run_block_tiles(rows, strips, out, out_row, finish);
            return;
        }
        let use_dot = kernel == Kernel::Dot;
        let mut k0 = 0;
        while k0 < total_pairs {
            let k1 = (k0 + PAIRS_PER_BLOCK).min(total_pairs);
            for strip in strips.clone() {
                for row in rows.clone().step_by(TILE_ROWS) {
                    let tile = Tile {
                        row,
                        rows: (rows.end - row).min(TILE_ROWS),
                        col: strip * STRIP,
                        k: k0..k1,
                        accumulate: k0 > 0,
                    };
                    let tile_out = out.0.add(row * out_row);
                    #[cfg(target_arch = "x86_64")]
                    if use_dot {
                        // SAFETY: the CPU has AVX512F and AVX512_BF16 (`dot_available`); the
                        // caller vouches for the tile's indices.
                        dot_tile(self, &tile, tile_out, out_row);
                        continue;
                    }
                    let _ = use_dot;
                    scalar_tile(self, &tile, tile_out, out_row);
                }
            }
            k0 = k1;
        }
        if let Some(finish) = finish {
            finish(rows, columns, out, out_row);
        }
    }

    /// [`Self::run_block`] with AMX tiles: 32 x 32 blocks of the output (four sum tiles), k in
    /// blocks of [`TILE_PAIRS_PER_BLOCK`]; the rows past the last whole 32 go through the
    /// AVX512_BF16 micro-tiles.
    ///
    /// # Safety
    /// As [`Self::run_block`]; [`amx::tiles_available`] and [`dot_available`] must be true.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_block_tiles(
        &self,
        rows: std::ops::Range<usize>,
        strips: std::ops::Range<usize>,
        out: OutPtr,
        out_row: usize,
        finish: Option<&Finish>,
    ) {
        let columns = strips.start * STRIP..strips.end * STRIP;
        let total_pairs = self.shifts.len() * self.pairs;
        let last_k0 = (total_pairs - 1) / TILE_PAIRS_PER_BLOCK * TILE_PAIRS_PER_BLOCK;
        let whole_end = rows.start + rows.len() / TILE_BLOCK * TILE_BLOCK;
        let tiles = amx::Tiles::configure();
        let mut scratch = TailScratch::new();
        let mut edge = (rows.end - whole_end >= MIN_TILED_EDGE)
            .then(|| EdgeBlock::new(self, whole_end..rows.end, out_row));
        // The operand read once stays in cache while the other is swept: a task taller than it
        // is wide keeps each block of A rows (in L1) and sweeps the strips of B (in L2); a
        // wide one keeps each B strip and sweeps A. The other way, a GEGLU projection (8192 x
        // 160 pairs by 2560 columns) read its 5 MB of A from memory once per strip, at a
        // third of the tiles' rate.
        let rows_outer = rows.len() > strips.len() * STRIP;
        for k0 in (0..total_pairs).step_by(TILE_PAIRS_PER_BLOCK) {
            let k = k0..(k0 + TILE_PAIRS_PER_BLOCK).min(total_pairs);
            let whole_block = |row: usize, strip: usize| Tile {
                row,
                rows: TILE_BLOCK,
                col: strip * STRIP,
                k: k.clone(),
                accumulate: k0 > 0,
            };
            let finish = finish.filter(|_| k0 == last_k0);
            if rows_outer {
                for row in (rows.start..whole_end).step_by(TILE_BLOCK) {
                    for strip in strips.clone() {
                        let block_out = out.0.add(row * out_row);
                        let block = whole_block(row, strip);
                        amx_block(self, &block, block_out, out_row, &tiles, &mut scratch);
                    }
                    if let Some(finish) = finish {
                        finish(row..row + TILE_BLOCK, columns.clone(), out, out_row);
                    }
                }
            }
            for strip in strips.clone() {
                if !rows_outer {
                    for row in (rows.start..whole_end).step_by(TILE_BLOCK) {
                        let block_out = out.0.add(row * out_row);
                        let block = whole_block(row, strip);
                        amx_block(self, &block, block_out, out_row, &tiles, &mut scratch);
                    }
                    if let Some(finish) = finish {
                        let strip_columns = strip * STRIP..(strip + 1) * STRIP;
                        finish(rows.start..whole_end, strip_columns, out, out_row);
                    }
                }
                if let Some(edge) = &mut edge {
                    let block = whole_block(0, strip);
                    let sums = edge.sums.as_mut_ptr();
                    let product = edge.product(self);
                    amx_block(&product, &block, sums, out_row, &tiles, &mut scratch);
                    continue;
                }
                for row in (whole_end..rows.end).step_by(TILE_ROWS) {
                    let tile = Tile {
                        row,
                        rows: (rows.end - row).min(TILE_ROWS),
                        col: strip * STRIP,
                        k: k.clone(),
                        accumulate: k0 > 0,
                    };
                    // SAFETY: the tiles are chosen only beside AVX512_BF16 (`Kernel::best`).
                    dot_tile(self, &tile, out.0.add(row * out_row), out_row);
                }
            }
        }
        if let Some(edge) = edge {
            for (r, row) in (whole_end..rows.end).enumerate() {
                let source = &edge.sums[r * out_row..][columns.clone()];
                let first = out.0.add(row * out_row + columns.start);
                std::ptr::copy_nonoverlapping(source.as_ptr(), first, columns.len());
            }
        }
        if let Some(finish) = finish.filter(|_| whole_end < rows.end) {
            finish(whole_end..rows.end, columns, out, out_row);
        }
    }

    /// The pair words of tap-and-pair index range `k` of row `row`'s A and of B's rows, each as
    /// (A offset, B offset) for column 0 of the tile.
    fn segments(
        &self,
        row: usize,
        k: std::ops::Range<usize>,
    ) -> impl Iterator<Item = Segment> + '_ {
        let pairs = self.pairs.max(1);
        let first_tap = k.start / pairs;
        let last_tap = k.end.div_ceil(pairs);
        (first_tap..last_tap).filter_map(move |tap| {
            let start = k.start.max(tap * pairs) - tap * pairs;
            let end = k.end.min((tap + 1) * pairs) - tap * pairs;
            (end > start && self.pairs > 0).then(|| Segment {
                lhs: row * self.lhs_row + tap * self.lhs_tap + start,
                rhs: start * self.rhs_row + self.shifts[tap],
                pairs: end - start,
            })
        })
    }
}

/// [`split_tasks`] for a product many times taller than it is wide: each task takes a block of
/// rows and every strip, so that A, the larger operand, is read once in all, and B by each
/// task (split by columns, a linear layer of 8192 tokens by 320 outputs read its 5 MB of A
/// five times: 548 -> 692 GFLOP/s). Only a few times taller (a GEGLU projection of 8192 by
/// 2560), the strips of a task do not stay in cache and the columns split runs faster.
fn split_rows_first(tiles: usize, strips: usize) -> TaskSplit {
    let row_tasks = (4 * rayon::current_num_threads()).clamp(1, tiles.max(1));
    TaskSplit {
        tiles,
        strips,
        column_tasks: 1,
        row_tasks,
        tiles_per_task: tiles.div_ceil(row_tasks),
        strips_per_task: strips.max(1),
    }
}

/// A product's micro-tiles (of rows) and strips (of columns) as rayon tasks: blocks of whole
/// tiles by runs of strips, about four a thread, split by columns first so that a task's strips
/// are reused by all its tiles (a layer of few output channels over a large map would otherwise
/// give each task one tile and read B from memory once a tile).
#[derive(Clone, Copy)]
pub(super) struct TaskSplit {
    tiles: usize,
    strips: usize,
    column_tasks: usize,
    row_tasks: usize,
    tiles_per_task: usize,
    strips_per_task: usize,
}

/// [`TaskSplit`] of `tiles` by `strips` over rayon's threads.
pub(super) fn split_tasks(tiles: usize, strips: usize) -> TaskSplit {
    let target = 4 * rayon::current_num_threads();
    // As many strips in every column task (10 strips over 8 tasks would be 5 tasks of 2).
    let strips_per_task = strips.div_ceil(target).max(1);
    let column_tasks = strips.div_ceil(strips_per_task).max(1);
    let row_tasks = target.div_ceil(column_tasks).clamp(1, tiles.max(1));
    TaskSplit {
        tiles,
        strips,
        column_tasks,
        row_tasks,
        tiles_per_task: tiles.div_ceil(row_tasks),
        strips_per_task,
    }
}

impl TaskSplit {
    pub(super) fn tasks(&self) -> usize {
        self.row_tasks * self.column_tasks
    }

    /// Task `task`'s tiles and strips (either may be empty).
    pub(super) fn task(&self, task: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (row_task, column_task) = (task / self.column_tasks, task % self.column_tasks);
        let tiles = (row_task * self.tiles_per_task).min(self.tiles)
            ..((row_task + 1) * self.tiles_per_task).min(self.tiles);
        let strips = (column_task * self.strips_per_task).min(self.strips)
            ..((column_task + 1) * self.strips_per_task).min(self.strips);
        (tiles, strips)
    }
}

/// What a product's caller does to a rectangle of the output (rows, columns; the output and its
/// row length) whose sums are final: the task that computed it calls it, once per element.
pub(super) type Finish<'a> =
    dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>, OutPtr, usize) + Sync + 'a;

/// The output of a product, shared by the tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub *mut f32);

// SAFETY: the tasks of one product write disjoint elements (see `PairProduct::run_on`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One micro-tile's work: rows `row..row + rows`, columns `col..col + 32`, the k pairs `k` of
/// the flattened (tap, pair) order.
struct Tile {
    row: usize,
    rows: usize,
    col: usize,
    k: std::ops::Range<usize>,
    accumulate: bool,
}

/// A run of k pairs within one tap.
struct Segment {
    lhs: usize,
    rhs: usize,
    pairs: usize,
}

#[inline(always)]
fn pair_dot(a: u32, b: u32) -> f32 {
    let lo = |w: u32| bf16::from_bits(w as u16).to_f32();
    let hi = |w: u32| bf16::from_bits((w >> 16) as u16).to_f32();
    lo(a) * lo(b) + hi(a) * hi(b)
}

/// # Safety
/// `out` (rows of `out_row` floats from the tile's first row) must hold the tile.
unsafe fn scalar_tile(p: &PairProduct, tile: &Tile, out: *mut f32, out_row: usize) {
    for r in 0..tile.rows {
        let mut sums = [0f32; STRIP];
        for segment in p.segments(tile.row + r, tile.k.clone()) {
            for i in 0..segment.pairs {
                let a = p.lhs[segment.lhs + i];
                let b_row = segment.rhs + i * p.rhs_row + p.rhs_column(tile.col);
                for (c, sum) in sums.iter_mut().enumerate() {
                    *sum += pair_dot(a, p.rhs[b_row + c]);
                }
            }
        }
        let dst = std::slice::from_raw_parts_mut(out.add(r * out_row + tile.col), STRIP);
        for (d, s) in dst.iter_mut().zip(sums) {
            *d = if tile.accumulate { *d + s } else { s };
        }
    }
}

/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; every index the tile names must be in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_tile(p: &PairProduct, tile: &Tile, out: *mut f32, out_row: usize) {
    macro_rules! rows {
        ($($n:literal)*) => {
            match tile.rows {
                $($n => dot_tile_rows::<$n>(p, tile, out, out_row),)*
                _ => unreachable!("a tile has 1 to {TILE_ROWS} rows"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// # Safety
/// As [`dot_tile`], with `R == tile.rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn dot_tile_rows<const R: usize>(
    p: &PairProduct,
    tile: &Tile,
    out: *mut f32,
    out_row: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // The rows' segments run in step: every row of A has the same tap layout.
    for segment in p.segments(tile.row, tile.k.clone()) {
        let mut a = p.lhs.as_ptr().add(segment.lhs);
        let mut b = p.rhs.as_ptr().add(segment.rhs + p.rhs_column(tile.col));
        for _ in 0..segment.pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let a_pair = *a.add(r * p.lhs_row) as i32;
                let a_pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(a_pair));
                acc_row[0] = _mm512_dpbf16_ps(acc_row[0], a_pair, b0);
                acc_row[1] = _mm512_dpbf16_ps(acc_row[1], a_pair, b1);
            }
            a = a.add(1);
            b = b.add(p.rhs_row);
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let dst = out.add(r * out_row + tile.col);
        for (half, &value) in acc_row.iter().enumerate() {
            let dst = dst.add(16 * half);
            let value = if tile.accumulate {
                _mm512_add_ps(_mm512_loadu_ps(dst), value)
            } else {
                value
            };
            _mm512_storeu_ps(dst, value);
        }
    }
}

/// Rows past the last whole block from which they go through one more AMX block (A's rows
/// copied beside zero rows, the sums kept aside) rather than the AVX512_BF16 micro-tiles: with
/// half a block or more of real rows the tiles still do the work several times faster (the CLIP
/// text encoder's 154 rows end in 26 such rows).
#[cfg(target_arch = "x86_64")]
const MIN_TILED_EDGE: usize = TILE_BLOCK / 2;

/// The last rows of a product, fewer than a block, as a whole block: A's rows followed by zero
/// rows, and sums of a block's rows whose real ones are copied out at the end.
#[cfg(target_arch = "x86_64")]
struct EdgeBlock {
    lhs: Vec<u32>,
    sums: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl EdgeBlock {
    fn new(p: &PairProduct, rows: std::ops::Range<usize>, out_row: usize) -> Self {
        let mut lhs = vec![0u32; TILE_BLOCK * p.lhs_row];
        for (r, row) in rows.enumerate() {
            // The product's last row may stop at its last pair rather than at a whole row.
            let source = &p.lhs[row * p.lhs_row..p.lhs.len().min((row + 1) * p.lhs_row)];
            lhs[r * p.lhs_row..][..source.len()].copy_from_slice(source);
        }
        Self {
            lhs,
            sums: vec![0f32; TILE_BLOCK * out_row],
        }
    }

    /// The product over this block's rows of A (as its rows 0-31) and the same B.
    fn product<'a>(&'a self, p: &PairProduct<'a>) -> PairProduct<'a> {
        PairProduct {
            rows: TILE_BLOCK,
            lhs: &self.lhs,
            ..*p
        }
    }
}

/// Zero-padded copies of the last k pairs of a segment when they do not fill a tile (a tile
/// reads 16 pairs; the words past them may lie past an operand's end), for the A rows and B
/// columns of one AMX block.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TailScratch {
    lhs: [u32; TILE_BLOCK * amx::TILE_WORDS],
    rhs: [u32; amx::TILE_ROWS * TILE_BLOCK],
}

#[cfg(target_arch = "x86_64")]
impl TailScratch {
    fn new() -> Box<Self> {
        Box::new(Self {
            lhs: [0; TILE_BLOCK * amx::TILE_WORDS],
            rhs: [0; amx::TILE_ROWS * TILE_BLOCK],
        })
    }
}

/// One 32 x 32 block of the product over the k pairs `block.k` with AMX tiles: sums in tiles
/// 0-3 (rows 0-15 and 16-31 by columns 0-15 and 16-31), A's two row halves in tiles 4-5, B's two
/// column halves in 6-7, 16 pairs a step, read where they lie.
///
/// # Safety
/// `_tiles` configured on this thread; `out` (rows of `out_row` floats from the block's first
/// row) must hold the block; every index the block names must be in bounds.
// Inlined into its loops: called out of line it ran the U-Net's bf16 step 5% slower.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn amx_block(
    p: &PairProduct,
    block: &Tile,
    out: *mut f32,
    out_row: usize,
    _tiles: &amx::Tiles,
    scratch: &mut TailScratch,
) {
    use amx::{amx_dot_bf16, amx_load, amx_store, amx_zero};
    const STEP: usize = amx::TILE_WORDS;
    let half = amx::TILE_ROWS;
    let sums = out.add(block.col);
    let sums_low = sums.add(half * out_row);
    let sum_stride = out_row * 4;
    if block.accumulate {
        amx_load!(0, sums, sum_stride);
        amx_load!(1, sums.add(half), sum_stride);
        amx_load!(2, sums_low, sum_stride);
        amx_load!(3, sums_low.add(half), sum_stride);
    } else {
        amx_zero!(0);
        amx_zero!(1);
        amx_zero!(2);
        amx_zero!(3);
    }
    let rhs_stride = p.rhs_row * 4;
    // Row-major A: a tile's rows a row of A apart, the next 16 pairs 16 words on. Tile order:
    // each tile one 1 KiB run, the next 16 pairs one tile (256 words) on.
    let (lhs_stride, pair_step) = if p.lhs_tiled {
        (STEP * 4, TILE_SIZE_WORDS / STEP)
    } else {
        (p.lhs_row * 4, 1)
    };
    for segment in p.segments(block.row, block.k.clone()) {
        let (a, a_low) = if p.lhs_tiled {
            let k = segment.lhs - block.row * p.lhs_row;
            let tile = |row: usize| tile_ordered(row, k, p.lhs_row);
            (
                p.lhs.as_ptr().add(tile(block.row)),
                p.lhs.as_ptr().add(tile(block.row + half)),
            )
        } else {
            let a = p.lhs.as_ptr().add(segment.lhs);
            (a, a.add(half * p.lhs_row))
        };
        let b = p.rhs.as_ptr().add(segment.rhs + p.rhs_column(block.col));
        let whole = segment.pairs / STEP * STEP;
        for i in (0..whole).step_by(STEP) {
            amx_load!(4, a.add(i * pair_step), lhs_stride);
            amx_load!(5, a_low.add(i * pair_step), lhs_stride);
            amx_load!(6, b.add(i * p.rhs_row), rhs_stride);
            amx_load!(7, b.add(i * p.rhs_row + half), rhs_stride);
            amx_dot_bf16!(0, 4, 6);
            amx_dot_bf16!(1, 4, 7);
            amx_dot_bf16!(2, 5, 6);
            amx_dot_bf16!(3, 5, 7);
        }
        let tail = segment.pairs - whole;
        // A tile-ordered A comes in whole tiles of pairs (`PairProduct::check`).
        if tail > 0 && !p.lhs_tiled {
            for (r, dst) in scratch.lhs.chunks_exact_mut(STEP).enumerate() {
                let src = std::slice::from_raw_parts(a.add(r * p.lhs_row + whole), tail);
                dst[..tail].copy_from_slice(src);
                dst[tail..].fill(0);
            }
            for (q, dst) in scratch.rhs.chunks_exact_mut(TILE_BLOCK).enumerate() {
                if q < tail {
                    let src = b.add((whole + q) * p.rhs_row);
                    dst.copy_from_slice(std::slice::from_raw_parts(src, TILE_BLOCK));
                } else {
                    dst.fill(0);
                }
            }
            let (lhs, rhs) = (scratch.lhs.as_ptr(), scratch.rhs.as_ptr());
            amx_load!(4, lhs, STEP * 4);
            amx_load!(5, lhs.add(half * STEP), STEP * 4);
            amx_load!(6, rhs, TILE_BLOCK * 4);
            amx_load!(7, rhs.add(half), TILE_BLOCK * 4);
            amx_dot_bf16!(0, 4, 6);
            amx_dot_bf16!(1, 4, 7);
            amx_dot_bf16!(2, 5, 6);
            amx_dot_bf16!(3, 5, 7);
        }
    }
    amx_store!(0, sums, sum_stride);
    amx_store!(1, sums.add(half), sum_stride);
    amx_store!(2, sums_low, sum_stride);
    amx_store!(3, sums_low.add(half), sum_stride);
}

/// Rows of bf16 values (`rows x len`, row-major) as pair words, each row padded with a zero to
/// an even length.
fn pair_rows<T: ProductInput>(values: &[T], rows: usize, len: usize) -> Vec<u32> {
    let pairs = len.div_ceil(2);
    // SAFETY: `pair_row` writes every word of its row (an odd row's last one paired with 0).
    let mut words = unsafe { super::tensor::unwritten(rows * pairs, u32::MAX) };
    words
        .par_chunks_mut(pairs.max(1))
        .zip(values.par_chunks(len.max(1)))
        .for_each(|(dst, src)| T::pair_row(src, dst));
    words
}

/// A residual's values in the activations' dtype `T`, contiguous.
fn residual_values<'a, T: ProductOutput>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("linear-bf16: the residual must be on the CPU")
    };
    let Some(values) = T::values(cpu) else {
        candle_core::bail!("linear-bf16: the residual must have the input's dtype")
    };
    contiguous(values, layout, "linear-bf16", "the residual")
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Binds `$values` to the activations `$x` as a bf16 or an f32 slice, the two dtypes the
/// products take, and evaluates `$body` with it.
macro_rules! with_activations {
    ($op:expr, $x:expr, $layout:expr, |$values:ident| $body:expr) => {
        match $x {
            CpuStorage::BF16(data) => {
                let $values = contiguous(data, $layout, $op, "the input")?;
                $body
            }
            CpuStorage::F32(data) => {
                let $values = contiguous(data, $layout, $op, "the input")?;
                $body
            }
            _ => candle_core::bail!("{}: the input must be bf16 or f32", $op),
        }
    };
}

/// The bf16 values of a float tensor, flattened.
fn bf16_values(t: &Tensor) -> Result<Vec<bf16>> {
    t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()
}

/// A linear layer's weight `W` (N, K) as the right-hand operand of `x W^T`: pair rows of `W^T`
/// stored strip by strip (`[strip][pair][32]`: word `[j / 32][p][j % 32]` is (W[j][2p],
/// W[j][2p + 1])), so that the 16 pair rows of an AMX tile lie 128 bytes apart, one 2 KiB run,
/// where a row-major B put them a row of B (1.3-10 KiB) apart (512 x 1280 -> 1280: 1532 -> 1808
/// GFLOP/s on two cores).
/// A U32 tensor of (K / 2 rounded up) x (N rounded up to a [`row_stride`]) words, zero where
/// padded. Packed once when a model loads, in place of the weight (the same bytes as bf16).
pub fn pack_linear_weight(weight: &Tensor) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let (pairs, cols) = (k.div_ceil(2), row_stride(n));
    let by_row = pair_rows(&bf16_values(weight)?, n, k);
    let mut words = vec![0u32; pairs * cols];
    for (strip, block) in words.chunks_mut((pairs * STRIP).max(1)).enumerate() {
        for (p, row) in block.chunks_mut(STRIP).enumerate() {
            for (c, word) in row.iter_mut().enumerate() {
                let j = strip * STRIP + c;
                if j < n {
                    *word = by_row[j * pairs + p];
                }
            }
        }
    }
    Tensor::from_vec(words, (pairs, cols), weight.device())
}

/// `M^T` of a row-major (rows x len) matrix as pair rows: word `[p][j]` is (M[j][2p],
/// M[j][2p + 1]), rows `stride` words long, zero where padded.
fn transposed_pair_rows<T: ProductInput>(
    values: &[T],
    rows: usize,
    len: usize,
    stride: usize,
) -> Vec<u32> {
    let pairs = len.div_ceil(2);
    let by_row = pair_rows(values, rows, len);
    let mut words = vec![0u32; pairs * stride];
    for (p, row) in words.chunks_mut(stride.max(1)).enumerate() {
        for (j, word) in row[..rows].iter_mut().enumerate() {
            *word = by_row[j * pairs + p];
        }
    }
    words
}

/// A row-major (rows x cols) matrix as pair rows along its rows: word `[p][c]` is (M[2p][c],
/// M[2p + 1][c]), rows `stride` words long, zero where padded.
fn interleaved_pair_rows(values: &[f32], rows: usize, cols: usize, stride: usize) -> Vec<u32> {
    let pairs = rows.div_ceil(2);
    let mut words = vec![0u32; pairs * stride];
    for (p, dst) in words.chunks_mut(stride.max(1)).enumerate() {
        let lo = &values[2 * p * cols..][..cols];
        let hi = values.get((2 * p + 1) * cols..(2 * p + 2) * cols);
        f32::interleave_rows(lo, hi, &mut dst[..cols]);
    }
    words
}

/// The keys and values of attention heads packed as right-hand operands, so that softmax(Q K^T
/// scale) V runs through the pair dot product one block of query rows at a time: per head,
/// `K^T` as pair rows along the head width and `V` as pair rows along the keys.
pub struct PackedHeads {
    keys: Vec<Vec<u32>>,
    values: Vec<Vec<u32>>,
    /// The queries' and keys' width, the keys' count, the values' width.
    dims: (usize, usize, usize),
    /// The pair rows of `K^T` and of `V` the products run over (see [`contraction_pairs`]).
    key_pairs: usize,
    value_pairs: usize,
}

/// One thread's scratch space for [`PackedHeads`], kept from block to block.
#[derive(Default)]
pub struct HeadScratch {
    lhs: Vec<u32>,
    product: Vec<f32>,
}

/// The pairs a product over `len` values runs over: on AMX tiles a whole number of tiles, the
/// padding zero in both operands, so that no tail of fewer than 16 pairs is copied through
/// scratch at every block (SD's head width of 40 is 20 pairs: one tile and a tail of 4); the
/// other kernels step pair by pair and take them as they are.
fn contraction_pairs(len: usize) -> usize {
    let pairs = len.div_ceil(2);
    if Kernel::best() == Kernel::Tiles {
        round_up(pairs, amx::TILE_WORDS)
    } else {
        pairs
    }
}

/// `dst` = `src` as pair words, zero past them (a row of a product's left operand).
fn padded_pair_row(src: &[f32], dst: &mut [u32]) {
    let pairs = src.len().div_ceil(2);
    f32::pair_row(src, &mut dst[..pairs]);
    dst[pairs..].fill(0);
}

impl PackedHeads {
    /// `k` (heads, M, d) and `v` (heads, M, dv), contiguous.
    pub fn new(k: &[f32], v: &[f32], heads: usize, m: usize, d: usize, dv: usize) -> Self {
        let (key_pairs, value_pairs) = (contraction_pairs(d), contraction_pairs(m));
        let (keys, values) = (0..heads)
            .into_par_iter()
            .map(|head| {
                let k_head = &k[head * m * d..][..m * d];
                let v_head = &v[head * m * dv..][..m * dv];
                let mut keys = transposed_pair_rows(k_head, m, d, row_stride(m));
                keys.resize(key_pairs * row_stride(m), 0);
                let mut values = interleaved_pair_rows(v_head, m, dv, row_stride(dv));
                values.resize(value_pairs * row_stride(dv), 0);
                (keys, values)
            })
            .unzip();
        Self {
            keys,
            values,
            dims: (d, m, dv),
            key_pairs,
            value_pairs,
        }
    }

    /// The length of a row of [`Self::scores`]: the keys' count, padded (padding scores 0).
    pub fn score_row(&self) -> usize {
        row_stride(self.dims.1)
    }

    /// `scores` (rows x [`Self::score_row`]) = `q_block` (rows x d) K^T of head `head`.
    pub fn scores(
        &self,
        head: usize,
        q_block: &[f32],
        scratch: &mut HeadScratch,
        scores: &mut Vec<f32>,
    ) -> Result<()> {
        let (d, m, _) = self.dims;
        let pairs = self.key_pairs;
        let rows = q_block.len() / d.max(1);
        scratch.lhs.resize(rows * pairs, 0);
        for (src, dst) in q_block
            .chunks(d.max(1))
            .zip(scratch.lhs.chunks_mut(pairs.max(1)))
        {
            padded_pair_row(src, dst);
        }
        scores.resize(rows * self.score_row(), 0.0);
        PairProduct {
            rows,
            cols: round_up(m, STRIP),
            pairs,
            lhs: &scratch.lhs,
            lhs_row: pairs,
            lhs_tap: 0,
            rhs: &self.keys[head],
            rhs_row: self.score_row(),
            rhs_strip: STRIP,
            shifts: &[0],
            lhs_tiled: false,
        }
        .run_here(scores, self.score_row())
    }

    /// The softmax numerators exp(scale (s - max s)) of each row of `scores` (rows x
    /// [`Self::score_row`], the first M of each row used) as pair words in `scratch`, the left
    /// operand of [`Self::weighted_values`]; their sums in `sums`. With AVX512_BF16 the
    /// numerators go to bf16 as they are computed, and `scores` is left as it is.
    pub fn softmax_numerators(
        &self,
        scores: &mut [f32],
        scale: f32,
        scratch: &mut HeadScratch,
        sums: &mut Vec<f32>,
    ) {
        let (_, m, _) = self.dims;
        let pairs = self.value_pairs;
        let rows = scores.len() / self.score_row();
        scratch.lhs.resize(rows * pairs, 0);
        sums.clear();
        for (row, dst) in scores
            .chunks_mut(self.score_row())
            .zip(scratch.lhs.chunks_mut(pairs.max(1)))
        {
            let row = &mut row[..m];
            #[cfg(target_arch = "x86_64")]
            if dot_available() {
                // SAFETY: the CPU has AVX512F and AVX512_BF16; `dst` holds 2 * pairs >= M
                // bf16 values.
                let sum = unsafe {
                    vector_math::softmax_numerators_bf16_avx512(row, scale, dst.as_mut_ptr().cast())
                };
                // An odd M's last word pairs its numerator with 0 (its low half, the first
                // value); the padding pairs are 0.
                if m % 2 == 1 {
                    dst[m / 2] &= 0xffff;
                }
                dst[m.div_ceil(2)..].fill(0);
                sums.push(sum);
                continue;
            }
            sums.push(vector_math::softmax_numerators(row, scale));
            padded_pair_row(row, dst);
        }
    }

    /// `out` (rows x dv) = the numerators that [`Self::softmax_numerators`] left in `scratch`
    /// (rows x M) times V of head `head`.
    pub fn weighted_values(
        &self,
        head: usize,
        scratch: &mut HeadScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let (_, _, dv) = self.dims;
        let rows = out.len() / dv.max(1);
        let pairs = self.value_pairs;
        let out_row = row_stride(dv);
        scratch.product.resize(rows * out_row, 0.0);
        PairProduct {
            rows,
            cols: round_up(dv, STRIP),
            pairs,
            lhs: &scratch.lhs,
            lhs_row: pairs,
            lhs_tap: 0,
            rhs: &self.values[head],
            rhs_row: out_row,
            rhs_strip: STRIP,
            shifts: &[0],
            lhs_tiled: false,
        }
        .run_here(&mut scratch.product, out_row)?;
        for (dst, src) in out
            .chunks_mut(dv.max(1))
            .zip(scratch.product.chunks(out_row))
        {
            dst.copy_from_slice(&src[..dv]);
        }
        Ok(())
    }
}

/// The bf16 weight (N, K) that [`pack_linear_weight`] packed.
pub fn unpack_linear_weight(
    words: &Tensor,
    in_features: usize,
    out_features: usize,
) -> Result<Tensor> {
    let (pairs, _) = words.dims2()?;
    let words = words.flatten_all()?.to_vec1::<u32>()?;
    let mut weight = vec![bf16::ZERO; out_features * in_features];
    for (j, row) in weight.chunks_mut(in_features.max(1)).enumerate() {
        let column = (j / STRIP) * pairs * STRIP + j % STRIP;
        for (i, value) in row.iter_mut().enumerate() {
            *value = unpair(words[column + (i / 2) * STRIP], i % 2);
        }
    }
    Tensor::from_vec(
        weight,
        (out_features, in_features),
        &candle_core::Device::Cpu,
    )
}

/// A convolution kernel (O, C, kh, kw) as the left-hand operand: for every output channel, each
/// tap's channel pairs, a U32 tensor (O, kh kw (C / 2 rounded up)). Packed once when a model
/// loads, in place of the kernel.
pub fn pack_conv_weight(weight: &Tensor) -> Result<Tensor> {
    let (out_channels, channels, kh, kw) = weight.dims4()?;
    let (taps, pairs) = (kh * kw, channels.div_ceil(2));
    let w = bf16_values(weight)?;
    let mut words = vec![0u32; out_channels * taps * pairs];
    words
        .par_chunks_mut((taps * pairs).max(1))
        .enumerate()
        .for_each(|(o, row)| {
            let kernel = &w[o * channels * taps..][..channels * taps];
            for tap in 0..taps {
                for p in 0..pairs {
                    let lo = kernel[2 * p * taps + tap];
                    let hi = if 2 * p + 1 < channels {
                        kernel[(2 * p + 1) * taps + tap]
                    } else {
                        bf16::ZERO
                    };
                    row[tap * pairs + p] = pair(lo, hi);
                }
            }
        });
    let words = match conv_kernel_tiled(out_channels, pairs) {
        true => to_tile_order(&words, taps * pairs),
        false => words,
    };
    Tensor::from_vec(words, (out_channels, taps * pairs), weight.device())
}

/// Whether a packed convolution kernel of `out_channels` rows of taps of `pairs` is stored in
/// AMX tile order: where the tiles will read it, and its rows and taps come in whole tiles (every
/// U-Net and VAE layer but the first and last). A tile of a row-major kernel has its 16 rows a
/// kernel row (5.6-23 KiB) apart.
pub(super) fn conv_kernel_tiled(out_channels: usize, pairs: usize) -> bool {
    Kernel::best() == Kernel::Tiles
        && out_channels.is_multiple_of(TILE_BLOCK)
        && pairs.is_multiple_of(amx::TILE_WORDS)
}

/// Where word `k` of row `row` of a (rows x `row_len`) matrix lies in tile order: 16 x 16 tiles
/// one after another along each band of 16 rows, each tile row-major (`row_len` a multiple of
/// 16).
fn tile_ordered(row: usize, k: usize, row_len: usize) -> usize {
    let tile = (row / amx::TILE_ROWS) * (row_len / amx::TILE_WORDS) + k / amx::TILE_WORDS;
    tile * TILE_SIZE_WORDS + (row % amx::TILE_ROWS) * amx::TILE_WORDS + k % amx::TILE_WORDS
}

/// A row-major matrix of rows `row_len` words long in tile order.
pub(super) fn to_tile_order(words: &[u32], row_len: usize) -> Vec<u32> {
    let mut tiled = vec![0u32; words.len()];
    for (row, values) in words.chunks(row_len.max(1)).enumerate() {
        for (k, &word) in values.iter().enumerate() {
            tiled[tile_ordered(row, k, row_len)] = word;
        }
    }
    tiled
}

/// The row-major matrix that [`to_tile_order`] reordered.
fn from_tile_order(tiled: &[u32], row_len: usize) -> Vec<u32> {
    let mut words = vec![0u32; tiled.len()];
    for (row, values) in words.chunks_mut(row_len.max(1)).enumerate() {
        for (k, word) in values.iter_mut().enumerate() {
            *word = tiled[tile_ordered(row, k, row_len)];
        }
    }
    words
}

/// The bf16 kernel (O, C, kh, kw) that [`pack_conv_weight`] packed.
pub fn unpack_conv_weight(words: &Tensor, channels: usize, kh: usize, kw: usize) -> Result<Tensor> {
    let (out_channels, row_len) = words.dims2()?;
    let (taps, pairs) = (kh * kw, channels.div_ceil(2));
    if row_len != taps * pairs {
        candle_core::bail!("conv2d-bf16: a packed kernel row of {row_len} words is not {kh}x{kw} taps of {channels} channels")
    }
    let words = words.flatten_all()?.to_vec1::<u32>()?;
    let words = match conv_kernel_tiled(out_channels, pairs) {
        true => from_tile_order(&words, row_len),
        false => words,
    };
    let mut weight = vec![bf16::ZERO; out_channels * channels * taps];
    for (o, kernel) in weight.chunks_mut((channels * taps).max(1)).enumerate() {
        for c in 0..channels {
            for tap in 0..taps {
                kernel[c * taps + tap] = unpair(words[o * row_len + tap * pairs + c / 2], c % 2);
            }
        }
    }
    Tensor::from_vec(
        weight,
        (out_channels, channels, kh, kw),
        &candle_core::Device::Cpu,
    )
}

/// A q8 linear weight (N, K offset bytes, [`super::q8`]) packed as [`pack_linear_weight`]
/// packs a bf16 one, one offset byte for each bf16: a U8 tensor (K / 2 rounded up,
/// 2 x the words of a row).
pub fn pack_linear_weight_q8(bytes: &Tensor) -> Result<Tensor> {
    let words = pack_linear_weight(&integers(bytes)?)?;
    narrowed(&words)
}

/// A q8 convolution kernel (O, C, kh, kw offset bytes) packed as [`pack_conv_weight`] packs a
/// bf16 one: a U8 tensor (O, 2 kh kw (C / 2 rounded up)).
pub fn pack_conv_weight_q8(bytes: &Tensor) -> Result<Tensor> {
    let words = pack_conv_weight(&integers(bytes)?)?;
    narrowed(&words)
}

/// The f32 integers that offset bytes hold (exact in bf16).
fn integers(bytes: &Tensor) -> Result<Tensor> {
    bytes.to_dtype(DType::F32)? - f64::from(super::q8::OFFSET)
}

/// Packed pair words of integers as offset bytes (rows twice as long).
fn narrowed(words: &Tensor) -> Result<Tensor> {
    let (rows, cols) = words.dims2()?;
    let bytes = super::q8::narrow_pair_words(&words.flatten_all()?.to_vec1::<u32>()?);
    Tensor::from_vec(bytes, (rows, 2 * cols), words.device())
}

/// The pair words that packed q8 offset bytes widen to (for unpacking).
pub fn widened(bytes: &Tensor) -> Result<Tensor> {
    let (rows, cols) = bytes.dims2()?;
    let words = super::q8::widen_to_pair_words(&bytes.flatten_all()?.to_vec1::<u8>()?);
    Tensor::from_vec(words, (rows, cols / 2), bytes.device())
}

/// Half `half` (0 low, 1 high) of a pair word.
fn unpair(word: u32, half: usize) -> bf16 {
    bf16::from_bits((word >> (16 * half)) as u16)
}

/// The pair words of a packed weight of `shape` (in words): as stored (U32), or widened from
/// q8 offset bytes (U8, two bytes a word) for this call.
fn packed_words<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    shape: [usize; 2],
    op: &str,
) -> Result<std::borrow::Cow<'a, [u32]>> {
    let dims = layout.shape().dims();
    match storage {
        CpuStorage::U32(data) if dims == shape => Ok(std::borrow::Cow::Borrowed(contiguous(
            data,
            layout,
            op,
            "the packed weight",
        )?)),
        CpuStorage::U8(data) if dims == [shape[0], 2 * shape[1]] => {
            let bytes = contiguous(data, layout, op, "the packed weight")?;
            Ok(std::borrow::Cow::Owned(super::q8::widen_to_pair_words(
                bytes,
            )))
        }
        CpuStorage::U32(_) | CpuStorage::U8(_) => candle_core::bail!(
            "{op}: the packed weight {dims:?} does not fit this layer ({shape:?} pair words)"
        ),
        _ => candle_core::bail!("{op}: the weight must be packed (u32 pair words or q8 bytes)"),
    }
}

/// Each output channel's `sum * mul + add` (a q8 scale and the bias); None when both are absent.
struct ChannelAffine(Option<(Vec<f32>, Vec<f32>)>);

impl ChannelAffine {
    fn new(scales: Option<&[f32]>, bias: Option<&[f32]>, channels: usize) -> Self {
        if scales.is_none() && bias.is_none() {
            return Self(None);
        }
        let mul = scales.map_or_else(|| vec![1.0; channels], <[f32]>::to_vec);
        let add = bias.map_or_else(|| vec![0.0; channels], <[f32]>::to_vec);
        Self(Some((mul, add)))
    }

    fn at(&self, channel: usize) -> (f32, f32) {
        self.0
            .as_ref()
            .map_or((1.0, 0.0), |(mul, add)| (mul[channel], add[channel]))
    }
}

/// `y = x W^T + b` for `x` (..., K) in bf16 or f32 and `W` packed by [`pack_linear_weight`]
/// (or its q8 offset bytes by [`pack_linear_weight_q8`], with `scales`):
/// `x.apply_op2_no_bwd(&words, &LinearBf16 { .. })`, `y` in `x`'s dtype. Inference only.
pub struct LinearBf16 {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: Option<Vec<f32>>,
    /// Per output feature factors of the sums (a q8 weight's scales), applied before the bias.
    pub scales: Option<Vec<f32>>,
    /// A tensor of the output's shape and dtype added to it (the residual the layer's output
    /// joins), in the pass that writes the output.
    pub residual: Option<Tensor>,
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.out_features, self.in_features);
        let Some((&x_k, lead)) = x_layout.shape().dims().split_last() else {
            candle_core::bail!("linear-bf16: the input has no dimensions")
        };
        if x_k != k {
            candle_core::bail!("linear-bf16: input width {x_k} does not match the layer's {k}")
        }
        let words_shape = [k.div_ceil(2), row_stride(n)];
        if self.bias.as_ref().is_some_and(|b| b.len() != n)
            || self.scales.as_ref().is_some_and(|s| s.len() != n)
        {
            candle_core::bail!("linear-bf16: bias or scales do not match the {n} outputs")
        }
        let w = packed_words(w, w_layout, words_shape, "linear-bf16")?;
        let m: usize = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.push(n);
        let shape = Shape::from(shape);
        let residual = self.residual.as_ref().map(|r| r.storage_and_layout());
        if let Some((_, layout)) = &residual {
            if layout.shape() != &shape {
                candle_core::bail!(
                    "linear-bf16: the residual {:?} is not the output's shape {:?}",
                    layout.shape().dims(),
                    shape.dims()
                )
            }
        }
        let y = with_activations!("linear-bf16", x, x_layout, |x| {
            let residual = match &residual {
                Some((storage, layout)) => Some(residual_values(storage, layout)?),
                None => None,
            };
            self.product(x, &w, m, residual)?
        });
        Ok((y, shape))
    }
}

impl LinearBf16 {
    fn product<T: ProductOutput>(
        &self,
        x: &[T],
        rhs: &[u32],
        m: usize,
        residual: Option<&[T]>,
    ) -> Result<CpuStorage> {
        let (n, k) = (self.out_features, self.in_features);
        let pairs = k.div_ceil(2);
        let cols = round_up(n, STRIP);
        // f32 outputs of a whole number of strips are written in place: the sums are the
        // output (a GEGLU layer's at 512x512 is 84 MB, which a second buffer would double).
        let in_place = T::IS_F32 && cols == n;
        let out_row = if in_place { n } else { row_stride(n) };
        let affine = ChannelAffine::new(self.scales.as_deref(), self.bias.as_deref(), n);
        let lhs = pair_rows(x, m, k);
        // SAFETY: the product writes every computed column of every row (zeros when k is 0);
        // the columns past `cols` are never read.
        let mut out = unsafe { super::tensor::unwritten_f32(m * out_row) };
        let product = PairProduct {
            rows: m,
            cols,
            pairs,
            lhs: &lhs,
            lhs_row: pairs,
            lhs_tap: 0,
            rhs,
            rhs_row: STRIP,
            rhs_strip: pairs * STRIP,
            shifts: &[0],
            lhs_tiled: false,
        };
        let residual_row = |r: usize| residual.map(|values| &values[r * n..][..n]);
        if in_place {
            if affine.0.is_none() && residual.is_none() {
                product.run(&mut out, out_row)?;
                return Ok(CpuStorage::F32(out));
            }
            let finish = |rows: std::ops::Range<usize>,
                          columns: std::ops::Range<usize>,
                          out: OutPtr,
                          out_row: usize| {
                for r in rows {
                    // SAFETY: the product calls this once per finished rectangle, inside the
                    // output, from the one task that wrote it.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(out.0.add(r * out_row), out_row) };
                    let row = &mut row[columns.clone()];
                    if let Some((mul, add)) = &affine.0 {
                        let (mul, add) = (&mul[columns.clone()], &add[columns.clone()]);
                        for ((v, m), a) in row.iter_mut().zip(mul).zip(add) {
                            *v = *v * m + a;
                        }
                    }
                    if let Some(values) = residual_row(r) {
                        for (v, value) in row.iter_mut().zip(&values[columns.clone()]) {
                            *v += value.widen();
                        }
                    }
                }
            };
            product.run_then(&mut out, out_row, &finish)?;
            return Ok(CpuStorage::F32(out));
        }
        product.run(&mut out, out_row)?;
        // SAFETY: every row of `y` is written below.
        let mut y = unsafe { super::tensor::unwritten(m * n, T::from_sum(f32::NAN)) };
        y.par_chunks_mut(n.max(1))
            .zip(out.par_chunks(out_row))
            .enumerate()
            .for_each(|(r, (dst, src))| match (&affine.0, residual_row(r)) {
                (Some((mul, add)), Some(values)) => {
                    for ((((d, s), m), a), value) in
                        dst.iter_mut().zip(src).zip(mul).zip(add).zip(values)
                    {
                        *d = T::from_sum(s * m + a + value.widen());
                    }
                }
                (Some((mul, add)), None) => {
                    for (((d, s), m), a) in dst.iter_mut().zip(src).zip(mul).zip(add) {
                        *d = T::from_sum(s * m + a);
                    }
                }
                (None, Some(values)) => {
                    for ((d, s), value) in dst.iter_mut().zip(src).zip(values) {
                        *d = T::from_sum(s + value.widen());
                    }
                }
                (None, None) => {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = T::from_sum(*s);
                    }
                }
            });
        Ok(T::storage(y))
    }
}

/// A stride-1 convolution of `x` (B, C, H, W) in bf16 or f32 with a kernel (O, C, kh, kw) packed
/// by [`pack_conv_weight`] (or its q8 offset bytes by [`pack_conv_weight_q8`], with `scales`),
/// zero padding `padding`, f32 bias, one group:
/// `x.apply_op2_no_bwd(&words, &Conv2dBf16 { .. })`, the output in `x`'s dtype. Inference only.
pub struct Conv2dBf16 {
    pub channels: usize,
    pub kernel: (usize, usize),
    pub padding: usize,
    pub bias: Option<Vec<f32>>,
    /// Per output channel factors of the sums (a q8 kernel's scales), applied before the bias.
    pub scales: Option<Vec<f32>>,
}

/// The shapes of one [`Conv2dBf16`] call.
struct ConvGeometry {
    batch: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    out_h: usize,
    out_w: usize,
    padded_w: usize,
}

impl CustomOp2 for Conv2dBf16 {
    fn name(&self) -> &'static str {
        "conv2d-bf16"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = x_layout.shape().dims4()?;
        let (kh, kw) = self.kernel;
        if channels != self.channels {
            candle_core::bail!(
                "conv2d-bf16: the input has {channels} channels, the kernel expects {}",
                self.channels
            )
        }
        let out_channels = w_layout.shape().dims2()?.0;
        let row_len = kh * kw * channels.div_ceil(2);
        if self.bias.as_ref().is_some_and(|b| b.len() != out_channels)
            || self
                .scales
                .as_ref()
                .is_some_and(|s| s.len() != out_channels)
        {
            candle_core::bail!(
                "conv2d-bf16: bias or scales do not match the {out_channels} outputs"
            )
        }
        let (padded_h, padded_w) = (height + 2 * self.padding, width + 2 * self.padding);
        if kh > padded_h || kw > padded_w {
            candle_core::bail!("conv2d-bf16: a {kh}x{kw} kernel is larger than the padded input")
        }
        let geometry = ConvGeometry {
            batch,
            height,
            width,
            out_channels,
            out_h: padded_h - kh + 1,
            out_w: padded_w - kw + 1,
            padded_w,
        };
        let w = packed_words(w, w_layout, [out_channels, row_len], "conv2d-bf16")?;
        let y = with_activations!("conv2d-bf16", x, x_layout, |x| self
            .product(x, &w, &geometry)?);
        let shape = Shape::from((batch, out_channels, geometry.out_h, geometry.out_w));
        Ok((y, shape))
    }
}

impl Conv2dBf16 {
    fn product<T: ProductOutput>(
        &self,
        x: &[T],
        lhs: &[u32],
        g: &ConvGeometry,
    ) -> Result<CpuStorage> {
        let &ConvGeometry {
            batch,
            height,
            width,
            out_channels,
            out_h,
            out_w,
            padded_w,
        } = g;
        let channels = self.channels;
        let (kh, kw) = self.kernel;
        let pairs = channels.div_ceil(2);
        let shifts: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| ky * padded_w + kx))
            .collect();
        let cols = round_up(out_h * padded_w, STRIP);
        let rhs_row = row_stride(cols + shifts.last().copied().unwrap_or(0));
        let out_row = row_stride(cols);
        let plane = height * width;
        let mut rhs = vec![0u32; pairs * rhs_row];
        // SAFETY: the product writes every column of every row (`cols` is whole strips).
        let mut out = unsafe { super::tensor::unwritten_f32(out_channels * out_row) };
        // SAFETY: every pixel of every channel is copied from the sums below.
        let mut y = unsafe {
            super::tensor::unwritten(batch * out_channels * out_h * out_w, T::from_sum(f32::NAN))
        };
        let affine = ChannelAffine::new(self.scales.as_deref(), self.bias.as_deref(), out_channels);
        for (image, y_image) in y.chunks_mut(out_channels * out_h * out_w).enumerate() {
            let x_image = &x[image * channels * plane..][..channels * plane];
            // B[p][pixel of the padded plane] = (x[2p][pixel], x[2p + 1][pixel]); the border
            // stays zero.
            rhs.par_chunks_mut(rhs_row)
                .enumerate()
                .for_each(|(p, row)| {
                    let lo_plane = &x_image[2 * p * plane..][..plane];
                    let hi_plane =
                        (2 * p + 1 < channels).then(|| &x_image[(2 * p + 1) * plane..][..plane]);
                    for y in 0..height {
                        let dst = &mut row[(y + self.padding) * padded_w + self.padding..][..width];
                        let lo = &lo_plane[y * width..][..width];
                        let hi = hi_plane.map(|hi_plane| &hi_plane[y * width..][..width]);
                        T::interleave_rows(lo, hi, dst);
                    }
                });
            PairProduct {
                rows: out_channels,
                cols,
                pairs,
                lhs,
                lhs_row: shifts.len() * pairs,
                lhs_tap: pairs,
                rhs: &rhs,
                rhs_row,
                rhs_strip: STRIP,
                shifts: &shifts,
                lhs_tiled: conv_kernel_tiled(out_channels, pairs),
            }
            .run(&mut out, out_row)?;
            y_image
                .par_chunks_mut(out_h * out_w)
                .zip(out.par_chunks(out_row))
                .enumerate()
                .for_each(|(o, (dst, src))| {
                    let (mul, add) = affine.at(o);
                    for (dst_row, src_row) in dst.chunks_mut(out_w).zip(src.chunks(padded_w)) {
                        for (d, s) in dst_row.iter_mut().zip(src_row) {
                            *d = T::from_sum(s * mul + add);
                        }
                    }
                });
        }
        Ok(T::storage(y))
    }
}

/// The f32 values of a bias tensor (any float dtype), for the ops above.
pub fn bias_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::seeded_randn;
    use candle_core::{DType, Tensor};

    fn bf16_tensor(shape: &[usize], seed: u64) -> Tensor {
        seeded_randn(shape, seed).to_dtype(DType::BF16).unwrap()
    }

    /// Largest |got - want| over largest |want|, both read as f32.
    fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
        let got = got.to_dtype(DType::F32).unwrap();
        let diff = crate::ops::tensor::max_abs(&(got - want).unwrap()).unwrap();
        (diff / crate::ops::tensor::max_abs(want).unwrap()) as f32
    }

    /// bf16 products are exact in f32 and the sums accumulate in f32, so the only error of note
    /// is the output's rounding to bf16 (half a unit in the 8th bit, 2^-9 relative).
    const BF16_OUTPUT: f32 = 4e-3;

    #[test]
    fn convolutions_match_the_f32_convolution_of_the_same_values() {
        // Odd channels (a padded pair), more output channels than a tile, K over a k block,
        // 3x3 with padding, 1x1 without, a kernel wider than tall.
        for (channels, out_channels, (kh, kw), padding, seed) in [
            (5, 14, (3, 3), 1, 1),
            (300, 13, (3, 3), 1, 2),
            (64, 40, (1, 1), 0, 3),
            (6, 3, (1, 3), 2, 4),
        ] {
            let x = bf16_tensor(&[2, channels, 7, 9], seed);
            let w = bf16_tensor(&[out_channels, channels, kh, kw], seed + 10);
            let b = bf16_tensor(&[out_channels], seed + 20);
            let words = pack_conv_weight(&w).unwrap();
            let op = Conv2dBf16 {
                channels,
                kernel: (kh, kw),
                padding,
                bias: bias_values(Some(&b)).unwrap(),
                scales: None,
            };
            let got = x.apply_op2_no_bwd(&words, &op).unwrap();
            // f32 activations give the same values in f32.
            let got_f32 = x
                .to_dtype(DType::F32)
                .unwrap()
                .apply_op2_no_bwd(&words, &op)
                .unwrap();
            assert_eq!(got_f32.dtype(), DType::F32);
            let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = widen(&x)
                .conv2d(&widen(&w), padding, 1, 1, 1)
                .unwrap()
                .broadcast_add(&widen(&b).reshape((1, out_channels, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = relative_error(&got, &want);
            assert!(
                err < BF16_OUTPUT,
                "conv {channels}->{out_channels} {kh}x{kw}: {err}"
            );
        }
    }

    #[test]
    fn linear_layers_match_the_f32_product_of_the_same_values() {
        // An odd width, outputs not a multiple of 32, rows not a multiple of 12, no bias.
        for (k, n, bias, seed) in [(77, 45, true, 1), (320, 64, false, 2), (1280, 96, true, 3)] {
            let x = bf16_tensor(&[2, 25, k], seed);
            let w = bf16_tensor(&[n, k], seed + 10);
            let b = bf16_tensor(&[n], seed + 20);
            let op = LinearBf16 {
                residual: None,
                in_features: k,
                out_features: n,
                bias: if bias {
                    bias_values(Some(&b)).unwrap()
                } else {
                    None
                },
                scales: None,
            };
            let words = pack_linear_weight(&w).unwrap();
            let got = x.apply_op2_no_bwd(&words, &op).unwrap();
            // f32 activations holding bf16 values: the same sums, not rounded to bf16.
            let got_f32 = x
                .to_dtype(DType::F32)
                .unwrap()
                .apply_op2_no_bwd(&words, &op)
                .unwrap();
            let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let mut want = widen(&x).broadcast_matmul(&widen(&w).t().unwrap()).unwrap();
            if bias {
                want = want.broadcast_add(&widen(&b)).unwrap();
            }
            let err = relative_error(&got, &want);
            assert!(err < BF16_OUTPUT, "linear {k}->{n}: {err}");
            let err = relative_error(&got_f32, &want);
            assert!(err < 1e-5, "linear, f32 activations {k}->{n}: {err}");
        }
    }

    /// q8 weights (offset bytes packed for the kernels, widened per call) with their scales give
    /// the f32 product with the dequantized weights, up to the activations' rounding to bf16.
    #[test]
    fn q8_layers_match_the_f32_product_of_the_dequantized_weights() {
        use crate::ops::q8;
        let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        for (channels, out_channels, (kh, kw), padding, seed) in
            [(5, 14, (3, 3), 1, 1), (64, 40, (1, 1), 0, 3)]
        {
            let x = bf16_tensor(&[2, channels, 7, 9], seed);
            let w = seeded_randn(&[out_channels, channels, kh, kw], seed + 10);
            let b = seeded_randn(&[out_channels], seed + 20);
            let (bytes, scales) = q8::quantize(&w, "kernel").unwrap();
            let op = Conv2dBf16 {
                channels,
                kernel: (kh, kw),
                padding,
                bias: bias_values(Some(&b)).unwrap(),
                scales: Some(scales.to_vec1().unwrap()),
            };
            let got = widen(&x)
                .apply_op2_no_bwd(&pack_conv_weight_q8(&bytes).unwrap(), &op)
                .unwrap();
            let want = widen(&x)
                .conv2d(&q8::dequantize(&bytes, &scales).unwrap(), padding, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, out_channels, 1, 1)).unwrap())
                .unwrap();
            let err = relative_error(&got, &want);
            assert!(err < 1e-5, "q8 conv {channels}->{out_channels}: {err}");
        }
        for (k, n, seed) in [(77, 45, 1), (320, 64, 2)] {
            let x = bf16_tensor(&[2, 25, k], seed);
            let w = seeded_randn(&[n, k], seed + 10);
            let (bytes, scales) = q8::quantize(&w, "weight").unwrap();
            let op = LinearBf16 {
                residual: None,
                in_features: k,
                out_features: n,
                bias: None,
                scales: Some(scales.to_vec1().unwrap()),
            };
            let packed = pack_linear_weight_q8(&bytes).unwrap();
            let got = widen(&x).apply_op2_no_bwd(&packed, &op).unwrap();
            let dequantized = q8::dequantize(&bytes, &scales).unwrap();
            let want = widen(&x)
                .broadcast_matmul(&dequantized.t().unwrap())
                .unwrap();
            let err = relative_error(&got, &want);
            assert!(err < 1e-5, "q8 linear {k}->{n}: {err}");
            // A bf16 output rounds once more.
            let got = x.apply_op2_no_bwd(&packed, &op).unwrap();
            assert!(relative_error(&got, &want) < BF16_OUTPUT);
            // The packing unpacks to the same integers.
            let unpacked = unpack_linear_weight(&widened(&packed).unwrap(), k, n).unwrap();
            assert_eq!(
                widen(&unpacked).to_vec2::<f32>().unwrap(),
                integers(&bytes).unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }

    /// The scalar loop, the AVX512_BF16 kernel and the AMX tiles compute the same f32 sums (up
    /// to the order of the additions), tile edges, k tails and k blocks included, and a
    /// product's `finish` sees every element once, after its last k block, in either loop
    /// order and task split; each kernel the CPU lacks is left out (the scalar loop is always
    /// checked against f64 sums).
    #[test]
    fn every_kernel_computes_the_pair_products() {
        for (rows, pairs) in [
            (29, 150),
            (75, 150),
            (64, 16),
            (33, 7),
            (40, 600),
            (90, 300),
            (64, 32),
            (96, 544),
            (600, 20),
        ] {
            pair_products_agree(rows, 64, pairs, &[0, 3, 40]);
        }
    }

    fn pair_products_agree(rows: usize, cols: usize, pairs: usize, shifts: &[usize]) {
        let values = |len: usize, seed: u64| -> Vec<u32> {
            let v = seeded_randn(&[2 * len], seed).to_vec1::<f32>().unwrap();
            v.chunks(2)
                .map(|two| pair(bf16::from_f32(two[0]), bf16::from_f32(two[1])))
                .collect()
        };
        let lhs = values(rows * shifts.len() * pairs, 1);
        let rhs_row = cols + shifts.iter().max().copied().unwrap_or(0);
        let rhs = values(pairs * rhs_row, 2);
        let product = PairProduct {
            rows,
            cols,
            pairs,
            lhs: &lhs,
            lhs_row: shifts.len() * pairs,
            lhs_tap: pairs,
            rhs: &rhs,
            rhs_row,
            rhs_strip: STRIP,
            shifts,
            lhs_tiled: false,
        };
        let mut reference = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                for (t, shift) in shifts.iter().enumerate() {
                    for p in 0..pairs {
                        let a = lhs[r * shifts.len() * pairs + t * pairs + p];
                        let b = rhs[p * rhs_row + c + shift];
                        reference[r * cols + c] += f64::from(pair_dot(a, b));
                    }
                }
            }
        }
        let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
        // A in tile order, where the shape allows it: the tiles alone read it.
        let tile_order_fits =
            rows.is_multiple_of(TILE_BLOCK) && pairs.is_multiple_of(amx::TILE_WORDS);
        let tiled_lhs = match tile_order_fits {
            true => to_tile_order(&lhs, product.lhs_row),
            false => Vec::new(),
        };
        let tiled = PairProduct {
            lhs: &tiled_lhs,
            lhs_tiled: true,
            ..product
        };
        let kernels = [Kernel::Scalar, Kernel::Dot, Kernel::Tiles];
        let runs = kernels
            .into_iter()
            .filter(|&k| k <= Kernel::best())
            .map(|k| (k, &product))
            .chain(
                (tile_order_fits && Kernel::best() == Kernel::Tiles)
                    .then_some((Kernel::Tiles, &tiled)),
            );
        if tile_order_fits && Kernel::best() >= Kernel::Dot {
            let mut out = vec![0f32; rows * cols];
            let refused = tiled.run_on(&mut out, cols, Kernel::Dot, None).unwrap_err();
            assert!(refused.to_string().contains("tile-ordered"), "{refused}");
        }
        let out_row = cols + 8;
        let add_three = |rows: std::ops::Range<usize>,
                         columns: std::ops::Range<usize>,
                         out: OutPtr,
                         out_row: usize| {
            for r in rows {
                for c in columns.clone() {
                    // SAFETY: the rectangle lies inside the output.
                    unsafe { *out.0.add(r * out_row + c) += 3.0 };
                }
            }
        };
        for (kernel, product) in runs {
            let mut out = vec![f32::NAN; rows * out_row];
            product.run_on(&mut out, out_row, kernel, None).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let err = (f64::from(out[r * out_row + c]) - reference[r * cols + c]).abs();
                    assert!(
                        err < 1e-5 * scale,
                        "{kernel:?} at ({r}, {c}), {rows}x{pairs}: {err}"
                    );
                }
            }
            let mut finished = vec![f32::NAN; rows * out_row];
            let finish: &Finish = &add_three;
            product
                .run_on(&mut finished, out_row, kernel, Some(finish))
                .unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let i = r * out_row + c;
                    assert_eq!(finished[i], out[i] + 3.0, "{kernel:?} finish at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn tile_order_round_trips_and_refuses_partial_blocks() {
        let words: Vec<u32> = (0..64 * 48).collect();
        let tiled = to_tile_order(&words, 48);
        assert_ne!(tiled, words);
        assert_eq!(tiled[..16], words[..16]);
        assert_eq!(
            tiled[16], words[48],
            "a tile's second row is A's second row"
        );
        assert_eq!(from_tile_order(&tiled, 48), words);
        let rhs = vec![0u32; 64 * 32];
        let partial = PairProduct {
            rows: 40,
            cols: 32,
            pairs: 48,
            lhs: &tiled,
            lhs_row: 48,
            lhs_tap: 0,
            rhs: &rhs,
            rhs_row: 32,
            rhs_strip: STRIP,
            shifts: &[0],
            lhs_tiled: true,
        };
        let err = partial.run(&mut vec![0f32; 40 * 32], 32).unwrap_err();
        assert!(err.to_string().contains("whole blocks"), "{err}");
    }

    #[test]
    fn packed_weights_unpack_to_the_loaded_ones() {
        let conv = bf16_tensor(&[7, 5, 3, 3], 1);
        let words = pack_conv_weight(&conv).unwrap();
        assert_eq!(words.dims(), [7, 9 * 3]);
        let back = unpack_conv_weight(&words, 5, 3, 3).unwrap();
        assert_eq!(
            back.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            conv.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let linear = bf16_tensor(&[45, 77], 2);
        let words = pack_linear_weight(&linear).unwrap();
        assert_eq!(words.dims(), [39, 64]);
        assert_eq!(row_stride(1280), 2080);
        assert_eq!(row_stride(900), 928);
        assert_eq!(row_stride(1100) % 1024, 32);
        let back = unpack_linear_weight(&words, 77, 45).unwrap();
        assert_eq!(
            back.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            linear
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let x = bf16_tensor(&[1, 6, 5, 5], 1);
        let words = pack_conv_weight(&bf16_tensor(&[4, 6, 3, 3], 2)).unwrap();
        let op = |channels| Conv2dBf16 {
            channels,
            kernel: (3, 3),
            padding: 1,
            bias: None,
            scales: None,
        };
        let err = x.apply_op2_no_bwd(&words, &op(8)).unwrap_err().to_string();
        assert!(err.contains("6 channels, the kernel expects 8"), "{err}");
        let unpacked = bf16_tensor(&[4, 27], 3);
        let err = x
            .apply_op2_no_bwd(&unpacked, &op(6))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be packed"), "{err}");
        let ints = Tensor::zeros((1, 6, 5, 5), DType::U8, &candle_core::Device::Cpu).unwrap();
        let err = ints
            .apply_op2_no_bwd(&words, &op(6))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bf16 or f32"), "{err}");
    }

    /// The vector conversion rounds as the half crate does (nearest even), odd rows included.
    #[test]
    fn f32_rows_pair_as_the_scalar_rounding_does() {
        let values = seeded_randn(&[101], 5).to_vec1::<f32>().unwrap();
        let values: Vec<f32> = values.iter().map(|v| v * 1e3).collect();
        for len in [101, 100, 64, 33, 1] {
            let src = &values[..len];
            let mut got = vec![0u32; len.div_ceil(2)];
            f32::pair_row(src, &mut got);
            let mut want = vec![0u32; len.div_ceil(2)];
            for (i, w) in want.iter_mut().enumerate() {
                let lo = bf16::from_f32(src[2 * i]);
                let hi = src
                    .get(2 * i + 1)
                    .map_or(bf16::ZERO, |&v| bf16::from_f32(v));
                *w = pair(lo, hi);
            }
            assert_eq!(got, want, "length {len}");
        }
    }

    /// Two rows interleaved into pair words, through whichever kernel the CPU has, equal the
    /// values rounded one by one (the half crate's nearest even), tails and a missing second
    /// row included.
    #[test]
    fn interleaved_rows_are_the_rounded_pairs() {
        for len in [0, 1, 15, 16, 17, 50] {
            let lo: Vec<f32> = (0..len).map(|i| (i as f32 * 0.731).sin() * 3.3).collect();
            let hi: Vec<f32> = (0..len).map(|i| (i as f32 * 1.37).cos() / 7.0).collect();
            for second in [Some(&hi[..]), None] {
                let mut got = vec![u32::MAX; len];
                f32::interleave_rows(&lo, second, &mut got);
                let want: Vec<u32> = (0..len)
                    .map(|i| {
                        let high = second.map_or(bf16::ZERO, |h| bf16::from_f32(h[i]));
                        pair(bf16::from_f32(lo[i]), high)
                    })
                    .collect();
                assert_eq!(got, want, "length {len}, second row {}", second.is_some());
            }
        }
    }

    #[test]
    fn operands_too_short_are_refused() {
        let lhs = vec![0u32; 10];
        let rhs = vec![0u32; 10];
        let product = PairProduct {
            rows: 2,
            cols: 32,
            pairs: 5,
            lhs: &lhs,
            lhs_row: 5,
            lhs_tap: 0,
            rhs: &rhs,
            rhs_row: 32,
            rhs_strip: STRIP,
            shifts: &[0],
            lhs_tiled: false,
        };
        let mut out = vec![0f32; 64];
        let err = product.run(&mut out, 32).unwrap_err().to_string();
        assert!(err.contains("operands too short"), "{err}");
    }
}
