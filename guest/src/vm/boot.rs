//! The VM guest's first megabyte: what the VMM writes there at boot, and a
//! check that it survived a migration.
//!
//! ```text
//! 0x01000  GDT: null, code/data DPL0, data DPL3 (0x1b), 64-bit code DPL3
//!          (0x23), 64-bit TSS (0x28)
//! 0x02000  PML4      0x03000  PDPT
//! 0x04000  TSS (0x68 bytes) + 8 KiB I/O permission bitmap (all ports open)
//!          + terminator: this host's KVM (PVM) ignores RFLAGS.IOPL, so CPL3
//!          port I/O needs the bitmap
//! 0x08000  page directories, one per GiB (2 MiB pages, U/S set, A/D preset so
//!          the CPU never writes page-table pages and they stay clean)
//! 0x48000  control blocks, one page per vCPU (see program.rs)
//! 0x88000  the program
//! 0x100000 version table, then data pages (crate::stamp)
//! ```
//!
//! Guest-virtual equals guest-physical: everything is identity mapped.

use std::sync::atomic::Ordering;

use crate::memory::GuestMemory;
use crate::vm::program;

/// GDT.
pub const GDT: u64 = 0x1000;
/// Top-level page table.
pub const PML4: u64 = 0x2000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0x3000;
/// Task-state segment with its I/O bitmap.
pub const TSS: u64 = 0x4000;
/// TSS limit: 0x68 bytes plus the 8 KiB bitmap.
pub const TSS_LIMIT: u64 = 0x68 + 8192;
/// Page directories.
pub const PD_BASE: u64 = 0x8000;
/// Most page directories (64 GiB of guest memory).
pub const MAX_PDS: u64 = 64;
/// Control blocks.
pub const CTL_BASE: u64 = 0x48000;
/// Most vCPUs (one control page each).
pub const MAX_VCPUS: u32 = 64;
/// The program.
pub const CODE: u64 = 0x88000;
/// End of the boot area; the version table starts here.
pub const BOOT_END: u64 = 0x10_0000;
/// Console ports: vCPU i heartbeats on `CONSOLE_PORT + i`.
pub const CONSOLE_PORT: u64 = 0x3f0;

/// Selectors.
pub const SEL_DATA3: u16 = 0x1b;
/// 64-bit code, DPL3.
pub const SEL_CODE3: u16 = 0x23;
/// TSS.
pub const SEL_TSS: u16 = 0x28;

/// Control block of vCPU `i`.
pub fn ctl_block(i: u32) -> u64 {
    CTL_BASE + u64::from(i) * 0x1000
}

/// The boot area's bytes for a guest of `mem_end` bytes (the highest
/// guest-physical address + 1) with `vcpus` vCPUs whose data starts at page
/// `data_first`, and `heartbeat_ticks` TSC ticks between heartbeats. The
/// control blocks hold only their static fields here.
pub fn image(mem_end: u64, vcpus: u32, data_first: u64, heartbeat_ticks: u64) -> Result<Vec<u8>, String> {
    let n_pd = mem_end.div_ceil(1 << 30);
    if n_pd > MAX_PDS {
        return Err(format!("the VM guest maps at most {MAX_PDS} GiB"));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!("the VM guest runs 1..={MAX_VCPUS} vCPUs"));
    }
    let mut m = vec![0u8; usize::try_from(BOOT_END).expect("1 MiB")];
    let put = |m: &mut Vec<u8>, at: u64, v: u64| {
        let at = usize::try_from(at).expect("inside the boot area");
        m[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(&mut m, GDT + 0x08, 0x0020_9b00_0000_0000); // 64-bit code, DPL0 (unused)
    put(&mut m, GDT + 0x10, 0x0000_9300_0000_0000); // data, DPL0 (unused)
    put(&mut m, GDT + 0x18, 0x0000_f300_0000_0000); // data, DPL3
    put(&mut m, GDT + 0x20, 0x0020_fb00_0000_0000); // 64-bit code, DPL3
    let (b, lim) = (TSS, TSS_LIMIT);
    let tss_lo = (lim & 0xffff)
        | ((b & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((lim >> 16) & 0xf) << 48)
        | (((b >> 24) & 0xff) << 56);
    put(&mut m, GDT + 0x28, tss_lo); // busy 64-bit TSS, DPL0
    put(&mut m, GDT + 0x30, b >> 32);
    // TSS: I/O bitmap right after the 0x68-byte header, all ports open, then 0xff.
    let tss = usize::try_from(TSS).expect("small");
    m[tss + 0x66..tss + 0x68].copy_from_slice(&0x68u16.to_le_bytes());
    m[tss + 0x68 + 8192] = 0xff;
    put(&mut m, PML4, PDPT | 0x27); // present, writable, user, accessed
    for g in 0..n_pd {
        let pd = PD_BASE + g * 0x1000;
        put(&mut m, PDPT + 8 * g, pd | 0x27);
        for e in 0..512 {
            // 2 MiB page: present, writable, user, accessed, dirty, large.
            put(&mut m, pd + 8 * e, ((g << 30) | (e << 21)) | 0xe7);
        }
    }
    for i in 0..vcpus {
        let c = ctl_block(i);
        put(&mut m, c + program::CTL_PORT, CONSOLE_PORT + u64::from(i));
        put(&mut m, c + program::CTL_HB_TICKS, heartbeat_ticks);
        put(&mut m, c + program::CTL_TAG, crate::stamp::TAG);
    }
    let code = program::assemble(CODE, data_first).map_err(|e| format!("assembling the guest program: {e}"))?;
    let at = usize::try_from(CODE).expect("small");
    if code.len() > usize::try_from(BOOT_END - CODE).expect("small") {
        return Err("guest program too large".into());
    }
    m[at..at + code.len()].copy_from_slice(&code);
    Ok(m)
}

/// Write the boot area into guest memory (region 0 starts at guest address 0).
pub fn write(mem: &GuestMemory, image: &[u8]) {
    for (k, chunk) in image.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if v == 0 {
            continue; // fresh memory is zero
        }
        mem.word_at(k as u64 * 8).store(v, Ordering::Relaxed);
    }
}

/// Compare the boot area with `image`, skipping the control blocks' fields
/// the program writes. Returns pages that match and the first mismatches.
pub fn verify(mem: &GuestMemory, image: &[u8], vcpus: u32) -> (u64, Vec<String>) {
    let dynamic = |gpa: u64| {
        (CTL_BASE..ctl_block(vcpus)).contains(&gpa)
            && !matches!(gpa % 0x1000, program::CTL_PORT | program::CTL_HB_TICKS | program::CTL_TAG)
    };
    let mut ok_pages = 0;
    let mut problems = Vec::new();
    for (p, page) in image.chunks_exact(4096).enumerate() {
        let mut good = true;
        for (w, chunk) in page.chunks_exact(8).enumerate() {
            let gpa = p as u64 * 4096 + w as u64 * 8;
            if dynamic(gpa) {
                continue;
            }
            let want = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let have = mem.word_at(gpa).load(Ordering::Relaxed);
            if want != have {
                good = false;
                if problems.len() < 4 {
                    problems.push(format!("boot area {gpa:#x}: {have:#x}, expected {want:#x}"));
                }
                break;
            }
        }
        ok_pages += u64::from(good);
    }
    (ok_pages, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_identity_maps_and_fits() {
        let img = image(3 << 30, 4, 300, 1000).unwrap();
        assert_eq!(img.len(), 1 << 20);
        let rd = |at: u64| {
            let at = usize::try_from(at).unwrap();
            u64::from_le_bytes(img[at..at + 8].try_into().unwrap())
        };
        assert_eq!(rd(PML4) & !0xfff, PDPT);
        assert_eq!(rd(PDPT + 16) & !0xfff, PD_BASE + 0x2000, "third GiB");
        assert_eq!(rd(PD_BASE + 0x2000 + 8 * 3) & !0x1f_ffff, (2u64 << 30) | (3 << 21));
        assert_eq!(rd(ctl_block(3) + program::CTL_PORT), CONSOLE_PORT + 3);
        assert!(image(65 << 30, 1, 300, 1).is_err());
        assert!(image(1 << 30, 65, 300, 1).is_err());
    }
}
