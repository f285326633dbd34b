//! Process-wide settings the binaries apply once at start-up.

/// glibc's malloc returns freed memory to the kernel once the heap's free top passes its trim
/// threshold (2 MiB by default), so a loop of tensor ops pays a page fault for every 4 KiB of
/// every new activation: 7,600 faults per evaluation of the 2,000-point toy MLP, about a third
/// of its time. Raising the mmap and trim thresholds keeps freed buffers in the heap for reuse.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it runs before other threads.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
