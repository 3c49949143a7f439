//! Message sequences against the source's machine, with link losses
//! interleaved: whatever a destination sends, the machine returns an event
//! or an error and never panics, and it never reports a switchover
//! acknowledged that was not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::session::{SourceEvent, SourceOffer, SourceSession};
use proto::wire::{GuestKind, Mode, decode_frame};
use proto::{MemLayout, PageSize};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let layout = MemLayout::single(PageSize::Size4K, 256 * 4096).expect("valid");
    let mut s = SourceSession::new(SourceOffer {
        guest_kind: GuestKind::Workload,
        mode: Mode::Postcopy,
        layout,
        key: (flags & 1 != 0).then(|| b"key".to_vec()),
        prefetch_pages: 0,
        prefetch_around: false,
        recovery: flags & 2 != 0,
        rdma: flags & 4 != 0,
    });
    let mut acked = false;
    let mut at = 0;
    let mut i = 0u32;
    while let Ok(Some((msg, used))) = decode_frame(&rest[at..], Some(PageSize::Size4K)) {
        at += used;
        i += 1;
        match s.on_recv(&msg) {
            Ok(SourceEvent::Accepted { .. }) if flags & 4 != 0 => s.on_switchover_sent(),
            Ok(SourceEvent::Resumed(_)) => acked = true,
            Ok(SourceEvent::Reattached { state: proto::wire::ResumeState::Running, .. }) => acked = true,
            _ => {}
        }
        assert!(!s.switched_over() || acked, "switched over without an acknowledgement");
        if (flags >> 3) != 0 && i % u32::from(flags >> 3) == 0 {
            let _ = s.on_link_lost();
        }
    }
});
