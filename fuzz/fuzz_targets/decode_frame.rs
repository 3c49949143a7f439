//! Frames from arbitrary bytes: decoding never panics, and whatever decodes
//! encodes back to the same bytes and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::PageSize;
use proto::wire::{FrameHeader, HEADER_LEN, decode_frame, decode_pages_prefix};

fuzz_target!(|data: &[u8]| {
    for ps in [None, Some(PageSize::Size4K), Some(PageSize::Size2M)] {
        let mut at = 0;
        while let Ok(Some((msg, used))) = decode_frame(&data[at..], ps) {
            let frame = msg.to_frame();
            // Encoding is canonical, except for Error: an unknown code
            // decodes as Internal (an error must always get through) and a
            // message is cut to its valid UTF-8 prefix.
            if msg.tag() != proto::wire::Tag::Error {
                assert_eq!(&frame[..], &data[at..at + used], "{:?} re-encodes differently", msg.tag());
            }
            let (back, n) = decode_frame(&frame, ps).expect("re-decodes").expect("whole");
            assert_eq!(n, frame.len());
            assert_eq!(back, msg);
            at += used;
        }
    }
    // A Pages prefix alone, against any header.
    if data.len() >= HEADER_LEN + 16
        && let Ok(h) = FrameHeader::decode(data)
        && h.tag == proto::wire::Tag::Pages
    {
        let _ = decode_pages_prefix(h, &data[HEADER_LEN..HEADER_LEN + 16], Some(PageSize::Size4K));
    }
});
