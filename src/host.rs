//! What this host can give: available memory, read before anything sized by
//! a guest is allocated, so a migration that cannot fit says so at once
//! instead of handing the host to the OOM killer minutes later.

use anyhow::{Context, Result, bail};

use guest::pattern::format_size;

/// Memory the host keeps for itself beyond what a guest may take: 512 MiB
/// or a sixteenth of the total, whichever is more (page tables, the page
/// cache the kernel needs, the engine's own buffers, everything else).
pub fn margin_bytes(total: u64) -> u64 {
    (512 << 20).max(total / 16)
}

/// `MemAvailable` and `MemTotal` from /proc/meminfo, in bytes.
pub fn meminfo() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_meminfo(&text).context("/proc/meminfo lacks MemAvailable or MemTotal")
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let kb: u64 = rest.strip_suffix("kB")?.trim().parse().ok()?;
            kb.checked_mul(1024)
        })
    };
    Some((field("MemAvailable")?, field("MemTotal")?))
}

/// The most guest memory a destination accepts by default: what is
/// available now, less the margin.
pub fn default_max_mem() -> Result<u64> {
    let (avail, total) = meminfo()?;
    Ok(avail.saturating_sub(margin_bytes(total)))
}

/// Refuse, naming the sizes, unless `need_bytes` (for `what`) fits in the
/// available memory with the margin to spare.
pub fn check_room(need_bytes: u64, what: &str) -> Result<()> {
    let (avail, total) = meminfo()?;
    let margin = margin_bytes(total);
    if need_bytes.saturating_add(margin) > avail {
        bail!(
            "{what} needs {} of memory, and this host has {} available (of {}), keeping {} for itself: \
             refusing before allocating anything",
            format_size(need_bytes),
            format_size(avail),
            format_size(total),
            format_size(margin)
        );
    }
    Ok(())
}

/// Refuse, naming the numbers, unless `copies` copies of a guest of
/// `layout` with 2 MiB pages fit in the free reserved huge pages (nothing to
/// check for 4 KiB pages). Huge pages come only from the reserve.
pub fn check_huge_pages(layout: &proto::MemLayout, copies: u64, what: &str) -> Result<()> {
    if layout.page_size() != proto::PageSize::Size2M {
        return Ok(());
    }
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let free = text
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:").and_then(|v| v.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    let need = layout.n_pages().saturating_mul(copies);
    if need > free {
        bail!(
            "{what} needs {need} free 2 MiB huge pages and this host has {free}: reserve them first \
             (as root: echo {} > /proc/sys/vm/nr_hugepages)",
            need.saturating_sub(free)
                + std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_and_refuses_what_cannot_fit() {
        let t = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(t), Some((20_000_000 * 1024, 24_000_000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
        let (avail, _) = meminfo().unwrap();
        assert!(check_room(1 << 20, "a tiny guest").is_ok());
        let e = check_room(avail, "a guest as large as what is free").unwrap_err().to_string();
        assert!(e.contains("available") && e.contains("refusing"), "{e}");
        assert!(default_max_mem().unwrap() < avail);
    }
}
