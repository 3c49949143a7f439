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
//! either:   KeepAlive at any time after the handshake; Error then close at any time.
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
//! 4  BulkHello     magic u32, version u16, reserved u16, session u64
//! 5  Error         code u16, len u16, message [len] (UTF-8, len <= 1024)
//! 6  KeepAlive     (empty)
//! 7  GuestState    opaque guest state, <= 16 MiB
//! 8  Outstanding   first_word u64, words u64 x n (bitmap of outstanding pages,
//!                  bit i of word w is page 64w+i; n <= 131072)
//! 9  Switchover    n_outstanding u64 (population count of the bitmap sent),
//!                  precopy_rounds u32 (rounds sent on the bulk connection; the
//!                  destination applies them all before resuming), reserved u32
//! 10 SwitchoverAck restore_ns u64, evict_ns u64, arm_ns u64
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
//! ```
//!
//! # Versioning
//!
//! The destination announces the range of versions it speaks; the source picks
//! one inside it or gives up with a clear error. A version bump is needed for
//! any change in a body layout; new message types may only be sent when a
//! feature bit negotiated in Hello/HelloAck says the peer understands them.
//! Unknown tags, non-zero flags or reserved fields are rejected.

use crate::types::{GuestOffset, PageIdx, PageRange, PageSize, RegionDesc};

/// "PCPY" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PCPY");
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Size of the frame header.
pub const HEADER_LEN: usize = 8;
/// Size of a Pages body before its data.
pub const PAGES_PREFIX_LEN: usize = 16;
/// Largest page payload of one Pages frame.
pub const MAX_RUN_BYTES: u64 = 8 << 20;
/// Largest guest state blob.
pub const MAX_STATE_BYTES: u32 = 16 << 20;
/// Most ranges in one RangeRequest.
pub const MAX_REQUEST_RANGES: u32 = 4096;
/// Most bitmap words in one Outstanding frame.
pub const MAX_OUTSTANDING_WORDS: u32 = 128 * 1024;
/// Longest error message.
pub const MAX_ERROR_LEN: u16 = 1024;
/// Largest body of any frame: the bound a reader sizes its buffer to.
pub const MAX_BODY_LEN: u32 = MAX_STATE_BYTES;
/// Nonce length in ServerHello.
pub const NONCE_LEN: usize = 16;
/// MAC length in Hello.
pub const MAC_LEN: usize = 32;
/// ServerHello flag: the destination requires a pre-shared key.
pub const SERVER_FLAG_AUTH_REQUIRED: u32 = 1;
/// Feature bit: post-copy recovery (Resume, Have, ResumeAck; see the module doc).
pub const FEATURE_RECOVERY: u64 = 1;

/// Message type tags.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tag {
    /// See module doc.
    ServerHello = 1,
    /// See module doc.
    Hello = 2,
    /// See module doc.
    HelloAck = 3,
    /// See module doc.
    BulkHello = 4,
    /// See module doc.
    Error = 5,
    /// See module doc.
    KeepAlive = 6,
    /// See module doc.
    GuestState = 7,
    /// See module doc.
    Outstanding = 8,
    /// See module doc.
    Switchover = 9,
    /// See module doc.
    SwitchoverAck = 10,
    /// See module doc.
    RangeRequest = 11,
    /// See module doc.
    Pages = 12,
    /// See module doc.
    PushDone = 13,
    /// See module doc.
    Complete = 14,
    /// See module doc.
    CompleteAck = 15,
    /// See module doc.
    PrecopyRound = 16,
    /// See module doc.
    Resume = 17,
    /// See module doc.
    Have = 18,
    /// See module doc.
    ResumeAck = 19,
}

impl Tag {
    fn from_u8(v: u8) -> Option<Tag> {
        Some(match v {
            1 => Tag::ServerHello,
            2 => Tag::Hello,
            3 => Tag::HelloAck,
            4 => Tag::BulkHello,
            5 => Tag::Error,
            6 => Tag::KeepAlive,
            7 => Tag::GuestState,
            8 => Tag::Outstanding,
            9 => Tag::Switchover,
            10 => Tag::SwitchoverAck,
            11 => Tag::RangeRequest,
            12 => Tag::Pages,
            13 => Tag::PushDone,
            14 => Tag::Complete,
            15 => Tag::CompleteAck,
            16 => Tag::PrecopyRound,
            17 => Tag::Resume,
            18 => Tag::Have,
            19 => Tag::ResumeAck,
            _ => return None,
        })
    }

    /// Largest body this tag may carry.
    pub fn max_body_len(self) -> u32 {
        const fn u32_of(v: u64) -> u32 {
            assert!(v <= u32::MAX as u64);
            #[allow(clippy::cast_possible_truncation)]
            let r = v as u32;
            r
        }
        match self {
            Tag::ServerHello => 28,
            Tag::Hello => u32_of(32 + 16 * crate::types::MAX_REGIONS as u64 + MAC_LEN as u64),
            Tag::HelloAck => 16,
            Tag::BulkHello => 16,
            Tag::Error => 4 + MAX_ERROR_LEN as u32,
            Tag::KeepAlive => 0,
            Tag::GuestState => MAX_STATE_BYTES,
            Tag::Outstanding => 8 + 8 * MAX_OUTSTANDING_WORDS,
            Tag::Switchover => 16,
            Tag::SwitchoverAck => 24,
            Tag::RangeRequest => 8 + 12 * MAX_REQUEST_RANGES,
            Tag::Pages => u32_of(PAGES_PREFIX_LEN as u64 + MAX_RUN_BYTES),
            Tag::PushDone => 8,
            Tag::Complete => 8,
            Tag::CompleteAck => 56,
            Tag::PrecopyRound => 16,
            Tag::Resume => u32_of(16 + MAC_LEN as u64),
            Tag::Have => 8 + 8 * MAX_OUTSTANDING_WORDS,
            Tag::ResumeAck => 16,
        }
    }
}

/// Why bytes could not be decoded. Every variant is a peer error: the caller
/// reports it and closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Tag byte names no message.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// Body longer than the tag allows.
    #[error("{tag:?} body of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The message type.
        tag: Tag,
        /// Body length announced.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// Flags or reserved bytes not zero.
    #[error("non-zero reserved field in {0:?}")]
    Reserved(Tag),
    /// Magic number wrong: not a postcopy peer.
    #[error("bad magic {0:#010x}: peer is not a postcopy endpoint")]
    BadMagic(u32),
    /// A field has a value outside its domain.
    #[error("invalid {field} in {tag:?}: {value}")]
    Invalid {
        /// The message type.
        tag: Tag,
        /// The field.
        field: &'static str,
        /// The offending value.
        value: u64,
    },
    /// Body length inconsistent with its own contents.
    #[error("{tag:?} body is {len} bytes, its fields say {expected}")]
    LengthMismatch {
        /// The message type.
        tag: Tag,
        /// Body length.
        len: usize,
        /// Length implied by the fields.
        expected: u64,
    },
    /// Pages arrived before the page size is known.
    #[error("pages frame before the page size was negotiated")]
    NoPageSize,
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub tag: Tag,
    /// Body length, already checked against the tag's maximum.
    pub body_len: u32,
}

impl FrameHeader {
    /// Decode and check a header.
    pub fn decode(b: &[u8]) -> Result<FrameHeader, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated { what: "frame header", need: HEADER_LEN, have: b.len() });
        }
        let tag = Tag::from_u8(b[0]).ok_or(DecodeError::UnknownTag(b[0]))?;
        if b[1] != 0 || b[2] != 0 || b[3] != 0 {
            return Err(DecodeError::Reserved(tag));
        }
        let body_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let max = tag.max_body_len();
        if body_len > max {
            return Err(DecodeError::TooLarge { tag, len: body_len, max });
        }
        Ok(FrameHeader { tag, body_len })
    }

    /// Encode a header.
    pub fn encode(tag: Tag, body_len: u32) -> [u8; HEADER_LEN] {
        let l = body_len.to_le_bytes();
        [tag as u8, 0, 0, 0, l[0], l[1], l[2], l[3]]
    }

    /// Total frame length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}

/// What runs in the guest: the pager and sender do not care, the two ends must agree.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKind {
    /// Threads in the process touching memory.
    Workload = 1,
    /// A KVM virtual machine.
    Vm = 2,
}

impl GuestKind {
    fn from_u8(v: u8) -> Option<GuestKind> {
        match v {
            1 => Some(GuestKind::Workload),
            2 => Some(GuestKind::Vm),
            _ => None,
        }
    }
}

/// Migration mode.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// No precopy: the guest moves first, every page follows.
    Postcopy = 1,
    /// Precopy rounds, then switch to postcopy with the dirty set outstanding.
    Hybrid = 2,
    /// Classic precopy: rounds, then stop-and-copy; nothing outstanding.
    Precopy = 3,
}

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        match v {
            1 => Some(Mode::Postcopy),
            2 => Some(Mode::Hybrid),
            3 => Some(Mode::Precopy),
            _ => None,
        }
    }

    /// Lower-case name, as in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
            Mode::Precopy => "precopy",
        }
    }
}

/// Why a page run was sent.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// In answer to a range request.
    Demand = 1,
    /// Background push after switchover.
    Push = 2,
    /// A precopy round, before switchover.
    Precopy = 3,
}

impl PageKind {
    fn from_u8(v: u8) -> Option<PageKind> {
        match v {
            1 => Some(PageKind::Demand),
            2 => Some(PageKind::Push),
            3 => Some(PageKind::Precopy),
            _ => None,
        }
    }
}

/// Error codes carried by [`Msg::Error`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A message broke the protocol (bad bytes or wrong order).
    Protocol = 1,
    /// No common protocol version.
    Version = 2,
    /// Authentication failed or was missing.
    Auth = 3,
    /// The peers disagree on the guest (layout, page size, guest kind).
    Mismatch = 4,
    /// The sender of the error failed on its own (I/O, kernel, guest).
    Internal = 5,
    /// The run was cancelled.
    Aborted = 6,
    /// The request exceeds what the receiver was told to accept (memory).
    Capacity = 7,
}

impl ErrorCode {
    /// Decode, mapping unknown codes to `Internal` (errors must always get through).
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Version,
            3 => ErrorCode::Auth,
            4 => ErrorCode::Mismatch,
            6 => ErrorCode::Aborted,
            7 => ErrorCode::Capacity,
            _ => ErrorCode::Internal,
        }
    }
}

/// What the destination tells a reconnecting source (see the module doc).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResumeState {
    /// The guest runs on the destination: serve and push what it lacks.
    Running = 1,
    /// No switchover happened there: the guest is the source's again.
    NotSwitched = 2,
    /// Every page is there: only the completion exchange is left.
    Complete = 3,
}

impl ResumeState {
    fn from_u8(v: u8) -> Option<ResumeState> {
        match v {
            1 => Some(ResumeState::Running),
            2 => Some(ResumeState::NotSwitched),
            3 => Some(ResumeState::Complete),
            _ => None,
        }
    }
}

/// First message of the control connection, destination to source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHello {
    /// Oldest version spoken.
    pub min_version: u16,
    /// Newest version spoken.
    pub max_version: u16,
    /// `SERVER_FLAG_*` bits.
    pub flags: u32,
    /// Random challenge for the MAC.
    pub nonce: [u8; NONCE_LEN],
}

/// The source's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Chosen protocol version.
    pub version: u16,
    /// What the guest is.
    pub guest_kind: GuestKind,
    /// Migration mode.
    pub mode: Mode,
    /// Requested feature bits.
    pub features: u64,
    /// Guest page size.
    pub page_size: PageSize,
    /// Pages per fault the source asks the destination to request (0: the
    /// destination decides).
    pub prefetch_pages: u32,
    /// Whether that window is centered on the fault (else after it).
    pub prefetch_around: bool,
    /// Guest regions (at most `MAX_REGIONS`).
    pub regions: Vec<RegionDesc>,
    /// HMAC over the nonce and the rest of the body, or zeros.
    pub mac: [u8; MAC_LEN],
}

/// Source's figures, sent with the completion acknowledgement so that the
/// destination's report holds the whole migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Pause on the source to SwitchoverAck received.
    pub downtime_ns: u64,
    /// Pause to the last byte of state and outstanding set written.
    pub pause_to_sent_ns: u64,
    /// Bytes the source wrote, both connections.
    pub bytes_sent: u64,
    /// Pages sent by the background push.
    pub pages_pushed: u64,
    /// Pages sent in answer to requests.
    pub pages_demand: u64,
    /// Range requests served.
    pub requests: u64,
    /// First push frame to PushDone written (0 if the push had not ended).
    pub push_ns: u64,
}

/// Destination's timing of its part of the downtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumeTimes {
    /// Restoring the guest state.
    pub restore_ns: u64,
    /// Evicting outstanding pages it held from precopy.
    pub evict_ns: u64,
    /// Registering/arming userfaultfd and resuming the guest.
    pub arm_ns: u64,
}

/// The ranges of a request, decoded lazily (validated at decode time, so
/// iteration cannot fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeList<'a>(&'a [u8]);

impl<'a> RangeList<'a> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.0.len() / 12
    }

    /// Whether there are none (never true for a decoded request).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + 'a {
        self.0.chunks_exact(12).map(|c| {
            let first = u64::from_le_bytes(c[0..8].try_into().expect("8 bytes"));
            let n = u32::from_le_bytes(c[8..12].try_into().expect("4 bytes"));
            PageRange::new(PageIdx(first), u64::from(n))
        })
    }
}

/// Bitmap words of an Outstanding frame, decoded lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordList<'a>(&'a [u8]);

impl<'a> WordList<'a> {
    /// Number of words.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The words in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
    }
}

/// One decoded message. Variable-length parts borrow the frame's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// See module doc.
    ServerHello(ServerHello),
    /// See module doc.
    Hello(Hello),
    /// See module doc.
    HelloAck {
        /// Session cookie the bulk connection must present.
        session: u64,
        /// Accepted features.
        features: u64,
    },
    /// See module doc.
    BulkHello {
        /// Protocol version.
        version: u16,
        /// Session cookie from HelloAck.
        session: u64,
    },
    /// See module doc.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable reason.
        message: &'a str,
    },
    /// See module doc.
    KeepAlive,
    /// See module doc.
    GuestState(&'a [u8]),
    /// See module doc.
    Outstanding {
        /// Index of the first bitmap word carried.
        first_word: u64,
        /// The words.
        words: WordList<'a>,
    },
    /// See module doc.
    Switchover {
        /// Pages outstanding in total.
        n_outstanding: u64,
        /// Precopy rounds sent before it on the bulk connection.
        precopy_rounds: u32,
    },
    /// See module doc.
    SwitchoverAck(ResumeTimes),
    /// See module doc.
    RangeRequest {
        /// Request id, echoed nowhere; for tracing.
        req_id: u32,
        /// Ranges asked for.
        ranges: RangeList<'a>,
    },
    /// See module doc.
    Pages {
        /// First page.
        first: PageIdx,
        /// Pages in the run.
        n_pages: u32,
        /// Why they were sent.
        kind: PageKind,
        /// `n_pages * page_size` bytes.
        data: &'a [u8],
    },
    /// See module doc.
    PushDone {
        /// Pages the push sent.
        n_pushed: u64,
    },
    /// See module doc.
    Complete {
        /// Pages the destination holds.
        n_present: u64,
    },
    /// See module doc.
    CompleteAck(SourceStats),
    /// See module doc.
    PrecopyRound {
        /// Round number, from 0.
        round: u32,
        /// Pages sent in the round.
        n_pages: u64,
    },
    /// See module doc.
    Resume {
        /// Protocol version.
        version: u16,
        /// Session cookie from the first HelloAck.
        session: u64,
        /// HMAC over the nonce and the body, or zeros.
        mac: [u8; MAC_LEN],
    },
    /// See module doc.
    Have {
        /// Index of the first bitmap word carried.
        first_word: u64,
        /// The words.
        words: WordList<'a>,
    },
    /// See module doc.
    ResumeAck {
        /// What the destination's side of the session is.
        state: ResumeState,
        /// Pages the Have bitmap names.
        n_have: u64,
    },
}

/// Little-endian cursor over a body; every read is bounds-checked.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Rd { b, at: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let have = self.b.len() - self.at;
        if have < n {
            return Err(DecodeError::Truncated { what: self.what, need: self.at + n, have: self.b.len() });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }

    /// The body must be used up exactly.
    fn finish(&self, tag: Tag) -> Result<(), DecodeError> {
        if self.at != self.b.len() {
            return Err(DecodeError::LengthMismatch { tag, len: self.b.len(), expected: self.at as u64 });
        }
        Ok(())
    }
}

fn check_magic(rd: &mut Rd<'_>) -> Result<(), DecodeError> {
    let m = rd.u32()?;
    if m != MAGIC {
        return Err(DecodeError::BadMagic(m));
    }
    Ok(())
}

/// Decode the body of a frame whose header was decoded (and length-checked) as
/// `h`. `page_size` is the negotiated page size, if known yet.
pub fn decode<'a>(h: FrameHeader, body: &'a [u8], page_size: Option<PageSize>) -> Result<Msg<'a>, DecodeError> {
    if body.len() != h.body_len as usize {
        return Err(DecodeError::LengthMismatch { tag: h.tag, len: body.len(), expected: u64::from(h.body_len) });
    }
    let tag = h.tag;
    let mut rd = Rd::new(body, "message body");
    let msg = match tag {
        Tag::ServerHello => {
            check_magic(&mut rd)?;
            let min_version = rd.u16()?;
            let max_version = rd.u16()?;
            let flags = rd.u32()?;
            let nonce = rd.array::<NONCE_LEN>()?;
            if min_version == 0 || min_version > max_version {
                return Err(DecodeError::Invalid { tag, field: "version range", value: u64::from(min_version) });
            }
            if flags & !SERVER_FLAG_AUTH_REQUIRED != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::ServerHello(ServerHello { min_version, max_version, flags, nonce })
        }
        Tag::Hello => {
            check_magic(&mut rd)?;
            let version = rd.u16()?;
            let kind = rd.u8()?;
            let guest_kind = GuestKind::from_u8(kind).ok_or(DecodeError::Invalid {
                tag,
                field: "guest_kind",
                value: kind.into(),
            })?;
            let m = rd.u8()?;
            let mode = Mode::from_u8(m).ok_or(DecodeError::Invalid { tag, field: "mode", value: m.into() })?;
            let features = rd.u64()?;
            let ps = rd.u32()?;
            let page_size = PageSize::from_bytes(u64::from(ps)).ok_or(DecodeError::Invalid {
                tag,
                field: "page_size",
                value: ps.into(),
            })?;
            let n = rd.u16()?;
            if usize::from(n) > crate::types::MAX_REGIONS || n == 0 {
                return Err(DecodeError::Invalid { tag, field: "n_regions", value: n.into() });
            }
            if rd.u16()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            let prefetch_pages = rd.u32()?;
            let pm = rd.u8()?;
            if pm > 1 {
                return Err(DecodeError::Invalid { tag, field: "prefetch_mode", value: pm.into() });
            }
            if rd.array::<3>()? != [0; 3] {
                return Err(DecodeError::Reserved(tag));
            }
            let mut regions = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                regions.push(RegionDesc { guest: GuestOffset(rd.u64()?), len_bytes: rd.u64()? });
            }
            let mac = rd.array::<MAC_LEN>()?;
            Msg::Hello(Hello {
                version,
                guest_kind,
                mode,
                features,
                page_size,
                prefetch_pages,
                prefetch_around: pm == 1,
                regions,
                mac,
            })
        }
        Tag::HelloAck => Msg::HelloAck { session: rd.u64()?, features: rd.u64()? },
        Tag::BulkHello => {
            check_magic(&mut rd)?;
            let version = rd.u16()?;
            if rd.u16()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::BulkHello { version, session: rd.u64()? }
        }
        Tag::Error => {
            let code = ErrorCode::from_u16(rd.u16()?);
            let len = rd.u16()?;
            if len > MAX_ERROR_LEN {
                return Err(DecodeError::Invalid { tag, field: "message length", value: len.into() });
            }
            let bytes = rd.take(usize::from(len))?;
            // A peer's bad UTF-8 must not hide its error: keep the valid prefix.
            let message = match std::str::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid prefix"),
            };
            Msg::Error { code, message }
        }
        Tag::KeepAlive => Msg::KeepAlive,
        Tag::GuestState => Msg::GuestState(rd.rest()),
        Tag::Outstanding | Tag::Have => {
            let first_word = rd.u64()?;
            let rest = rd.rest();
            if !rest.len().is_multiple_of(8) || rest.is_empty() {
                return Err(DecodeError::LengthMismatch {
                    tag,
                    len: body.len(),
                    expected: 8 + (rest.len() as u64 / 8 + 1) * 8,
                });
            }
            if tag == Tag::Have {
                Msg::Have { first_word, words: WordList(rest) }
            } else {
                Msg::Outstanding { first_word, words: WordList(rest) }
            }
        }
        Tag::Switchover => {
            let n_outstanding = rd.u64()?;
            let precopy_rounds = rd.u32()?;
            if rd.u32()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::Switchover { n_outstanding, precopy_rounds }
        }
        Tag::SwitchoverAck => {
            Msg::SwitchoverAck(ResumeTimes { restore_ns: rd.u64()?, evict_ns: rd.u64()?, arm_ns: rd.u64()? })
        }
        Tag::RangeRequest => {
            let req_id = rd.u32()?;
            let n = rd.u32()?;
            if n == 0 || n > MAX_REQUEST_RANGES {
                return Err(DecodeError::Invalid { tag, field: "n_ranges", value: n.into() });
            }
            let raw = rd.take(n as usize * 12)?;
            let list = RangeList(raw);
            if list.iter().any(|r| r.n_pages == 0) {
                return Err(DecodeError::Invalid { tag, field: "range n_pages", value: 0 });
            }
            Msg::RangeRequest { req_id, ranges: list }
        }
        Tag::Pages => {
            let (first, n_pages, kind, data_len) = read_pages_prefix(&mut rd, page_size)?;
            let data = rd.rest();
            if data.len() as u64 != data_len {
                return Err(DecodeError::LengthMismatch {
                    tag,
                    len: body.len(),
                    expected: PAGES_PREFIX_LEN as u64 + data_len,
                });
            }
            Msg::Pages { first, n_pages, kind, data }
        }
        Tag::PushDone => Msg::PushDone { n_pushed: rd.u64()? },
        Tag::Complete => Msg::Complete { n_present: rd.u64()? },
        Tag::CompleteAck => Msg::CompleteAck(SourceStats {
            downtime_ns: rd.u64()?,
            pause_to_sent_ns: rd.u64()?,
            bytes_sent: rd.u64()?,
            pages_pushed: rd.u64()?,
            pages_demand: rd.u64()?,
            requests: rd.u64()?,
            push_ns: rd.u64()?,
        }),
        Tag::PrecopyRound => {
            let round = rd.u32()?;
            if rd.u32()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::PrecopyRound { round, n_pages: rd.u64()? }
        }
        Tag::Resume => {
            check_magic(&mut rd)?;
            let version = rd.u16()?;
            if rd.u16()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            let session = rd.u64()?;
            Msg::Resume { version, session, mac: rd.array::<MAC_LEN>()? }
        }
        Tag::ResumeAck => {
            let st = rd.u8()?;
            let state =
                ResumeState::from_u8(st).ok_or(DecodeError::Invalid { tag, field: "state", value: st.into() })?;
            if rd.array::<7>()? != [0; 7] {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::ResumeAck { state, n_have: rd.u64()? }
        }
    };
    rd.finish(tag)?;
    Ok(msg)
}

/// Read and check a Pages frame's fixed prefix: first page, count, kind,
/// reserved bytes; returns them with the data length they imply.
fn read_pages_prefix(
    rd: &mut Rd<'_>,
    page_size: Option<PageSize>,
) -> Result<(PageIdx, u32, PageKind, u64), DecodeError> {
    let tag = Tag::Pages;
    let page_size = page_size.ok_or(DecodeError::NoPageSize)?;
    let first = PageIdx(rd.u64()?);
    let n_pages = rd.u32()?;
    let k = rd.u8()?;
    let kind = PageKind::from_u8(k).ok_or(DecodeError::Invalid { tag, field: "kind", value: k.into() })?;
    if rd.array::<3>()? != [0; 3] {
        return Err(DecodeError::Reserved(tag));
    }
    let data_len = u64::from(n_pages) * page_size.bytes();
    if n_pages == 0 || data_len > MAX_RUN_BYTES {
        return Err(DecodeError::Invalid { tag, field: "n_pages", value: n_pages.into() });
    }
    Ok((first, n_pages, kind, data_len))
}

/// Decode the fixed prefix of a Pages frame (the 16 bytes after the header),
/// checking it against the header's length: what a receiver needs to decide
/// where the data goes before reading it.
pub fn decode_pages_prefix(
    h: FrameHeader,
    prefix: &[u8],
    page_size: Option<PageSize>,
) -> Result<(PageIdx, u32, PageKind), DecodeError> {
    debug_assert_eq!(h.tag, Tag::Pages);
    let tag = Tag::Pages;
    let mut rd = Rd::new(prefix, "pages prefix");
    let (first, n_pages, kind, data_len) = read_pages_prefix(&mut rd, page_size)?;
    if u64::from(h.body_len) != PAGES_PREFIX_LEN as u64 + data_len {
        return Err(DecodeError::LengthMismatch {
            tag,
            len: h.body_len as usize,
            expected: PAGES_PREFIX_LEN as u64 + data_len,
        });
    }
    Ok((first, n_pages, kind))
}

/// Decode one whole frame from the front of `buf`: `Ok(None)` if more bytes
/// are needed, else the message and the frame's length.
pub fn decode_frame(buf: &[u8], page_size: Option<PageSize>) -> Result<Option<(Msg<'_>, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = FrameHeader::decode(buf)?;
    let len = h.frame_len();
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some((decode(h, &buf[HEADER_LEN..len], page_size)?, len)))
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Length as the u32 a header holds. Callers build bodies within the tag's
/// maximum, which is below `u32::MAX`.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("body length within frame limits")
}

/// The Hello body without its MAC: what the MAC covers.
pub fn hello_mac_input(h: &Hello) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + 16 * h.regions.len());
    put_u32(&mut out, MAGIC);
    put_u16(&mut out, h.version);
    out.push(h.guest_kind as u8);
    out.push(h.mode as u8);
    put_u64(&mut out, h.features);
    put_u32(&mut out, len_u32(h.page_size.bytes_usize()));
    put_u16(&mut out, u16::try_from(h.regions.len()).expect("regions bounded by MAX_REGIONS"));
    put_u16(&mut out, 0);
    put_u32(&mut out, h.prefetch_pages);
    out.extend_from_slice(&[u8::from(h.prefetch_around), 0, 0, 0]);
    for r in &h.regions {
        put_u64(&mut out, r.guest.0);
        put_u64(&mut out, r.len_bytes);
    }
    out
}

/// The Resume body without its MAC: what the MAC covers.
pub fn resume_mac_input(version: u16, session: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&version.to_le_bytes());
    out[8..16].copy_from_slice(&session.to_le_bytes());
    out
}

/// The header and fixed prefix of a Pages frame whose data follows separately
/// (gathered straight from guest memory with `writev`).
pub fn pages_prefix(
    first: PageIdx,
    n_pages: u32,
    kind: PageKind,
    page_size: PageSize,
) -> [u8; HEADER_LEN + PAGES_PREFIX_LEN] {
    let data_len = u64::from(n_pages) * page_size.bytes();
    debug_assert!(n_pages > 0 && data_len <= MAX_RUN_BYTES);
    let body_len = u32::try_from(PAGES_PREFIX_LEN as u64 + data_len).expect("run within MAX_RUN_BYTES");
    let mut out = [0u8; HEADER_LEN + PAGES_PREFIX_LEN];
    out[..HEADER_LEN].copy_from_slice(&FrameHeader::encode(Tag::Pages, body_len));
    out[8..16].copy_from_slice(&first.0.to_le_bytes());
    out[16..20].copy_from_slice(&n_pages.to_le_bytes());
    out[20] = kind as u8;
    out
}

impl Msg<'_> {
    /// The message's tag.
    pub fn tag(&self) -> Tag {
        match self {
            Msg::ServerHello(_) => Tag::ServerHello,
            Msg::Hello(_) => Tag::Hello,
            Msg::HelloAck { .. } => Tag::HelloAck,
            Msg::BulkHello { .. } => Tag::BulkHello,
            Msg::Error { .. } => Tag::Error,
            Msg::KeepAlive => Tag::KeepAlive,
            Msg::GuestState(_) => Tag::GuestState,
            Msg::Outstanding { .. } => Tag::Outstanding,
            Msg::Switchover { .. } => Tag::Switchover,
            Msg::SwitchoverAck(_) => Tag::SwitchoverAck,
            Msg::RangeRequest { .. } => Tag::RangeRequest,
            Msg::Pages { .. } => Tag::Pages,
            Msg::PushDone { .. } => Tag::PushDone,
            Msg::Complete { .. } => Tag::Complete,
            Msg::CompleteAck(_) => Tag::CompleteAck,
            Msg::PrecopyRound { .. } => Tag::PrecopyRound,
            Msg::Resume { .. } => Tag::Resume,
            Msg::Have { .. } => Tag::Have,
            Msg::ResumeAck { .. } => Tag::ResumeAck,
        }
    }

    /// Append the whole frame (header and body) to `out`.
    ///
    /// The message must be within the limits `decode` enforces (callers build
    /// messages from validated state); this is checked in debug builds by the
    /// round-trip tests, not at run time.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        match self {
            Msg::ServerHello(s) => {
                put_u32(out, MAGIC);
                put_u16(out, s.min_version);
                put_u16(out, s.max_version);
                put_u32(out, s.flags);
                out.extend_from_slice(&s.nonce);
            }
            Msg::Hello(h) => {
                out.extend_from_slice(&hello_mac_input(h));
                out.extend_from_slice(&h.mac);
            }
            Msg::HelloAck { session, features } => {
                put_u64(out, *session);
                put_u64(out, *features);
            }
            Msg::BulkHello { version, session } => {
                put_u32(out, MAGIC);
                put_u16(out, *version);
                put_u16(out, 0);
                put_u64(out, *session);
            }
            Msg::Error { code, message } => {
                // Truncate on a char boundary to the limit.
                let mut end = message.len().min(usize::from(MAX_ERROR_LEN));
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_u16(out, *code as u16);
                put_u16(out, u16::try_from(end).expect("bounded by MAX_ERROR_LEN"));
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
            Msg::KeepAlive => {}
            Msg::GuestState(b) => out.extend_from_slice(b),
            Msg::Outstanding { first_word, words } | Msg::Have { first_word, words } => {
                put_u64(out, *first_word);
                out.extend_from_slice(words.0);
            }
            Msg::Switchover { n_outstanding, precopy_rounds } => {
                put_u64(out, *n_outstanding);
                put_u32(out, *precopy_rounds);
                put_u32(out, 0);
            }
            Msg::SwitchoverAck(t) => {
                put_u64(out, t.restore_ns);
                put_u64(out, t.evict_ns);
                put_u64(out, t.arm_ns);
            }
            Msg::RangeRequest { req_id, ranges } => {
                put_u32(out, *req_id);
                put_u32(out, len_u32(ranges.len()));
                out.extend_from_slice(ranges.0);
            }
            Msg::Pages { first, n_pages, kind, data } => {
                put_u64(out, first.0);
                put_u32(out, *n_pages);
                out.extend_from_slice(&[*kind as u8, 0, 0, 0]);
                out.extend_from_slice(data);
            }
            Msg::PushDone { n_pushed } => put_u64(out, *n_pushed),
            Msg::Complete { n_present } => put_u64(out, *n_present),
            Msg::CompleteAck(s) => {
                for v in [
                    s.downtime_ns,
                    s.pause_to_sent_ns,
                    s.bytes_sent,
                    s.pages_pushed,
                    s.pages_demand,
                    s.requests,
                    s.push_ns,
                ] {
                    put_u64(out, v);
                }
            }
            Msg::PrecopyRound { round, n_pages } => {
                put_u32(out, *round);
                put_u32(out, 0);
                put_u64(out, *n_pages);
            }
            Msg::Resume { version, session, mac } => {
                out.extend_from_slice(&resume_mac_input(*version, *session));
                out.extend_from_slice(mac);
            }
            Msg::ResumeAck { state, n_have } => {
                out.extend_from_slice(&[*state as u8, 0, 0, 0, 0, 0, 0, 0]);
                put_u64(out, *n_have);
            }
        }
        let body_len = len_u32(out.len() - start - HEADER_LEN);
        out[start..start + HEADER_LEN].copy_from_slice(&FrameHeader::encode(self.tag(), body_len));
    }

    /// The whole frame as a new vector.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Encode ranges into the byte form a [`RangeList`] borrows. At most
/// [`MAX_REQUEST_RANGES`] ranges, each of 1..=u32::MAX pages.
pub fn encode_ranges(ranges: &[PageRange], out: &mut Vec<u8>) {
    for r in ranges {
        put_u64(out, r.first.0);
        put_u32(out, u32::try_from(r.n_pages).expect("range length fits u32"));
    }
}

/// Borrow encoded ranges as a list (for building a RangeRequest).
pub fn range_list(bytes: &[u8]) -> RangeList<'_> {
    debug_assert_eq!(bytes.len() % 12, 0);
    RangeList(bytes)
}

/// Encode bitmap words into the byte form a [`WordList`] borrows.
pub fn encode_words(words: &[u64], out: &mut Vec<u8>) {
    for w in words {
        put_u64(out, *w);
    }
}

/// A page bitmap's words in chunks of at most [`MAX_OUTSTANDING_WORDS`]
/// (one Outstanding or Have frame each) with the index of each chunk's first
/// word, skipping chunks that are all zero.
pub fn bitmap_chunks(words: &[u64]) -> impl Iterator<Item = (u64, &[u64])> {
    words
        .chunks(MAX_OUTSTANDING_WORDS as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|w| *w != 0))
        .map(|(i, c)| (i as u64 * u64::from(MAX_OUTSTANDING_WORDS), c))
}

/// Borrow encoded words as a list (for building an Outstanding message).
pub fn word_list(bytes: &[u8]) -> WordList<'_> {
    debug_assert_eq!(bytes.len() % 8, 0);
    WordList(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        if frame.len() > HEADER_LEN && m.tag() != Tag::GuestState {
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
            Msg::BulkHello { version: 1, session: 42 },
            Msg::Error { code: ErrorCode::Auth, message: "bad key: é" },
            Msg::KeepAlive,
            Msg::GuestState(b"state bytes"),
            Msg::Outstanding { first_word: 17, words: word_list(&wb) },
            Msg::Switchover { n_outstanding: 12345, precopy_rounds: 3 },
            Msg::SwitchoverAck(ResumeTimes { restore_ns: 1, evict_ns: 2, arm_ns: 3 }),
            Msg::RangeRequest { req_id: 9, ranges: range_list(&rb) },
            Msg::Pages { first: PageIdx(77), n_pages: 2, kind: PageKind::Demand, data: &data },
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
        assert_eq!(seen.len(), 19, "a message type lacks a round-trip case");
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
        let mut f =
            Msg::ServerHello(ServerHello { min_version: 1, max_version: 1, flags: 0, nonce: [0; 16] }).to_frame();
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
        fn decode_never_panics_with_valid_header(tag in 1u8..=19, body in proptest::collection::vec(any::<u8>(), 0..200)) {
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
}
