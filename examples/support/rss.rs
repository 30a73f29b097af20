//! Resident memory of this process, read from `/proc/self/status`; shared by the memory
//! examples.

/// `VmRSS` and `VmHWM` of this process, in KiB.
pub fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// KiB as MB (10^6 bytes), the unit of the targets.
pub fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}
