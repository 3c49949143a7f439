//! Message bodies: the decoded form of every message type, decoding from a
//! frame's body and encoding back. Layouts are in the module doc of `wire`.

use crate::types::{GuestOffset, PageIdx, PageRange, PageSize, RegionDesc};

use super::frame::*;

/// What runs in the guest: the pager and sender do not care, the two ends must agree.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKind {
    /// Threads in the process touching memory.
    Workload = 1,
    /// A KVM virtual machine.
    Vm = 2,
    /// A VMM's snapshot memory file (`source --memory-file`): regions'
    /// guest offsets are their places in the file, the guest state is
    /// empty, and the destination serves a VMM that restores its own vCPUs
    /// (`dest --vmm-uffd-socket`).
    Snapshot = 3,
}

impl GuestKind {
    fn from_u8(v: u8) -> Option<GuestKind> {
        match v {
            1 => Some(GuestKind::Workload),
            2 => Some(GuestKind::Vm),
            3 => Some(GuestKind::Snapshot),
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
    pub(crate) fn from_u8(v: u8) -> Option<PageKind> {
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
    /// The destination's opening: versions it speaks, whether it wants a key, the nonce.
    ServerHello(ServerHello),
    /// The source's offer: version, guest kind, mode, features, page size, regions, MAC.
    Hello(Hello),
    /// The hello accepted: the session cookie and the accepted features.
    HelloAck {
        /// Session cookie the bulk connection must present.
        session: u64,
        /// Accepted features.
        features: u64,
    },
    /// The first frame of the bulk connection, binding it to the session.
    BulkHello {
        /// Protocol version.
        version: u16,
        /// Session cookie from HelloAck.
        session: u64,
        /// How many bulk connections the source opens on this link (0
        /// and 1 both mean one: the field was reserved, zero, before).
        streams: u16,
    },
    /// Why the sender stops; it closes after this.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable reason.
        message: &'a str,
    },
    /// Nothing but proof of life.
    KeepAlive,
    /// The paused guest's opaque state.
    GuestState(&'a [u8]),
    /// RDMA setup (offer or answer, then a MAC): opaque here, decoded by
    /// the `rdma` crate.
    RdmaSetup(&'a [u8]),
    /// A piece of the outstanding-page bitmap.
    Outstanding {
        /// Index of the first bitmap word carried.
        first_word: u64,
        /// The words.
        words: WordList<'a>,
    },
    /// The guest is committed to move: its state and outstanding set are complete.
    Switchover {
        /// Pages outstanding in total.
        n_outstanding: u64,
        /// Precopy rounds sent before it on the bulk connection.
        precopy_rounds: u32,
    },
    /// The guest runs on the destination now.
    SwitchoverAck(ResumeTimes),
    /// Page ranges the destination wants, faulting pages first.
    RangeRequest {
        /// Request id, echoed nowhere; for tracing.
        req_id: u32,
        /// Ranges asked for.
        ranges: RangeList<'a>,
    },
    /// A run of pages: demand reply, push or precopy.
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
    /// A run of pages that are all zero, sent without their data
    /// (`FEATURE_ZEROS`).
    Zeros {
        /// First page.
        first: PageIdx,
        /// Pages in the run.
        n_pages: u32,
        /// Why they were sent.
        kind: PageKind,
    },
    /// The background push sent everything it had.
    PushDone {
        /// Pages the push sent.
        n_pushed: u64,
    },
    /// The destination holds every page.
    Complete {
        /// Pages the destination holds.
        n_present: u64,
    },
    /// The source's figures; it may release the guest now.
    CompleteAck(SourceStats),
    /// The end of a precopy round.
    PrecopyRound {
        /// Round number, from 0.
        round: u32,
        /// Pages sent in the round.
        n_pages: u64,
    },
    /// A reconnecting source's answer to the server hello (recovery).
    Resume {
        /// Protocol version.
        version: u16,
        /// Session cookie from the first HelloAck.
        session: u64,
        /// HMAC over the nonce and the body, or zeros.
        mac: [u8; MAC_LEN],
    },
    /// A piece of the bitmap of pages the destination holds (recovery).
    Have {
        /// Index of the first bitmap word carried.
        first_word: u64,
        /// The words.
        words: WordList<'a>,
    },
    /// Where the destination stands after a reconnection (recovery).
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
            let streams = rd.u16()?;
            if streams > MAX_STREAMS {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::BulkHello { version, session: rd.u64()?, streams }
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
        Tag::RdmaSetup => Msg::RdmaSetup(rd.rest()),
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
            let t = ResumeTimes { restore_ns: rd.u64()?, evict_ns: rd.u64()? };
            // Once `arm_ns`, always 0 (memory is registered before the
            // hello is acknowledged): reserved now, kept for the layout.
            if rd.u64()? != 0 {
                return Err(DecodeError::Reserved(tag));
            }
            Msg::SwitchoverAck(t)
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
            let (first, n_pages, kind, data_len) = read_pages_prefix(&mut rd, page_size, Tag::Pages)?;
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
        Tag::Zeros => {
            let (first, n_pages, kind, _) = read_pages_prefix(&mut rd, page_size, Tag::Zeros)?;
            Msg::Zeros { first, n_pages, kind }
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
    tag: Tag,
) -> Result<(PageIdx, u32, PageKind, u64), DecodeError> {
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
    let (first, n_pages, kind, data_len) = read_pages_prefix(&mut rd, page_size, Tag::Pages)?;
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
/// (gathered straight from guest memory with `writev`). The one writer of a
/// Pages prefix: `Msg::encode` uses it too.
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
    out[HEADER_LEN..].copy_from_slice(&pages_body_prefix(first, n_pages, kind));
    out
}

/// A Pages body's fixed prefix: first u64, n_pages u32, kind u8, reserved [3].
fn pages_body_prefix(first: PageIdx, n_pages: u32, kind: PageKind) -> [u8; PAGES_PREFIX_LEN] {
    let mut p = [0u8; PAGES_PREFIX_LEN];
    p[0..8].copy_from_slice(&first.0.to_le_bytes());
    p[8..12].copy_from_slice(&n_pages.to_le_bytes());
    p[12] = kind as u8;
    p
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
            Msg::RdmaSetup(_) => Tag::RdmaSetup,
            Msg::Outstanding { .. } => Tag::Outstanding,
            Msg::Switchover { .. } => Tag::Switchover,
            Msg::SwitchoverAck(_) => Tag::SwitchoverAck,
            Msg::RangeRequest { .. } => Tag::RangeRequest,
            Msg::Pages { .. } => Tag::Pages,
            Msg::Zeros { .. } => Tag::Zeros,
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
            Msg::BulkHello { version, session, streams } => {
                put_u32(out, MAGIC);
                put_u16(out, *version);
                put_u16(out, *streams);
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
            Msg::GuestState(b) | Msg::RdmaSetup(b) => out.extend_from_slice(b),
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
                put_u64(out, 0);
            }
            Msg::RangeRequest { req_id, ranges } => {
                put_u32(out, *req_id);
                put_u32(out, len_u32(ranges.len()));
                out.extend_from_slice(ranges.0);
            }
            Msg::Pages { first, n_pages, kind, data } => {
                out.extend_from_slice(&pages_body_prefix(*first, *n_pages, *kind));
                out.extend_from_slice(data);
            }
            Msg::Zeros { first, n_pages, kind } => out.extend_from_slice(&pages_body_prefix(*first, *n_pages, *kind)),
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
