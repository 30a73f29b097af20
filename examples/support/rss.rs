//! Resident memory of this process, read from `/proc/self/status`, and its report against a
//! target; shared by the memory examples, which run on the wxgate binary's allocator.

/// The wxgate binary's allocator, so that the numbers are the binary's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// KiB as MB (10^6 bytes), the unit of the targets.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// Prints RSS before and after (with the peak, as `memory_kib` gave them), the growth per
/// `item` (`count` of them) and whether the RSS after stays within `target_mb`.
pub fn report(
    before_kib: u64,
    (after_kib, peak_kib): (u64, u64),
    count: usize,
    item: &str,
    target_mb: f64,
) {
    let grown = after_kib.saturating_sub(before_kib);
    println!("  RSS before:          {:8.1} MiB", mib(before_kib));
    println!(
        "  RSS after:           {:8.1} MiB = {:.1} MB (VmRSS)",
        mib(after_kib),
        mb(after_kib)
    );
    println!("  peak RSS:            {:8.1} MiB (VmHWM)", mib(peak_kib));
    println!(
        "  grown by:            {:8.1} MiB, {:.0} bytes per {item}",
        mib(grown),
        grown as f64 * 1024.0 / count as f64
    );
    let verdict = if mb(after_kib) <= target_mb {
        "met"
    } else {
        "NOT met"
    };
    println!("  target:              RSS <= {target_mb} MB: {verdict}");
}
