//! f32 products `y = [y +] x B` for CPU inference layers whose right-hand matrix B (K x N, a
//! linear layer's `W^T`) is packed once, when the layer loads, into strips of 64 columns stored
//! one after another, `[strip][k][64]`. A micro-tile of 6 rows by one strip keeps its 24 sums in
//! AVX-512 registers; each k step loads the strip's four vectors and broadcasts one float from
//! each of the 6 rows of x, read where it lies. Nothing is copied per call: the gemm crate,
//! given the same product, packed x into panels (a strided gather, a quarter of its time for the
//! CLIP text encoder's 154 rows) and re-read B's columns from rows 3-12 KiB apart. [`Strip`] is
//! one such strip built per call (attention's queries or probabilities, `ops::attention`), times
//! a left operand read at any strides.
//!
//! Only where the CPU has AVX-512 ([`available`]); elsewhere layers keep `W^T` for the gemm
//! crate.

use super::gemm_bf16::{split_tasks, OutPtr};
use candle_core::Result;
use rayon::prelude::*;

/// Output columns per strip: four 16-lane registers.
pub const STRIP: usize = 16 * VECTORS;
const VECTORS: usize = 4;
/// Rows per micro-tile: 6 rows x 4 registers = 24 accumulators, with the strip's four vectors
/// and a broadcast 29 of the 32 vector registers; each k step is 24 FMAs to 10 loads (12 rows
/// by two registers measured the same, 14 loads).
const TILE_ROWS: usize = 6;
/// A half strip's columns and registers, and the rows of its micro-tile (12 x 2 = 24 sums).
pub const HALF_STRIP: usize = 16 * HALF_VECTORS;
const HALF_VECTORS: usize = 2;
pub const HALF_TILE_ROWS: usize = 12;
/// k steps per cache block: a strip's block (96 x 64 x 4 bytes = 24 KiB) and a tile's rows of
/// x (6 x 96 x 4 = 2.3 KiB) share the 48 KiB L1.
const K_BLOCK: usize = 96;
/// Strip rows ahead of the one being read that the kernel asks L1 to fetch.
const PREFETCH: usize = 8;
/// Strips whose k block passes over a tile's x while it is in L1 (8 x 96 x 256 bytes = 192
/// KiB from L2), and whose sums for a chunk of rows stay in L2 from one k block to the next.
const GROUP_STRIPS: usize = 8;
/// Multiply-adds below which a product stays on the calling thread (waking another costs
/// about 10 microseconds).
const SERIAL_WORK: usize = 1 << 18;
/// The most rows of x a task works through at once.
const CHUNK_ROWS: usize = 24 * TILE_ROWS;
/// Bytes of x a task keeps in L2 while every strip of the task passes over them (whole rows: a
/// tile's sums stay in L1 and L2 from one k block to the next, and reach memory once).
const X_BLOCK_BYTES: usize = 1 << 20;

/// Whether this CPU runs the strip kernel (AVX-512 Foundation).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One 64-byte cache line of a strip row, so that every strip starts on a line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// B (K x N) as strips of 64 columns, `[strip][k][64]`, the last strip's columns past N zero.
pub struct StripsF32 {
    lines: Vec<Line>,
    k: usize,
    n: usize,
}

impl std::fmt::Debug for StripsF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StripsF32({} x {})", self.k, self.n)
    }
}

impl StripsF32 {
    /// Packs `B` (K x N, row-major: a linear layer's `W^T`, (in, out)).
    pub fn new(b: &[f32], k: usize, n: usize) -> Result<Self> {
        if b.len() != n * k {
            candle_core::bail!(
                "f32 strips: a matrix of {} values is not {k} x {n}",
                b.len()
            )
        }
        let strips = n.div_ceil(STRIP);
        let mut lines = vec![Line::default(); strips * k * (STRIP / 16)];
        lines
            .par_chunks_mut((k * STRIP / 16).max(1))
            .enumerate()
            .for_each(|(strip, block)| {
                let first = strip * STRIP;
                let width = STRIP.min(n - first);
                for (dst, src) in Self::floats_mut(block)
                    .chunks_exact_mut(STRIP)
                    .zip(b.chunks_exact(n.max(1)))
                {
                    dst[..width].copy_from_slice(&src[first..first + width]);
                }
            });
        Ok(Self { lines, k, n })
    }

    fn floats(lines: &[Line]) -> &[f32] {
        // SAFETY: a Line is 16 f32 with no padding (repr(C), 64 bytes).
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
    }

    fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
        // SAFETY: as in `floats`.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
    }

    /// (K, N).
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The weight `W` (N x K, row-major) these strips were packed from.
    pub fn weight(&self) -> Vec<f32> {
        let values = Self::floats(&self.lines);
        let mut weight = vec![0f32; self.n * self.k];
        weight
            .par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(col, row)| {
                let strip = &values[col / STRIP * self.k * STRIP..];
                for (p, w) in row.iter_mut().enumerate() {
                    *w = strip[p * STRIP + col % STRIP];
                }
            });
        weight
    }

    /// `y = x B`, or `y += x B` when `accumulate`, for `x` (rows x K) and `y` (rows x N), both
    /// row-major; rows split between rayon's threads in whole micro-tiles by runs of strips.
    pub fn product(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        if x.len() < rows * self.k || y.len() < rows * self.n {
            candle_core::bail!(
                "f32 strips: operands too short for {rows} rows x {} x {}",
                self.k,
                self.n
            )
        }
        if !available() {
            candle_core::bail!("f32 strips: this CPU has no AVX-512")
        }
        let strips = self.n.div_ceil(STRIP);
        let tiles = rows.div_ceil(TILE_ROWS);
        let split = split_tasks(tiles, strips);
        let out = OutPtr(y.as_mut_ptr());
        if rows * self.n * self.k < SERIAL_WORK {
            // SAFETY: as below, with one task.
            unsafe { self.run_block(x, 0..rows, 0..strips, out, accumulate) };
            return Ok(());
        }
        (0..split.tasks()).into_par_iter().for_each(|task| {
            let (tiles, strips) = split.task(task);
            let rows = tiles.start * TILE_ROWS..(tiles.end * TILE_ROWS).min(rows);
            if !rows.is_empty() && !strips.is_empty() {
                // SAFETY: the lengths are checked above and the CPU has AVX-512; the tasks'
                // blocks of rows and strips are disjoint, so no two threads write one element.
                unsafe { self.run_block(x, rows, strips, out, accumulate) };
            }
        });
        Ok(())
    }

    /// Rows `rows` by strips `strips` on this thread: chunks of rows whose x stays in L2, groups
    /// of strips whose sums for the chunk stay in L2 across k blocks, and within a k block each
    /// tile's x (in L1) multiplied by every strip of the group.
    ///
    /// # Safety
    /// `x` and `out` must hold the block and nothing else may touch its part of `out`; the CPU
    /// must have AVX-512.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_block(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        strips: std::ops::Range<usize>,
        out: OutPtr,
        accumulate: bool,
    ) {
        let values = Self::floats(&self.lines);
        if self.k == 0 {
            if !accumulate {
                for row in rows {
                    let first = out.0.add(row * self.n + strips.start * STRIP);
                    let end = (strips.end * STRIP).min(self.n);
                    std::ptr::write_bytes(first, 0, end - strips.start * STRIP);
                }
            }
            return;
        }
        // Rows whose x block stays in L2 beside the task's strips.
        let chunk_rows =
            (X_BLOCK_BYTES / (4 * self.k)).clamp(TILE_ROWS, CHUNK_ROWS) / TILE_ROWS * TILE_ROWS;
        for chunk in rows.clone().step_by(chunk_rows) {
            let chunk = chunk..(chunk + chunk_rows).min(rows.end);
            for group in strips.clone().step_by(GROUP_STRIPS) {
                let group = group..(group + GROUP_STRIPS).min(strips.end);
                for k0 in (0..self.k).step_by(K_BLOCK) {
                    let depth = K_BLOCK.min(self.k - k0);
                    for row in chunk.clone().step_by(TILE_ROWS) {
                        let a = x.as_ptr().add(row * self.k + k0);
                        let tile_rows = (chunk.end - row).min(TILE_ROWS);
                        for strip in group.clone() {
                            let col = strip * STRIP;
                            let tile = Tile {
                                b: values.as_ptr().add((strip * self.k + k0) * STRIP),
                                depth,
                                a_row: self.k,
                                a_col: 1,
                                out_row: self.n,
                                cols: STRIP.min(self.n - col),
                                accumulate: accumulate || k0 > 0,
                            };
                            tile.run(tile_rows, a, out.0.add(row * self.n + col));
                        }
                    }
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_block(
        &self,
        _x: &[f32],
        _rows: std::ops::Range<usize>,
        _strips: std::ops::Range<usize>,
        _out: OutPtr,
        _accumulate: bool,
    ) {
        unreachable!("`product` refuses CPUs without AVX-512")
    }
}

/// Floats on whole 64-byte lines: a strip of any width built per call (a [`Tile`] reads its rows
/// with aligned loads).
#[derive(Default)]
pub(super) struct AlignedFloats {
    lines: Vec<Line>,
}

impl AlignedFloats {
    /// `len` floats (a multiple of 16), values left as they were.
    pub(super) fn resized(&mut self, len: usize) -> &mut [f32] {
        debug_assert_eq!(len % 16, 0, "aligned floats come in lines of 16");
        self.lines.resize(len / 16, Line::default());
        StripsF32::floats_mut(&mut self.lines)
    }

    pub(super) fn values(&self) -> &[f32] {
        StripsF32::floats(&self.lines)
    }
}

/// One strip of a right-hand matrix built per call (K x 64, `[k][64]`, 64-byte aligned), reused
/// from call to call.
#[derive(Default)]
pub struct Strip {
    lines: Vec<Line>,
    k: usize,
}

impl Strip {
    /// The strip's k rows of 64 floats, resized to `k` rows (values left as they were).
    pub fn rows_mut(&mut self, k: usize) -> &mut [f32] {
        self.lines.resize(k * (STRIP / 16), Line::default());
        self.k = k;
        StripsF32::floats_mut(&mut self.lines)
    }

    pub fn values(&self) -> &[f32] {
        StripsF32::floats(&self.lines)
    }

    /// `y = A B` for this strip B (K x 64) and `rows` rows of A, element (r, p) at
    /// `a[r * a_row + p * a_col]`: y is `rows` rows of 64 floats, `y_row` apart. On the calling
    /// thread (callers whose tasks are the parallel part), with AVX-512.
    pub fn product(
        &self,
        a: &[f32],
        (a_row, a_col): (usize, usize),
        rows: usize,
        y: &mut [f32],
        y_row: usize,
    ) -> Result<()> {
        let a_needed = match (rows, self.k) {
            (0, _) | (_, 0) => 0,
            _ => (rows - 1) * a_row + (self.k - 1) * a_col + 1,
        };
        let y_needed = rows.saturating_sub(1) * y_row + STRIP;
        if a.len() < a_needed || (rows > 0 && (y.len() < y_needed || y_row < STRIP)) {
            candle_core::bail!("f32 strip: operands too short for {rows} rows x {}", self.k)
        }
        if !available() {
            candle_core::bail!("f32 strips: this CPU has no AVX-512")
        }
        if self.k == 0 {
            for row in y.chunks_mut(y_row).take(rows) {
                row[..STRIP].fill(0.0);
            }
            return Ok(());
        }
        for k0 in (0..self.k).step_by(K_BLOCK) {
            let tile = Tile {
                b: self.values()[k0 * STRIP..].as_ptr(),
                depth: K_BLOCK.min(self.k - k0),
                a_row,
                a_col,
                out_row: y_row,
                cols: STRIP,
                accumulate: k0 > 0,
            };
            for row in (0..rows).step_by(TILE_ROWS) {
                // SAFETY: the lengths are checked above and the CPU has AVX-512.
                unsafe {
                    tile.run(
                        (rows - row).min(TILE_ROWS),
                        a.as_ptr().add(row * a_row + k0 * a_col),
                        y.as_mut_ptr().add(row * y_row),
                    )
                };
            }
        }
        Ok(())
    }
}

/// What the micro-tiles of one strip and k block share.
pub(super) struct Tile {
    /// The strip's first k row of the block (64-byte aligned, rows [`STRIP`] floats apart, or
    /// [`HALF_STRIP`] for [`Tile::run_half`]).
    pub b: *const f32,
    pub depth: usize,
    /// Floats from one row of x to the next, and from one k to the next.
    pub a_row: usize,
    pub a_col: usize,
    /// Floats from one row of y to the next.
    pub out_row: usize,
    /// The strip's columns inside y (64 but in the last strip).
    pub cols: usize,
    pub accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// # Safety
    /// The CPU must have AVX-512; `a` must hold `rows` rows of `depth` floats, `y` `rows` rows of
    /// `cols` floats at the tile's strides.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(&self, rows: usize, a: *const f32, y: *mut f32) {
        macro_rules! rows {
            ($($n:literal)*) => {
                match rows {
                    $($n => self.rows::<$n, VECTORS>(a, y),)*
                    _ => unreachable!("a tile has 1 to {TILE_ROWS} rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6)
    }

    /// As [`Self::run`] over a strip of [`HALF_STRIP`] columns (rows that many floats apart)
    /// and up to [`HALF_TILE_ROWS`] rows: the same 24 accumulators where only 32 columns exist.
    ///
    /// # Safety
    /// As [`Self::run`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_half(&self, rows: usize, a: *const f32, y: *mut f32) {
        macro_rules! rows {
            ($($n:literal)*) => {
                match rows {
                    $($n => self.rows::<$n, HALF_VECTORS>(a, y),)*
                    _ => unreachable!("a half tile has 1 to {HALF_TILE_ROWS} rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// # Safety
    /// As [`Self::run`], with `R` rows and a strip of `V` registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize, const V: usize>(&self, a: *const f32, y: *mut f32) {
        use std::arch::x86_64::*;
        let width = 16 * V;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut b = self.b;
        for p in 0..self.depth {
            let mut b_vectors = [_mm512_setzero_ps(); V];
            for (v, b_vector) in b_vectors.iter_mut().enumerate() {
                // A prefetch past the strip's end is dropped, not a fault.
                let ahead = b.wrapping_add(PREFETCH * width + 16 * v);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                *b_vector = _mm512_load_ps(b.add(16 * v));
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let a_value = _mm512_set1_ps(*a.add(r * self.a_row + p * self.a_col));
                for (sum, &b_vector) in acc_row.iter_mut().zip(&b_vectors) {
                    *sum = _mm512_fmadd_ps(a_value, b_vector, *sum);
                }
            }
            b = b.add(width);
        }
        let mask = |first: usize| -> __mmask16 {
            let valid = self.cols.saturating_sub(first).min(16);
            ((1u32 << valid) - 1) as __mmask16
        };
        let masks: [__mmask16; V] = std::array::from_fn(|v| mask(16 * v));
        for (r, acc_row) in acc.iter().enumerate() {
            let dst = y.add(r * self.out_row);
            for (v, (&value, &mask)) in acc_row.iter().zip(&masks).enumerate() {
                let dst = dst.add(16 * v);
                let value = if self.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), value)
                } else {
                    value
                };
                _mm512_mask_storeu_ps(dst, mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::tensor::hashed_values as values;

    /// `x W^T` in f64.
    fn reference(x: &[f32], weight: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        (0..rows * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k)
                    .map(|p| x[r * k + p] as f64 * weight[c * k + p] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn products_match_a_direct_sum_and_weights_round_trip() -> Result<()> {
        // Shapes with partial tiles, partial strips, several k blocks and k = 0.
        for (rows, n, k) in [
            (154, 96, 400),
            (1, 1, 1),
            (13, 45, 7),
            (25, 64, 193),
            (12, 32, 0),
            (30, 17, 384),
        ] {
            let x = values(rows * k, 1);
            let weight = values(n * k, 2);
            let weight_t: Vec<f32> = (0..k * n).map(|i| weight[(i % n) * k + i / n]).collect();
            let strips = StripsF32::new(&weight_t, k, n)?;
            assert_eq!(strips.weight(), weight, "{rows} x {n} x {k}: round trip");
            if !available() {
                continue;
            }
            let expected = reference(&x, &weight, rows, n, k);
            let mut y = vec![f32::NAN; rows * n];
            strips.product(&x, rows, &mut y, false)?;
            for (got, want) in y.iter().zip(&expected) {
                assert!(
                    (got - want).abs() < 1e-5 * (k as f32).max(1.0),
                    "{rows} x {n} x {k}"
                );
            }
            let mut y: Vec<f32> = (0..rows * n).map(|i| i as f32).collect();
            strips.product(&x, rows, &mut y, true)?;
            for (i, (got, want)) in y.iter().zip(&expected).enumerate() {
                let want = want + i as f32;
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "accumulated"
                );
            }
        }
        Ok(())
    }

    /// A strip built per call times a strided A (here A^T of a row-major matrix) against a
    /// direct sum, over several k blocks and a partial tile.
    #[test]
    fn a_strip_multiplies_strided_rows() -> Result<()> {
        if !available() {
            return Ok(());
        }
        let (rows, k) = (15, 200);
        // A (rows x k) read from its transpose: element (r, p) at p * rows + r.
        let a_t = values(k * rows, 3);
        let b = values(k * STRIP, 4);
        let mut strip = Strip::default();
        strip.rows_mut(k).copy_from_slice(&b);
        let mut y = vec![f32::NAN; rows * 80];
        strip.product(&a_t, (1, rows), rows, &mut y, 80)?;
        for r in 0..rows {
            for c in 0..STRIP {
                let want: f64 = (0..k)
                    .map(|p| a_t[p * rows + r] as f64 * b[p * STRIP + c] as f64)
                    .sum();
                assert!((y[r * 80 + c] as f64 - want).abs() < 1e-4, "({r}, {c})");
            }
        }
        assert!(strip
            .product(&a_t[1..], (1, rows), rows, &mut y, 80)
            .is_err());
        let short = (rows - 1) * 80 + STRIP - 1;
        assert!(strip
            .product(&a_t, (1, rows), rows, &mut y[..short], 80)
            .is_err());
        Ok(())
    }

    #[test]
    fn short_operands_are_errors() -> Result<()> {
        assert!(StripsF32::new(&[0.0; 5], 3, 2).is_err());
        let strips = StripsF32::new(&[0.0; 6], 3, 2)?;
        let mut y = vec![0f32; 4];
        assert!(strips.product(&[0.0; 5], 2, &mut y, false).is_err());
        assert!(strips.product(&[0.0; 6], 2, &mut y[..3], false).is_err());
        Ok(())
    }
}
