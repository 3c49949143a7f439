//! The wire format's tests: round trips of every message, rejections, proptests.

use super::*;
use crate::types::{GuestOffset, PageIdx, PageRange, PageSize, RegionDesc};
use proptest::prelude::*;

const PS: Option<PageSize> = Some(PageSize::Size4K);

fn roundtrip(m: &Msg<'_>) {
    let frame = m.to_frame();
    let (back, used) = decode_frame(&frame, PS).expect("decodes").expect("complete");
    assert_eq!(used, frame.len());
    assert_eq!(&back, m);
    // Every strict prefix is "need more", never an error or a panic.
    for cut in 0..frame.len() {
        assert_eq!(decode_frame(&frame[..cut], PS), Ok(None), "prefix {cut} of {:?}", m.tag());
    }
    // A body cut short inside a correct header is Truncated or LengthMismatch
    // (an opaque guest state has no inner length: any length is a state).
    if frame.len() > HEADER_LEN && m.tag() != Tag::GuestState && m.tag() != Tag::RdmaSetup {
        let h = FrameHeader::decode(&frame).unwrap();
        let short = &frame[HEADER_LEN..frame.len() - 1];
        let mut h2 = h;
        h2.body_len -= 1;
        assert!(decode(h2, short, PS).is_err(), "{:?} accepted a short body", m.tag());
    }
}

fn hello() -> Hello {
    Hello {
        version: VERSION,
        guest_kind: GuestKind::Vm,
        mode: Mode::Hybrid,
        features: 0,
        page_size: PageSize::Size4K,
        prefetch_pages: 8,
        prefetch_around: true,
        regions: vec![
            RegionDesc { guest: GuestOffset(0), len_bytes: 1 << 30 },
            RegionDesc { guest: GuestOffset(1 << 32), len_bytes: 1 << 20 },
        ],
        mac: [7; MAC_LEN],
    }
}

#[test]
fn every_message_round_trips() {
    let mut rb = Vec::new();
    encode_ranges(&[PageRange::new(PageIdx(5), 3), PageRange::new(PageIdx(1 << 40), 1)], &mut rb);
    let mut wb = Vec::new();
    encode_words(&[1, u64::MAX, 0], &mut wb);
    let data = vec![0xab; 2 * 4096];
    let msgs = vec![
        Msg::ServerHello(ServerHello { min_version: 1, max_version: 3, flags: 1, nonce: [9; NONCE_LEN] }),
        Msg::Hello(hello()),
        Msg::HelloAck { session: 0xdead_beef, features: 3 },
        Msg::BulkHello { version: 1, session: 42, streams: 3 },
        Msg::Error { code: ErrorCode::Auth, message: "bad key: é" },
        Msg::KeepAlive,
        Msg::GuestState(b"state bytes"),
        Msg::RdmaSetup(b"offer bytes and a mac"),
        Msg::Outstanding { first_word: 17, words: word_list(&wb) },
        Msg::Switchover { n_outstanding: 12345, precopy_rounds: 3 },
        Msg::SwitchoverAck(ResumeTimes { restore_ns: 1, evict_ns: 2 }),
        Msg::RangeRequest { req_id: 9, ranges: range_list(&rb) },
        Msg::Pages { first: PageIdx(77), n_pages: 2, kind: PageKind::Demand, data: &data },
        Msg::Zeros { first: PageIdx(1 << 30), n_pages: 2048, kind: PageKind::Push },
        Msg::PushDone { n_pushed: 99 },
        Msg::Complete { n_present: 100 },
        Msg::CompleteAck(SourceStats {
            downtime_ns: 1,
            pause_to_sent_ns: 2,
            bytes_sent: 3,
            pages_pushed: 4,
            pages_demand: 5,
            requests: 6,
            push_ns: 7,
        }),
        Msg::PrecopyRound { round: 3, n_pages: 1000 },
        Msg::Resume { version: 1, session: 0x1234, mac: [3; MAC_LEN] },
        Msg::Have { first_word: 2, words: word_list(&wb) },
        Msg::ResumeAck { state: ResumeState::NotSwitched, n_have: 65 },
    ];
    let mut seen = std::collections::HashSet::new();
    for m in &msgs {
        roundtrip(m);
        seen.insert(m.tag() as u8);
    }
    assert_eq!(seen.len(), Tag::ALL.len(), "a message type lacks a round-trip case");
}

#[test]
fn an_unknown_error_code_gets_through_as_internal() {
    // Found by the decode_frame fuzz target: code 0, empty message. The
    // error must reach the user whatever its code; it re-encodes as
    // Internal, so only the decoded message round-trips, not the bytes.
    let f = [5, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
    let (m, used) = decode_frame(&f, PS).unwrap().unwrap();
    assert_eq!((m.clone(), used), (Msg::Error { code: ErrorCode::Internal, message: "" }, 12));
    assert_eq!(decode_frame(&m.to_frame(), PS).unwrap().unwrap().0, m);
}

#[test]
fn pages_prefix_decodes_alone() {
    let data = vec![1u8; 2 * 4096];
    let f = Msg::Pages { first: PageIdx(10), n_pages: 2, kind: PageKind::Push, data: &data }.to_frame();
    let h = FrameHeader::decode(&f).unwrap();
    let got = decode_pages_prefix(h, &f[HEADER_LEN..HEADER_LEN + PAGES_PREFIX_LEN], PS).unwrap();
    assert_eq!(got, (PageIdx(10), 2, PageKind::Push));
    // A header whose length disagrees with n_pages.
    let mut h2 = h;
    h2.body_len += 4096;
    assert!(decode_pages_prefix(h2, &f[HEADER_LEN..HEADER_LEN + PAGES_PREFIX_LEN], PS).is_err());
    assert!(decode_pages_prefix(h, &f[HEADER_LEN..HEADER_LEN + 8], PS).is_err());
    assert_eq!(decode_pages_prefix(h, &f[HEADER_LEN..HEADER_LEN + 16], None), Err(DecodeError::NoPageSize));
}

#[test]
fn pages_prefix_matches_encode() {
    let data = vec![1u8; 3 * 4096];
    let m = Msg::Pages { first: PageIdx(10), n_pages: 3, kind: PageKind::Push, data: &data };
    let frame = m.to_frame();
    let prefix = pages_prefix(PageIdx(10), 3, PageKind::Push, PageSize::Size4K);
    assert_eq!(&frame[..prefix.len()], &prefix[..]);
}

#[test]
fn rejects_unknown_reserved_and_oversized() {
    assert_eq!(FrameHeader::decode(&[0, 0, 0, 0, 0, 0, 0, 0]), Err(DecodeError::UnknownTag(0)));
    assert_eq!(FrameHeader::decode(&[200, 0, 0, 0, 0, 0, 0, 0]), Err(DecodeError::UnknownTag(200)));
    assert_eq!(FrameHeader::decode(&[6, 1, 0, 0, 0, 0, 0, 0]), Err(DecodeError::Reserved(Tag::KeepAlive)));
    assert!(matches!(FrameHeader::decode(&[6, 0, 0, 0, 1, 0, 0, 0]), Err(DecodeError::TooLarge { .. })));
    let huge = FrameHeader::encode(Tag::Pages, u32::MAX);
    assert!(matches!(FrameHeader::decode(&huge), Err(DecodeError::TooLarge { .. })));
    assert!(matches!(decode_frame(&huge, PS), Err(DecodeError::TooLarge { .. })));
}

#[test]
fn rejects_inconsistent_bodies() {
    // Pages whose n_pages disagrees with its data.
    let data = vec![0u8; 4096];
    let mut f = Msg::Pages { first: PageIdx(0), n_pages: 1, kind: PageKind::Push, data: &data }.to_frame();
    f[16] = 2; // n_pages = 2
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::LengthMismatch { .. })));
    // Pages before the page size is known.
    let f = Msg::Pages { first: PageIdx(0), n_pages: 1, kind: PageKind::Push, data: &data }.to_frame();
    assert_eq!(decode_frame(&f, None), Err(DecodeError::NoPageSize));
    // A run larger than MAX_RUN_BYTES with 2 MiB pages.
    let mut f = Msg::Pages { first: PageIdx(0), n_pages: 1, kind: PageKind::Push, data: &data }.to_frame();
    f[16..20].copy_from_slice(&5u32.to_le_bytes());
    assert!(matches!(decode_frame(&f, Some(PageSize::Size2M)), Err(DecodeError::Invalid { .. })));
    // Zero-length range.
    let mut rb = Vec::new();
    encode_ranges(&[PageRange::new(PageIdx(1), 1)], &mut rb);
    let mut f = Msg::RangeRequest { req_id: 1, ranges: range_list(&rb) }.to_frame();
    f[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::Invalid { .. })));
    // A range count larger than the body.
    let mut f = Msg::RangeRequest { req_id: 1, ranges: range_list(&rb) }.to_frame();
    f[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::Truncated { .. })));
    // Trailing garbage after a fixed-size body.
    let mut f = Msg::Complete { n_present: 1 }.to_frame();
    f.push(0);
    f[4] = 9;
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::TooLarge { .. })));
    // Wrong magic, bad mode, too many regions.
    let mut f = Msg::Hello(hello()).to_frame();
    f[HEADER_LEN] ^= 1;
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::BadMagic(_))));
    let mut f = Msg::Hello(hello()).to_frame();
    f[HEADER_LEN + 7] = 9;
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::Invalid { field: "mode", .. })));
    let mut f = Msg::Hello(hello()).to_frame();
    f[HEADER_LEN + 20..HEADER_LEN + 22].copy_from_slice(&65u16.to_le_bytes());
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::Invalid { field: "n_regions", .. })));
    // Inverted version range.
    let mut f = Msg::ServerHello(ServerHello { min_version: 1, max_version: 1, flags: 0, nonce: [0; 16] }).to_frame();
    f[HEADER_LEN + 4] = 5;
    assert!(matches!(decode_frame(&f, PS), Err(DecodeError::Invalid { .. })));
}

#[test]
fn error_message_is_bounded_and_lossy_utf8_survives() {
    let long = "x".repeat(5000);
    let f = Msg::Error { code: ErrorCode::Internal, message: &long }.to_frame();
    let (m, _) = decode_frame(&f, PS).unwrap().unwrap();
    assert!(matches!(m, Msg::Error { message, .. } if message.len() == 1024));
    let mut f = Msg::Error { code: ErrorCode::Protocol, message: "abc" }.to_frame();
    f[HEADER_LEN + 5] = 0xff;
    let (m, _) = decode_frame(&f, PS).unwrap().unwrap();
    assert_eq!(m, Msg::Error { code: ErrorCode::Protocol, message: "a" });
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame(&bytes, PS);
        let _ = decode_frame(&bytes, None);
    }

    #[test]
    fn decode_never_panics_with_valid_header(tag in 1u8..=u8::try_from(Tag::ALL.len()).unwrap(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut f = vec![tag, 0, 0, 0];
        f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        f.extend_from_slice(&body);
        let _ = decode_frame(&f, PS);
    }

    #[test]
    fn ranges_round_trip(ranges in proptest::collection::vec((any::<u64>(), 1u32..), 1..50), id in any::<u32>()) {
        let rs: Vec<_> = ranges.iter().map(|(f, n)| PageRange::new(PageIdx(*f), u64::from(*n))).collect();
        let mut b = Vec::new();
        encode_ranges(&rs, &mut b);
        let m = Msg::RangeRequest { req_id: id, ranges: range_list(&b) };
        let f = m.to_frame();
        let (back, _) = decode_frame(&f, PS).unwrap().unwrap();
        match back {
            Msg::RangeRequest { req_id, ranges } => {
                prop_assert_eq!(req_id, id);
                prop_assert_eq!(ranges.iter().collect::<Vec<_>>(), rs);
            }
            other => prop_assert!(false, "decoded as {:?}", other.tag()),
        }
    }

    #[test]
    fn pages_round_trip(first in any::<u64>(), n in 1u32..8, kind in 1u8..=3, fill in any::<u8>()) {
        let data = vec![fill; n as usize * 4096];
        let kind = PageKind::from_u8(kind).unwrap();
        let m = Msg::Pages { first: PageIdx(first), n_pages: n, kind, data: &data };
        let f = m.to_frame();
        let (back, used) = decode_frame(&f, PS).unwrap().unwrap();
        prop_assert_eq!(used, f.len());
        prop_assert_eq!(back, m);
    }

    #[test]
    fn hello_round_trip(n in 1usize..=64, version in any::<u16>(), features in any::<u64>(), mac in any::<[u8; 32]>()) {
        let regions = (0..n as u64).map(|i| RegionDesc { guest: GuestOffset(i << 32), len_bytes: (i + 1) * 4096 }).collect();
        let m = Msg::Hello(Hello { version, guest_kind: GuestKind::Workload, mode: Mode::Postcopy, features, page_size: PageSize::Size2M, prefetch_pages: version.into(), prefetch_around: false, regions, mac });
        let f = m.to_frame();
        let (back, _) = decode_frame(&f, PS).unwrap().unwrap();
        prop_assert_eq!(back, m);
    }
}
