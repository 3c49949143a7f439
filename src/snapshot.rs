//! A VMM's snapshot memory file as a source guest (`source --memory-file`):
//! pages are served from the file, as Firecracker's full-snapshot memory
//! file lays them out (each region at its offset), to a destination that
//! hands them to a VMM restoring from that snapshot (`dest
//! --vmm-uffd-socket`). The file never changes during the migration, so
//! there is nothing to pause or track: only pure post-copy is offered.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use memmap2::{Mmap, MmapOptions};
use proto::wire::GuestKind;
use proto::{GuestOffset, HostAddr, MemLayout, PageBitmap, PageSize, RegionDesc};
use sender::{GuestError, SourceGuest};

/// A memory file mapped read-only, with its region table.
pub struct SnapshotSource {
    map: Mmap,
    layout: MemLayout,
}

/// Parse `OFFSET:SIZE[,OFFSET:SIZE...]` (sizes as `--mem` takes them).
pub fn parse_regions(s: &str) -> Result<Vec<(u64, u64)>> {
    s.split(',')
        .map(|part| {
            let (o, l) = part.split_once(':').ok_or_else(|| anyhow!("region {part:?} is not OFFSET:SIZE"))?;
            let o = guest::parse_size(o.trim()).map_err(|e| anyhow!("region {part:?}: offset: {e}"))?;
            let l = guest::parse_size(l.trim()).map_err(|e| anyhow!("region {part:?}: size: {e}"))?;
            Ok((o, l))
        })
        .collect()
}

impl SnapshotSource {
    /// Map `path`; `regions` (file offset, bytes) default to one region
    /// over the whole file.
    pub fn open(path: &Path, page_size: PageSize, regions: Option<&[(u64, u64)]>) -> Result<SnapshotSource> {
        let file = File::open(path).with_context(|| format!("opening the memory file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("reading the size of {}", path.display()))?.len();
        let ps = page_size.bytes();
        if len == 0 || !len.is_multiple_of(ps) {
            bail!("the memory file {} is {len} bytes: not a positive multiple of the page size {ps}", path.display());
        }
        let regions: Vec<(u64, u64)> = regions.map_or_else(|| vec![(0, len)], <[_]>::to_vec);
        for &(o, l) in &regions {
            if o.checked_add(l).is_none_or(|end| end > len) {
                bail!("region at offset {o} of {l} bytes runs past the end of the memory file ({len} bytes)");
            }
        }
        let descs = regions.iter().map(|&(o, l)| RegionDesc { guest: GuestOffset(o), len_bytes: l }).collect();
        let layout = MemLayout::new(page_size, descs).map_err(|e| anyhow!("the memory file's regions: {e}"))?;
        let len = usize::try_from(len).context("memory file too large")?;
        // SAFETY: a read-only private mapping of a file we opened; the
        // engine only reads it. Someone truncating the file meanwhile would
        // make reads fault (SIGBUS): the file must stay as it is for the
        // migration, as a snapshot does.
        let map = unsafe { MmapOptions::new().len(len).map(&file) }
            .with_context(|| format!("mapping the memory file {}", path.display()))?;
        Ok(SnapshotSource { map, layout })
    }
}

// SAFETY: the mapping lives as long as `self` and is never written or
// unmapped before; every region lies inside it (checked in `open`).
unsafe impl SourceGuest for SnapshotSource {
    fn kind(&self) -> GuestKind {
        GuestKind::Snapshot
    }

    fn layout(&self) -> &MemLayout {
        &self.layout
    }

    fn regions(&self) -> Vec<HostAddr> {
        let base = self.map.as_ptr() as usize;
        self.layout
            .regions()
            .iter()
            .map(|r| HostAddr(base + usize::try_from(r.guest.0).expect("inside the mapping")))
            .collect()
    }

    fn pause(&mut self) -> Result<Vec<u8>, GuestError> {
        // The VMM restores its vCPUs from its own snapshot.
        Ok(Vec::new())
    }

    fn unpause(&mut self) -> Result<(), GuestError> {
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> Result<(), GuestError> {
        Err(GuestError::Tracking("a memory file does not change: use --mode postcopy".into()))
    }

    fn collect_dirty(&mut self, _into: &mut PageBitmap) -> Result<(), GuestError> {
        Err(GuestError::Tracking("a memory file does not change: use --mode postcopy".into()))
    }

    fn stop_dirty_tracking(&mut self) {}
}
