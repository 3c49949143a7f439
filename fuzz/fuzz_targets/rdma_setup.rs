//! The RDMA setup messages a peer sends (the source's offer, the
//! destination's answer) decode or fail, never panic, and what decodes
//! re-encodes to the same bytes and locates only inside its regions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdma::setup::{Answer, Offer};

fuzz_target!(|data: &[u8]| {
    if let Ok(o) = Offer::decode(data, 256, 4096) {
        assert_eq!(o.encode(), data);
        for p in [0u64, 1, 100, 255, 256, u64::MAX] {
            if let Some((_, _, n)) = o.locate(p, 64, 4096) {
                assert!(p < 256 && n >= 1 && p + n <= 256);
            }
        }
    }
    if let Ok(a) = Answer::decode(data) {
        assert_eq!(a.encode(), data);
    }
});
