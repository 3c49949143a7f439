//! The wire format: frames and messages. This doc is the normative spec.
//!
//! # Connections
//!
//! The destination listens; the source connects twice:
//!
//! * the **control** connection carries the handshake, the switchover, the
//!   destination's range requests and the source's answers to them (demand
//!   pages), keep-alives and the completion exchange. Demand pages travel here,
//!   never behind background data;
//! * the **bulk** connection carries precopy rounds and the background push,
//!   one way, source to destination.
//!
//! # Sequence
//!
//! ```text
//! control:  D->S ServerHello   S->D Hello   D->S HelloAck
//! bulk:     S->D BulkHello(session)
//! bulk:     S->D [Pages(precopy)* PrecopyRound]*            (hybrid/precopy modes)
//! control:  S->D GuestState Outstanding* Switchover          (guest paused on source)
//!           D->S SwitchoverAck                               (guest resumed on destination)
//! control:  D->S RangeRequest*   S->D Pages(demand)*          (interleaved, any order)
//! bulk:     S->D Pages(push)* PushDone
//! control:  D->S Complete        S->D CompleteAck            (source may now drop memory)
//! either:   KeepAlive at any time after the handshake (and D->S between Hello
//!           and HelloAck, while the destination prepares memory); Error then
//!           close at any time.
//! ```
//!
//! # Recovery
//!
//! With the `FEATURE_RECOVERY` bit negotiated, a control or bulk connection
//! that breaks (or goes silent) once the source has sent GuestState does not
//! end the run: both sides drop both connections, the destination keeps the
//! guest running and listens, the source reconnects and resumes the session:
//!
//! ```text
//! control:  D->S ServerHello   S->D Resume(session, mac)
//!           D->S Have*  ResumeAck(state, n_have)
//! bulk:     S->D BulkHello(session)                          (state Running only)
//! control:  D->S RangeRequest* (the waiting faults first) ... as in postcopy
//! ```
//!
//! `state` settles what the source could not know: `Running` (the guest
//! runs on the destination: serve and push what it lacks), `NotSwitched`
//! (no switchover happened there: the source resumes the guest), `Complete`
//! (every page is there: the source answers Complete with CompleteAck).
//!
//! # Frames
//!
//! Every frame is an 8-byte header followed by `body_len` bytes of body. All
//! integers are little-endian.
//!
//! ```text
//! offset size field
//! 0      1    tag        message type (below); 0 is invalid
//! 1      1    flags      must be 0
//! 2      2    reserved   must be 0
//! 4      4    body_len   bytes of body that follow; at most the tag's maximum
//! ```
//!
//! # Bodies
//!
//! ```text
//! 1  ServerHello   magic u32, min_version u16, max_version u16, flags u32
//!                  (bit 0: a pre-shared key is required), nonce [16]
//! 2  Hello         magic u32, version u16, guest_kind u8, mode u8, features u64,
//!                  page_size u32, n_regions u16, reserved u16,
//!                  prefetch_pages u32 (0: the destination decides),
//!                  prefetch_mode u8 (0 after, 1 around), reserved [3],
//!                  n_regions x (guest_offset u64, len_bytes u64), mac [32]
//!                  mac = HMAC-SHA256(key, nonce || body-without-mac), or zeros
//! 3  HelloAck      session u64, features u64 (the accepted subset)
//! 4  BulkHello     magic u32, version u16, streams u16, session u64
//!                  (streams: how many bulk connections the source opens
//!                  on this link, at most 8; 0 and 1 both mean one)
//! 5  Error         code u16, len u16, message [len] (UTF-8, len <= 1024)
//! 6  KeepAlive     (empty)
//! 7  GuestState    opaque guest state, <= 16 MiB
//! 8  Outstanding   first_word u64, words u64 x n (bitmap of outstanding pages,
//!                  bit i of word w is page 64w+i; n <= 131072)
//! 9  Switchover    n_outstanding u64 (population count of the bitmap sent),
//!                  precopy_rounds u32 (rounds sent on the bulk connection; the
//!                  destination applies them all before resuming), reserved u32
//! 10 SwitchoverAck restore_ns u64, evict_ns u64, reserved u64 (0)
//! 11 RangeRequest  req_id u32, n u32 (1..=4096), n x (first u64, n_pages u32 >= 1)
//! 12 Pages         first u64, n_pages u32, kind u8, reserved [3],
//!                  data [n_pages * page_size]; the data is at most 8 MiB
//! 13 PushDone      n_pushed u64
//! 14 Complete      n_present u64
//! 15 CompleteAck   downtime_ns u64, pause_to_sent_ns u64, bytes_sent u64,
//!                  pages_pushed u64, pages_demand u64, requests u64,
//!                  push_ns u64 (first push frame to PushDone written)
//! 16 PrecopyRound  round u32, reserved u32, n_pages u64 (pages sent this round)
//! 17 Resume        magic u32, version u16, reserved u16, session u64, mac [32]
//!                  mac = HMAC-SHA256(key, nonce || body-without-mac), or zeros
//! 18 Have          first_word u64, words u64 x n (bitmap of the pages the
//!                  destination holds, as in Outstanding; n <= 131072)
//! 19 ResumeAck     state u8 (1 running, 2 not switched, 3 complete),
//!                  reserved [7], n_have u64 (population count of the Have bitmap)
//! 20 Zeros         first u64, n_pages u32, kind u8, reserved [3]: as Pages,
//!                  for a run whose every byte is zero, without the data
//!                  (only with FEATURE_ZEROS, bit 1); it counts as pages
//!                  sent of its kind wherever Pages would (push counts,
//!                  precopy round counts, demand answers)
//! ```
//!
//! # Versioning
//!
//! The destination announces the range of versions it speaks; the source picks
//! one inside it or gives up with a clear error. A version bump is needed for
//! any change in a body layout; new message types may only be sent when a
//! feature bit negotiated in Hello/HelloAck says the peer understands them.
//! Unknown tags, non-zero flags or reserved fields are rejected.

mod frame;
mod msg;
#[cfg(test)]
mod tests;

pub use frame::*;
pub use msg::*;
