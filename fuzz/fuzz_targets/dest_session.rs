//! Message sequences against the destination's machines: whatever a peer
//! sends, in whatever order, the control and bulk machines return an event
//! or an error and never panic; a Resume is checked only against the session.
//! The first byte picks the starting point (fresh, after a valid hello, after
//! the switchover), so the fuzzer reaches the later phases.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::session::{DestBulk, DestExpect, DestSession};
use proto::wire::{GuestKind, Hello, MAC_LEN, Mode, Msg, VERSION, decode_frame};
use proto::{GuestOffset, MemLayout, PageSize, RegionDesc};

fn hello() -> Hello {
    Hello {
        version: VERSION,
        guest_kind: GuestKind::Workload,
        mode: Mode::Hybrid,
        features: proto::wire::FEATURE_RECOVERY,
        page_size: PageSize::Size4K,
        prefetch_pages: 0,
        prefetch_around: false,
        regions: vec![RegionDesc { guest: GuestOffset(0), len_bytes: 256 * 4096 }],
        mac: [0; MAC_LEN],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&start, rest)) = data.split_first() else { return };
    let expect = DestExpect { max_mem_bytes: Some(1 << 30), recovery: true, rdma: start & 0x80 != 0, ..Default::default() };
    let mut d = DestSession::new(expect, [7; 16], 42);
    let layout = MemLayout::single(PageSize::Size4K, 256 * 4096).expect("valid");
    let mut bulk = DestBulk::new(42, layout);
    if start % 3 >= 1 {
        let _ = d.on_recv(&Msg::Hello(hello()));
        let _ = bulk.on_recv(&Msg::BulkHello { version: VERSION, session: 42, streams: 1 });
    }
    if start % 3 == 2 {
        let _ = d.on_recv(&Msg::GuestState(b"state"));
        let _ = d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 });
        bulk.on_switchover();
    }
    let mut at = 0;
    while let Ok(Some((msg, used))) = decode_frame(&rest[at..], Some(PageSize::Size4K)) {
        at += used;
        match used % 4 {
            0 => {
                let _ = d.on_resume(&[7; 16], &msg);
            }
            1 => {
                let _ = bulk.on_recv(&msg);
                if let Msg::Pages { first, n_pages, kind, .. } = msg {
                    let _ = bulk.check_pages(first, n_pages, kind);
                }
            }
            _ => {
                let _ = d.on_recv(&msg);
            }
        }
        if used % 7 == 3 && d.layout().is_some() {
            // The driver's own steps, interleaved.
            let _ = d.got_state();
        }
    }
});
