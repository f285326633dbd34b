//! Process-wide settings the binaries apply once at start-up.

/// The binaries allocate with mimalloc (set as `#[global_allocator]` in each `main`). Every
/// candle op allocates a fresh output buffer; glibc's malloc serves buffers over 32 MiB (its
/// largest mmap threshold) straight from the kernel and unmaps them on free, so each large
/// activation costs a page fault per 4 KiB: in the pixel-DDPM training step (batch 64) a fifth of
/// the time. mimalloc with purging off keeps freed memory mapped for reuse: 7.0 -> 3.9 s a step.
pub fn keep_freed_memory() {
    // mimalloc v3's `mi_option_purge_delay` (mimalloc.h, enum mi_option_e); -1 = never purge.
    const MI_OPTION_PURGE_DELAY: i32 = 15;
    extern "C" {
        fn mi_option_set(option: i32, value: std::os::raw::c_long);
    }
    // SAFETY: sets a tuning option of the linked mimalloc before any other thread runs.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it runs before other threads.
    // Kept for code that allocates through glibc directly (C libraries).
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// How exactly f32 matrix products run on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Matmul {
    /// Full f32: generation, whose images are compared with the CPU's and diffusers'.
    Exact,
    /// TF32 tensor cores allowed (10-bit mantissa inputs, f32 accumulation), as PyTorch's
    /// convolutions by default: training, where the gradient noise dwarfs the rounding.
    Tf32,
}

/// Settings of candle 0.11's CUDA backend, made once when the device is made. Every tensor op
/// allocates its output from the stream's memory pool; by default the pool hands all free memory
/// back to the driver at each synchronisation (a loss read-back every step), and every
/// allocation creates two CUDA events for cross-stream tracking. This program uses one stream,
/// so tracking is not needed, and the pool may keep what it has.
#[cfg(feature = "cuda")]
pub fn tune_cuda(device: &candle_core::Device, f32_matmul: F32Matmul) -> candle_core::Result<()> {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let candle_core::Device::Cuda(cuda) = device else {
        return Ok(());
    };
    // SAFETY: every tensor of this process lives on the device's one stream, so no use can
    // race a free across streams (the condition candle documents for turning tracking off).
    unsafe { cuda.disable_event_tracking() };
    candle_core::cuda::set_gemm_reduced_precision_f32(f32_matmul == F32Matmul::Tf32);
    let stream = cuda.cuda_stream();
    let mut keep_all = u64::MAX;
    // SAFETY: the device handle comes from a live context; the attribute takes a u64 value.
    unsafe {
        let pool = result::device::get_default_mem_pool(stream.context().cu_device())
            .map_err(candle_core::Error::wrap)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep_all as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}

/// Without CUDA support there is nothing to tune.
#[cfg(not(feature = "cuda"))]
pub fn tune_cuda(_device: &candle_core::Device, _f32_matmul: F32Matmul) -> candle_core::Result<()> {
    Ok(())
}

/// Memory this process can still take, in bytes: the kernel's `MemAvailable` (free memory plus
/// what it can reclaim from caches), or less when a cgroup v2 limit (a container) leaves less.
/// `None` where neither can be read (not Linux).
pub fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo_field(&meminfo, "MemAvailable")?;
    let cgroup_room = (|| {
        let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
        let limit: u64 = read("memory.max")?.trim().parse().ok()?;
        let used: u64 = read("memory.current")?.trim().parse().ok()?;
        Some(limit.saturating_sub(used))
    })();
    Some(cgroup_room.map_or(available, |room| room.min(available)))
}

/// Memory a computation on `device` can still take, in bytes: on the CPU as
/// [`available_memory_bytes`], on a GPU its free memory as the driver reports it.
pub fn available_memory_on(device: &candle_core::Device) -> Option<u64> {
    match device {
        candle_core::Device::Cpu => available_memory_bytes(),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        _ => None,
    }
}

/// A `Name:   123 kB` line of /proc/meminfo, in bytes.
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|l| l.split(':').next() == Some(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU's model name (from /proc/cpuinfo, where there is one) and the instruction-set
/// extensions that decide which kernels can run, detected at run time: what every timing is
/// quoted beside.
pub fn cpu_description() -> (String, Vec<&'static str>) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    (model, cpu_features())
}

#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Vec<&'static str> {
    let detected = [
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
        ("f16c", is_x86_feature_detected!("f16c")),
        ("avx_vnni", is_x86_feature_detected!("avxvnni")),
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bw", is_x86_feature_detected!("avx512bw")),
        ("avx512vl", is_x86_feature_detected!("avx512vl")),
        ("avx512_vnni", is_x86_feature_detected!("avx512vnni")),
        ("avx512_bf16", is_x86_feature_detected!("avx512bf16")),
        ("avx512_fp16", is_x86_feature_detected!("avx512fp16")),
        ("amx_bf16", super::amx::cpu_has_amx_bf16()),
    ];
    detected
        .into_iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| name)
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_features() -> Vec<&'static str> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(super::meminfo_field(text, "MemAvailable"), Some(1_024_000));
        assert_eq!(super::meminfo_field(text, "SwapFree"), None);
    }
}
