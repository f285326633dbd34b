//! Intel AMX (Advanced Matrix Extensions) tiles for the bf16 products: eight tile registers of
//! 16 rows x 64 bytes, and `tdpbf16ps`, which adds to a 16 x 16 f32 tile the products of a
//! 16 x 32 bf16 tile and a 32 x 16 one (16,384 flops an instruction where AVX512_BF16's
//! `vdpbf16ps` does 64). Its operands are exactly the pair layout of [`super::gemm_bf16`]: a row
//! of the left tile is 16 pair words along k, a row of the right tile 16 columns of one pair row.
//!
//! Stable Rust has no AMX intrinsics, so the instructions are inline assembly; Linux hands a
//! process the tile state only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which
//! [`tiles_available`] does once.

/// Whether this CPU and kernel let the process use AMX tiles with bf16 products (AMX-TILE and
/// AMX-BF16 by CPUID, the tile state granted by Linux). Asked once; the answer cannot change
/// while the process runs.
pub fn tiles_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && grant())
}

/// Whether CPUID reports AMX tiles with bf16 products (whether Linux grants them is
/// [`tiles_available`]'s question).
#[cfg(target_arch = "x86_64")]
pub fn cpu_has_amx_bf16() -> bool {
    // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_has_amx_bf16() -> bool {
    false
}

/// Asks Linux for the tile data state (without it the first tile instruction faults).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn grant() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn grant() -> bool {
    false
}

/// Tile rows (and the rows of every tile this module configures).
pub const TILE_ROWS: usize = 16;
/// 4-byte words in a tile row: 16 f32 sums, or 16 bf16 pairs.
pub const TILE_WORDS: usize = 16;

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    row_bytes: [u16; 16],
    rows: [u8; 16],
}

/// The tiles configured on this thread, all eight 16 rows x 64 bytes; released when dropped.
/// Tiles 0-3 hold sums, 4-5 left operands, 6-7 right operands by the kernels' convention.
pub struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`tiles_available`] must have returned true, and no other `Tiles` may be alive on this
    /// thread (configuring zeroes every tile).
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure() -> Self {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            row_bytes: [0; 16],
            rows: [0; 16],
        };
        for tile in 0..8 {
            config.row_bytes[tile] = (TILE_WORDS * 4) as u16;
            config.rows[tile] = TILE_ROWS as u8;
        }
        std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
        Tiles(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure` on this thread.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `tileloadd tmmN, [base + stride]`: 16 rows of 64 bytes, `stride` bytes apart.
macro_rules! amx_load {
    ($tile:literal, $base:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $tile, ", [{base} + {stride}*1]"),
            base = in(reg) $base,
            stride = in(reg) $stride,
            options(nostack, readonly)
        )
    };
}

/// `tilestored [base + stride], tmmN`.
macro_rules! amx_store {
    ($tile:literal, $base:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{base} + {stride}*1], tmm", $tile),
            base = in(reg) $base,
            stride = in(reg) $stride,
            options(nostack)
        )
    };
}

/// `tilezero tmmN`.
macro_rules! amx_zero {
    ($tile:literal) => {
        std::arch::asm!(concat!("tilezero tmm", $tile), options(nostack, nomem))
    };
}

/// `tdpbf16ps tmm<sum>, tmm<left>, tmm<right>`.
macro_rules! amx_dot_bf16 {
    ($sum:literal, $left:literal, $right:literal) => {
        std::arch::asm!(
            concat!("tdpbf16ps tmm", $sum, ", tmm", $left, ", tmm", $right),
            options(nostack, nomem)
        )
    };
}

pub(crate) use {amx_dot_bf16, amx_load, amx_store, amx_zero};

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// One `tdpbf16ps` against the pair dot products it stands for.
    #[test]
    fn a_tile_product_is_the_sum_of_pair_products() {
        if !tiles_available() {
            return;
        }
        let bf = |x: f32| x.to_bits() >> 16;
        let left: Vec<u32> = (0..256)
            .map(|i| bf((i % 7) as f32 - 3.0) | bf(1.0 + (i % 3) as f32) << 16)
            .collect();
        let right: Vec<u32> = (0..256)
            .map(|i| bf((i % 5) as f32) | bf(0.5 - (i % 4) as f32) << 16)
            .collect();
        let mut sums = vec![1f32; 256];
        // SAFETY: AMX is available; every operand holds 16 rows of 64 bytes.
        unsafe {
            let _tiles = Tiles::configure();
            amx_load!(0, sums.as_ptr(), 64usize);
            amx_load!(4, left.as_ptr(), 64usize);
            amx_load!(6, right.as_ptr(), 64usize);
            amx_dot_bf16!(0, 4, 6);
            amx_store!(0, sums.as_mut_ptr(), 64usize);
        }
        let value = |w: u32| f32::from_bits(w << 16);
        for m in 0..16 {
            for n in 0..16 {
                let want = 1.0
                    + (0..16)
                        .map(|k| {
                            let (a, b) = (left[m * 16 + k], right[k * 16 + n]);
                            value(a & 0xffff) * value(b & 0xffff) + value(a >> 16) * value(b >> 16)
                        })
                        .sum::<f32>();
                assert_eq!(sums[m * 16 + n], want, "({m}, {n})");
            }
        }
    }
}
