//! Sans-IO session state machines: which message is legal when, handshake
//! negotiation and the range checks that keep a peer's indices inside the
//! guest. The drivers (pager, sender) feed every received message through
//! `on_recv` before acting on it, so a peer cannot make them act on a message
//! out of sequence or on a page outside the layout.
//!
//! Phases of the control connection, destination view:
//!
//! ```text
//! AwaitHello --Hello--> PreSwitchover --Switchover--> Postcopy --(Complete sent)--> Completing --CompleteAck--> Done
//!               GuestState, Outstanding*  RangeRequest out, Pages(demand) in
//! ```
//!
//! The source's view mirrors it. The bulk connection has its own small
//! machine ([`DestBulk`]).
//!
//! Recovery (when `FEATURE_RECOVERY` is negotiated): after a connection
//! breaks, the source's machine goes to *reconnecting* ([`SourceSession::on_link_lost`])
//! and answers the next ServerHello with a Resume bound to the session (and
//! to the key); the destination checks it with [`DestSession::on_resume`]
//! and answers with what it holds and a [`ResumeState`]. A destination that
//! answered `NotSwitched` never resumes the guest afterwards: the source has
//! taken it back.

use crate::auth;
use crate::bitmap::PageBitmap;
use crate::types::{LayoutError, MemLayout, PageIdx, PageRange, PageSize};
use crate::wire::{
    ErrorCode, FEATURE_RDMA, FEATURE_RECOVERY, FEATURE_ZEROS, GuestKind, Hello, MAC_LEN, Mode, Msg, NONCE_LEN,
    PageKind, ResumeState, SERVER_FLAG_AUTH_REQUIRED, ServerHello, SourceStats, Tag, VERSION, WordList,
    hello_mac_input, resume_mac_input,
};

/// Oldest protocol version this build accepts.
pub const MIN_VERSION: u16 = 1;

/// Feature bits this build understands.
pub const SUPPORTED_FEATURES: u64 = FEATURE_RECOVERY | FEATURE_ZEROS | FEATURE_RDMA;

/// A message was illegal for the session, or the peer reported an error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// The message is not legal in the current phase.
    #[error("unexpected {tag:?} while {phase}")]
    Unexpected {
        /// What arrived.
        tag: Tag,
        /// Where we were.
        phase: &'static str,
    },
    /// No protocol version in common.
    #[error("peer speaks protocol versions {min}..={max}, this build speaks {MIN_VERSION}..={VERSION}")]
    Version {
        /// Peer's oldest.
        min: u16,
        /// Peer's newest.
        max: u16,
    },
    /// The hello was not authenticated.
    #[error("hello not authenticated: {0}")]
    Auth(&'static str),
    /// The peers disagree about the guest.
    #[error("peer's guest does not match ours: {0}")]
    Mismatch(String),
    /// The guest is larger than the destination accepts.
    #[error("guest of {bytes} bytes exceeds the {max_bytes} bytes this destination accepts")]
    TooLarge {
        /// What the hello announced.
        bytes: u64,
        /// The destination's limit.
        max_bytes: u64,
    },
    /// The layout named in the hello is invalid.
    #[error("peer sent an invalid memory layout")]
    Layout(#[from] LayoutError),
    /// Page indices outside the guest.
    #[error("{what} names pages {first}..+{n_pages}, guest has {n_pages_total} pages")]
    OutOfRange {
        /// Which message.
        what: &'static str,
        /// First page.
        first: u64,
        /// Count.
        n_pages: u64,
        /// Pages in the guest.
        n_pages_total: u64,
    },
    /// A count the peer stated disagrees with what it sent.
    #[error("{what}: peer said {said}, sent {sent}")]
    Count {
        /// What was counted.
        what: &'static str,
        /// Stated.
        said: u64,
        /// Observed.
        sent: u64,
    },
    /// The peer reported an error and will close.
    #[error("peer reported {code:?} error: {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

impl SessionError {
    /// The code to send the peer when we fail with this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Version { .. } => ErrorCode::Version,
            SessionError::Auth(_) => ErrorCode::Auth,
            SessionError::Mismatch(_) | SessionError::Layout(_) => ErrorCode::Mismatch,
            SessionError::TooLarge { .. } => ErrorCode::Capacity,
            SessionError::Peer { code, .. } => *code,
            _ => ErrorCode::Protocol,
        }
    }
}

fn peer_error(msg: &Msg<'_>) -> Option<SessionError> {
    match msg {
        Msg::Error { code, message } => Some(SessionError::Peer { code: *code, message: (*message).to_string() }),
        _ => None,
    }
}

/// Load a peer's bitmap words into `bm`, refusing words past its end.
fn load_words(
    bm: &mut PageBitmap,
    what: &'static str,
    first_word: u64,
    words: &WordList<'_>,
) -> Result<(), SessionError> {
    let buf: Vec<u64> = words.iter().collect();
    if usize::try_from(first_word).is_ok_and(|w| bm.load_words(w, &buf)) {
        Ok(())
    } else {
        Err(SessionError::OutOfRange {
            what,
            first: first_word.saturating_mul(64),
            n_pages: words.len() as u64 * 64,
            n_pages_total: bm.len(),
        })
    }
}

fn check_pages(layout: &MemLayout, what: &'static str, first: PageIdx, n_pages: u64) -> Result<(), SessionError> {
    if layout.contains_range(first, n_pages) {
        Ok(())
    } else {
        Err(SessionError::OutOfRange { what, first: first.0, n_pages, n_pages_total: layout.n_pages() })
    }
}

/// What the destination requires of the source's guest, beyond a valid layout.
#[derive(Clone, Debug, Default)]
pub struct DestExpect {
    /// Pre-shared key; when set, the hello must carry a valid MAC.
    pub key: Option<Vec<u8>>,
    /// Required guest kind, if the destination was told.
    pub guest_kind: Option<GuestKind>,
    /// Required page size, if the destination was told.
    pub page_size: Option<PageSize>,
    /// Required total memory in bytes, if the destination was told.
    pub mem_bytes: Option<u64>,
    /// Most guest memory the destination will allocate, in bytes: checked
    /// on the hello, before anything sized by the peer is allocated.
    pub max_mem_bytes: Option<u64>,
    /// Whether the destination offers post-copy recovery.
    pub recovery: bool,
    /// Whether the destination was started for RDMA: it then requires it.
    pub rdma: bool,
}

/// What the destination accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The guest layout.
    pub layout: MemLayout,
    /// Migration mode.
    pub mode: Mode,
    /// Guest kind.
    pub guest_kind: GuestKind,
    /// Negotiated features.
    pub features: u64,
    /// Negotiated version.
    pub version: u16,
    /// Prefetch window the source asked for (0: the destination decides).
    pub prefetch_pages: u32,
    /// Whether that window is centered on the fault.
    pub prefetch_around: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestPhase {
    AwaitHello,
    PreSwitchover,
    Postcopy,
    Completing,
    Done,
}

impl DestPhase {
    fn name(self) -> &'static str {
        match self {
            DestPhase::AwaitHello => "awaiting hello",
            DestPhase::PreSwitchover => "before switchover",
            DestPhase::Postcopy => "in postcopy",
            DestPhase::Completing => "completing",
            DestPhase::Done => "done",
        }
    }
}

/// What a legal message means to the destination driver.
#[derive(Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// The hello was accepted; answer with `HelloAck` and set up memory.
    Accepted(Accepted),
    /// Store the message's content (state, outstanding words, demand pages).
    Data,
    /// All state and outstanding pages are in: evict, arm, resume, acknowledge.
    SwitchoverReady {
        /// Outstanding pages (all pages in pure postcopy).
        outstanding: PageBitmap,
        /// Precopy rounds the bulk connection must have delivered first.
        precopy_rounds: u32,
    },
    /// A keep-alive; nothing to do but note the peer is alive.
    KeepAlive,
    /// The source acknowledged completion: the run is over.
    Finished(SourceStats),
    /// The source's RDMA offer (`FEATURE_RDMA`, once, before switchover).
    RdmaSetup,
}

/// The destination's control-connection state machine.
#[derive(Debug)]
pub struct DestSession {
    phase: DestPhase,
    expect: DestExpect,
    nonce: [u8; NONCE_LEN],
    session: u64,
    layout: Option<MemLayout>,
    got_state: bool,
    outstanding: Option<PageBitmap>,
    recovery: bool,
    /// Zero runs may come as `Zeros` frames (`FEATURE_ZEROS`).
    zeros: bool,
    /// We told a reconnecting source that no switchover happened here.
    cancelled: bool,
    /// Post-copy pages move by RDMA (`FEATURE_RDMA`).
    rdma: bool,
    rdma_setup_seen: bool,
}

impl DestSession {
    /// A session that will challenge with `nonce` and hand out `session` as the
    /// bulk-connection cookie. Both must be fresh random values.
    pub fn new(expect: DestExpect, nonce: [u8; NONCE_LEN], session: u64) -> Self {
        DestSession {
            phase: DestPhase::AwaitHello,
            expect,
            nonce,
            session,
            layout: None,
            got_state: false,
            outstanding: None,
            zeros: false,
            recovery: false,
            cancelled: false,
            rdma: false,
            rdma_setup_seen: false,
        }
    }

    /// The first message to send.
    pub fn server_hello(&self) -> Msg<'static> {
        self.server_hello_with(self.nonce)
    }

    /// The server hello that challenges a reconnecting source with a fresh
    /// `nonce` (each attempt its own, so a recorded Resume cannot be replayed).
    pub fn server_hello_with(&self, nonce: [u8; NONCE_LEN]) -> Msg<'static> {
        let flags = if self.expect.key.is_some() { SERVER_FLAG_AUTH_REQUIRED } else { 0 };
        Msg::ServerHello(ServerHello { min_version: MIN_VERSION, max_version: VERSION, flags, nonce })
    }

    /// The session cookie.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Whether post-copy pages move by RDMA (`FEATURE_RDMA` negotiated).
    pub fn rdma(&self) -> bool {
        self.rdma
    }

    /// The accepted layout, once the hello is in.
    pub fn layout(&self) -> Option<&MemLayout> {
        self.layout.as_ref()
    }

    fn accept(&self, h: &Hello) -> Result<Accepted, SessionError> {
        if h.version < MIN_VERSION || h.version > VERSION {
            return Err(SessionError::Version { min: h.version, max: h.version });
        }
        if let Some(key) = &self.expect.key {
            if h.mac == [0u8; MAC_LEN] {
                return Err(SessionError::Auth("the destination requires a key and the hello carries none"));
            }
            if !auth::verify_hello_mac(key, &self.nonce, &hello_mac_input(h), &h.mac) {
                return Err(SessionError::Auth("wrong key"));
            }
        }
        let layout = MemLayout::new(h.page_size, h.regions.clone())?;
        if let Some(max_bytes) = self.expect.max_mem_bytes
            && layout.len_bytes() > max_bytes
        {
            return Err(SessionError::TooLarge { bytes: layout.len_bytes(), max_bytes });
        }
        if let Some(k) = self.expect.guest_kind
            && k != h.guest_kind
        {
            return Err(SessionError::Mismatch(format!("guest is {:?}, destination expects {k:?}", h.guest_kind)));
        }
        if let Some(ps) = self.expect.page_size
            && ps != h.page_size
        {
            return Err(SessionError::Mismatch(format!("page size {}, destination expects {ps}", h.page_size)));
        }
        if let Some(bytes) = self.expect.mem_bytes
            && bytes != layout.len_bytes()
        {
            return Err(SessionError::Mismatch(format!(
                "guest has {} bytes, destination expects {bytes}",
                layout.len_bytes()
            )));
        }
        if self.expect.rdma && h.features & FEATURE_RDMA == 0 {
            return Err(SessionError::Mismatch(
                "the destination moves post-copy pages by RDMA (--transport rdma) and the source did not ask for it"
                    .into(),
            ));
        }
        let mut features = h.features & SUPPORTED_FEATURES;
        if !self.expect.recovery {
            features &= !FEATURE_RECOVERY;
        }
        if !self.expect.rdma {
            features &= !FEATURE_RDMA;
        }
        Ok(Accepted {
            layout,
            mode: h.mode,
            guest_kind: h.guest_kind,
            features,
            version: h.version,
            prefetch_pages: h.prefetch_pages,
            prefetch_around: h.prefetch_around,
        })
    }

    /// Check a received message and advance.
    pub fn on_recv(&mut self, msg: &Msg<'_>) -> Result<DestEvent, SessionError> {
        if let Some(e) = peer_error(msg) {
            self.phase = DestPhase::Done;
            return Err(e);
        }
        let unexpected = |phase: DestPhase| SessionError::Unexpected { tag: msg.tag(), phase: phase.name() };
        match (self.phase, msg) {
            (DestPhase::AwaitHello, Msg::Hello(h)) => {
                let a = self.accept(h)?;
                self.recovery = a.features & FEATURE_RECOVERY != 0;
                self.zeros = a.features & FEATURE_ZEROS != 0;
                self.rdma = a.features & FEATURE_RDMA != 0;
                self.outstanding = Some(PageBitmap::new(a.layout.n_pages()));
                self.layout = Some(a.layout.clone());
                self.phase = DestPhase::PreSwitchover;
                Ok(DestEvent::Accepted(a))
            }
            (DestPhase::AwaitHello, _) => Err(unexpected(self.phase)),
            (_, Msg::KeepAlive) => Ok(DestEvent::KeepAlive),
            (DestPhase::PreSwitchover, Msg::RdmaSetup(_)) if self.rdma && !self.rdma_setup_seen => {
                self.rdma_setup_seen = true;
                Ok(DestEvent::RdmaSetup)
            }
            (DestPhase::PreSwitchover, Msg::GuestState(_)) if !self.got_state => {
                self.got_state = true;
                Ok(DestEvent::Data)
            }
            (DestPhase::PreSwitchover, Msg::Outstanding { first_word, words }) => {
                let Some(bm) = self.outstanding.as_mut() else { return Err(unexpected(self.phase)) };
                load_words(bm, "outstanding bitmap", *first_word, words)?;
                Ok(DestEvent::Data)
            }
            (DestPhase::PreSwitchover, Msg::Switchover { n_outstanding, precopy_rounds }) => {
                if !self.got_state {
                    return Err(unexpected(self.phase));
                }
                let Some(bm) = self.outstanding.take() else { return Err(unexpected(self.phase)) };
                let sent = bm.count_ones();
                if sent != *n_outstanding {
                    return Err(SessionError::Count { what: "outstanding pages", said: *n_outstanding, sent });
                }
                self.phase = DestPhase::Postcopy;
                Ok(DestEvent::SwitchoverReady { outstanding: bm, precopy_rounds: *precopy_rounds })
            }
            (
                DestPhase::Postcopy | DestPhase::Completing,
                Msg::Pages { first, n_pages, kind: PageKind::Demand, .. },
            ) => {
                let Some(layout) = self.layout.as_ref() else { return Err(unexpected(self.phase)) };
                check_pages(layout, "demand pages", *first, u64::from(*n_pages))?;
                Ok(DestEvent::Data)
            }
            (DestPhase::Postcopy | DestPhase::Completing, Msg::Zeros { first, n_pages, kind: PageKind::Demand })
                if self.zeros =>
            {
                let Some(layout) = self.layout.as_ref() else { return Err(unexpected(self.phase)) };
                check_pages(layout, "demand zero pages", *first, u64::from(*n_pages))?;
                Ok(DestEvent::Data)
            }
            (DestPhase::Completing, Msg::CompleteAck(s)) => {
                self.phase = DestPhase::Done;
                Ok(DestEvent::Finished(*s))
            }
            (p, _) => Err(unexpected(p)),
        }
    }

    /// We sent Complete; only demand stragglers and CompleteAck may follow.
    pub fn on_complete_sent(&mut self) {
        debug_assert_eq!(self.phase, DestPhase::Postcopy);
        self.phase = DestPhase::Completing;
    }

    /// Whether post-copy recovery was negotiated.
    pub fn recovery(&self) -> bool {
        self.recovery
    }

    /// The guest will not run here (the link broke before it was resumed):
    /// from now on a reconnecting source is told "not switched", and a
    /// Switchover arriving late is refused.
    pub fn cancel(&mut self) {
        self.phase = DestPhase::Done;
        self.cancelled = true;
    }

    /// Whether the source has sent the guest state (it pauses the guest
    /// first): from then on a broken link leaves it in doubt, and it may
    /// come back to ask.
    pub fn got_state(&self) -> bool {
        self.got_state
    }

    /// Check the first message of a reconnecting source, which was
    /// challenged with `nonce`, and say where this side stands. Answering
    /// `NotSwitched` cancels the session here for good.
    pub fn on_resume(&mut self, nonce: &[u8; NONCE_LEN], msg: &Msg<'_>) -> Result<ResumeState, SessionError> {
        if let Some(e) = peer_error(msg) {
            return Err(e);
        }
        let Msg::Resume { version, session, mac } = msg else {
            return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting resume" });
        };
        if !self.recovery || self.phase == DestPhase::AwaitHello {
            return Err(SessionError::Unexpected { tag: Tag::Resume, phase: "without recovery" });
        }
        if *version < MIN_VERSION || *version > VERSION {
            return Err(SessionError::Version { min: *version, max: *version });
        }
        if let Some(key) = &self.expect.key {
            if *mac == [0u8; MAC_LEN] {
                return Err(SessionError::Auth("the destination requires a key and the resume carries none"));
            }
            if !auth::verify_hello_mac(key, nonce, &resume_mac_input(*version, *session), mac) {
                return Err(SessionError::Auth("wrong key"));
            }
        }
        if *session != self.session {
            return Err(SessionError::Auth("resume presented an unknown session"));
        }
        Ok(match self.phase {
            DestPhase::Postcopy => ResumeState::Running,
            DestPhase::Completing => ResumeState::Complete,
            DestPhase::Done if !self.cancelled => ResumeState::Complete,
            DestPhase::AwaitHello | DestPhase::PreSwitchover | DestPhase::Done => {
                self.phase = DestPhase::Done;
                self.cancelled = true;
                ResumeState::NotSwitched
            }
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BulkPhase {
    AwaitHello,
    Streaming,
    Done,
}

/// The destination's bulk-connection state machine.
#[derive(Debug)]
pub struct DestBulk {
    phase: BulkPhase,
    session: u64,
    layout: MemLayout,
    pushed: u64,
    switched: bool,
    /// Bulk connections the source opens on this link (its BulkHello).
    streams: u16,
}

/// What a legal bulk message means.
#[derive(Debug, PartialEq, Eq)]
pub enum BulkEvent {
    /// Connection bound to the session.
    Bound,
    /// Install the pages.
    Pages,
    /// Install a run of zero pages.
    Zeros {
        /// First page.
        first: PageIdx,
        /// Pages.
        n_pages: u32,
        /// Push or precopy.
        kind: PageKind,
    },
    /// A precopy round ended.
    RoundEnd,
    /// The push is over. `lost` pages were announced but never arrived as
    /// push frames (a lossy link or a reconnect): the destination asks for
    /// whatever it still misses.
    PushDone {
        /// Announced minus received.
        lost: u64,
    },
}

impl DestBulk {
    /// How many bulk connections the source said it opens on this link
    /// (known once bound; 1 before).
    pub fn streams(&self) -> u16 {
        self.streams
    }

    /// A bulk machine for the session `session` over `layout`.
    pub fn new(session: u64, layout: MemLayout) -> Self {
        DestBulk { phase: BulkPhase::AwaitHello, session, layout, pushed: 0, switched: false, streams: 1 }
    }

    /// The guest switched over: push pages are legal from now on, precopy pages no longer.
    pub fn on_switchover(&mut self) {
        self.switched = true;
    }

    /// Check a Pages frame from its prefix alone (before its data is read
    /// into guest memory).
    pub fn check_pages(&mut self, first: PageIdx, n_pages: u32, kind: PageKind) -> Result<(), SessionError> {
        let legal = self.phase == BulkPhase::Streaming
            && match kind {
                PageKind::Precopy => !self.switched,
                PageKind::Push => true,
                PageKind::Demand => false,
            };
        if !legal {
            let phase = if self.phase == BulkPhase::Streaming { "streaming" } else { "not streaming" };
            return Err(SessionError::Unexpected { tag: Tag::Pages, phase });
        }
        check_pages(&self.layout, "bulk pages", first, u64::from(n_pages))?;
        if kind == PageKind::Push {
            self.pushed += u64::from(n_pages);
        }
        Ok(())
    }

    /// Check a received bulk message.
    pub fn on_recv(&mut self, msg: &Msg<'_>) -> Result<BulkEvent, SessionError> {
        if let Some(e) = peer_error(msg) {
            self.phase = BulkPhase::Done;
            return Err(e);
        }
        let phase = match self.phase {
            BulkPhase::AwaitHello => "awaiting bulk hello",
            BulkPhase::Streaming => "streaming",
            BulkPhase::Done => "done",
        };
        match (self.phase, msg) {
            (BulkPhase::AwaitHello, Msg::BulkHello { version, session, streams }) => {
                if *version < MIN_VERSION || *version > VERSION {
                    return Err(SessionError::Version { min: *version, max: *version });
                }
                if *session != self.session {
                    return Err(SessionError::Auth("bulk connection presented an unknown session"));
                }
                self.phase = BulkPhase::Streaming;
                self.streams = (*streams).max(1);
                Ok(BulkEvent::Bound)
            }
            (BulkPhase::Streaming, Msg::Pages { first, n_pages, kind, .. }) => {
                self.check_pages(*first, *n_pages, *kind)?;
                Ok(BulkEvent::Pages)
            }
            // Where Pages are legal, so are their data-less zero runs.
            (BulkPhase::Streaming, Msg::Zeros { first, n_pages, kind }) => {
                self.check_pages(*first, *n_pages, *kind)?;
                Ok(BulkEvent::Zeros { first: *first, n_pages: *n_pages, kind: *kind })
            }
            (BulkPhase::Streaming, Msg::PrecopyRound { .. }) if !self.switched => Ok(BulkEvent::RoundEnd),
            (BulkPhase::Streaming, Msg::PushDone { n_pushed }) => {
                // More received than announced can only be a broken peer.
                if *n_pushed < self.pushed {
                    return Err(SessionError::Count { what: "pushed pages", said: *n_pushed, sent: self.pushed });
                }
                self.phase = BulkPhase::Done;
                Ok(BulkEvent::PushDone { lost: n_pushed - self.pushed })
            }
            (_, m) => Err(SessionError::Unexpected { tag: m.tag(), phase }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourcePhase {
    AwaitServerHello,
    AwaitHelloAck,
    Ready,
    AwaitSwitchoverAck,
    Postcopy,
    /// A link broke: the next ServerHello gets a Resume.
    Reconnecting,
    /// Resume sent: Have frames, then ResumeAck.
    AwaitResumeAck,
    Done,
}

impl SourcePhase {
    fn name(self) -> &'static str {
        match self {
            SourcePhase::AwaitServerHello => "awaiting server hello",
            SourcePhase::AwaitHelloAck => "awaiting hello ack",
            SourcePhase::Ready => "before switchover",
            SourcePhase::AwaitSwitchoverAck => "awaiting switchover ack",
            SourcePhase::Postcopy => "in postcopy",
            SourcePhase::Reconnecting => "reconnecting",
            SourcePhase::AwaitResumeAck => "awaiting resume ack",
            SourcePhase::Done => "done",
        }
    }
}

/// What the source asks for in its hello.
#[derive(Clone, Debug)]
pub struct SourceOffer {
    /// Guest kind.
    pub guest_kind: GuestKind,
    /// Mode.
    pub mode: Mode,
    /// Layout.
    pub layout: MemLayout,
    /// Pre-shared key, if any.
    pub key: Option<Vec<u8>>,
    /// Prefetch window to ask for (0: the destination decides).
    pub prefetch_pages: u32,
    /// Whether that window is centered on the fault.
    pub prefetch_around: bool,
    /// Whether to offer post-copy recovery.
    pub recovery: bool,
    /// Whether post-copy pages are to move by RDMA (the destination must agree).
    pub rdma: bool,
}

/// What a legal message means to the source driver.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Send this hello.
    SendHello(Hello),
    /// Hello accepted: open the bulk connection with this cookie.
    Accepted {
        /// Session cookie.
        session: u64,
        /// Accepted features.
        features: u64,
    },
    /// The guest runs on the destination now.
    Resumed(crate::wire::ResumeTimes),
    /// Serve the ranges of this request.
    Request,
    /// The destination holds every page: acknowledge and release memory.
    Complete,
    /// Peer alive.
    KeepAlive,
    /// A reconnecting source answers the server hello with this Resume.
    SendResume {
        /// Version.
        version: u16,
        /// The session cookie.
        session: u64,
        /// Its MAC, or zeros.
        mac: [u8; MAC_LEN],
    },
    /// Part of the destination's Have bitmap (kept by the session).
    Have,
    /// The destination's answer to the RDMA offer.
    RdmaSetup,
    /// The resume handshake is over: what the destination says, and the
    /// pages it holds.
    Reattached {
        /// Where the destination stands.
        state: ResumeState,
        /// Pages it holds (present or held from precopy).
        have: PageBitmap,
    },
}

/// The source's control-connection state machine.
#[derive(Debug)]
pub struct SourceSession {
    phase: SourcePhase,
    offer: SourceOffer,
    session: u64,
    recovery: bool,
    /// Zero runs may be sent as `Zeros` frames (`FEATURE_ZEROS`).
    zeros: bool,
    /// The destination acknowledged the switchover at some point.
    acked: bool,
    /// The destination said it holds every page.
    completed: bool,
    have: Option<PageBitmap>,
    rdma_setup_seen: bool,
}

impl SourceSession {
    /// A new session making `offer`.
    pub fn new(offer: SourceOffer) -> Self {
        SourceSession {
            phase: SourcePhase::AwaitServerHello,
            offer,
            session: 0,
            recovery: false,
            zeros: false,
            acked: false,
            completed: false,
            have: None,
            rdma_setup_seen: false,
        }
    }

    /// Whether zero runs may be sent as `Zeros` frames.
    pub fn zeros(&self) -> bool {
        self.zeros
    }

    /// Whether post-copy recovery was negotiated.
    pub fn recovery(&self) -> bool {
        self.recovery
    }

    /// The guest's page size.
    pub fn page_size(&self) -> PageSize {
        self.offer.layout.page_size()
    }

    /// Whether the destination said it holds every page: from then on
    /// nothing can be lost, only the acknowledgement may be.
    pub fn completed(&self) -> bool {
        self.completed
    }

    /// The session cookie the destination handed out (0 before).
    pub fn session_id(&self) -> u64 {
        self.session
    }

    /// A link broke after the guest state went out: go reconnecting.
    /// Returns false (and stays put) where recovery does not apply: not
    /// negotiated, or before the switchover was sent (the guest is still
    /// ours), or after completion.
    pub fn on_link_lost(&mut self) -> bool {
        // After Complete only the acknowledgement is left to deliver: worth
        // a reconnection, so the destination is not left waiting for it.
        let resumable = self.completed
            || matches!(
                self.phase,
                SourcePhase::AwaitSwitchoverAck
                    | SourcePhase::Postcopy
                    | SourcePhase::Reconnecting
                    | SourcePhase::AwaitResumeAck
            );
        if self.recovery && resumable {
            self.phase = SourcePhase::Reconnecting;
            self.have = None;
            true
        } else {
            false
        }
    }

    /// Check a received message and advance.
    pub fn on_recv(&mut self, msg: &Msg<'_>) -> Result<SourceEvent, SessionError> {
        if let Some(e) = peer_error(msg) {
            self.phase = SourcePhase::Done;
            return Err(e);
        }
        let unexpected = |phase: SourcePhase| SessionError::Unexpected { tag: msg.tag(), phase: phase.name() };
        match (self.phase, msg) {
            (SourcePhase::AwaitServerHello, Msg::ServerHello(s)) => {
                if s.min_version > VERSION || s.max_version < MIN_VERSION {
                    return Err(SessionError::Version { min: s.min_version, max: s.max_version });
                }
                let version = VERSION.min(s.max_version);
                let mut hello = Hello {
                    version,
                    guest_kind: self.offer.guest_kind,
                    mode: self.offer.mode,
                    features: SUPPORTED_FEATURES
                        & if self.offer.recovery { u64::MAX } else { !FEATURE_RECOVERY }
                        & if self.offer.rdma { u64::MAX } else { !FEATURE_RDMA },
                    page_size: self.offer.layout.page_size(),
                    prefetch_pages: self.offer.prefetch_pages,
                    prefetch_around: self.offer.prefetch_around,
                    regions: self.offer.layout.regions().to_vec(),
                    mac: [0; MAC_LEN],
                };
                match (&self.offer.key, s.flags & SERVER_FLAG_AUTH_REQUIRED != 0) {
                    (Some(key), _) => hello.mac = auth::hello_mac(key, &s.nonce, &hello_mac_input(&hello)),
                    (None, true) => {
                        return Err(SessionError::Auth("the destination requires a key and none was given"));
                    }
                    (None, false) => {}
                }
                self.phase = SourcePhase::AwaitHelloAck;
                Ok(SourceEvent::SendHello(hello))
            }
            (SourcePhase::AwaitHelloAck, Msg::HelloAck { session, features }) => {
                if features & !SUPPORTED_FEATURES != 0 {
                    return Err(SessionError::Mismatch(format!(
                        "destination accepted features {features:#x} never offered"
                    )));
                }
                if self.offer.rdma && features & FEATURE_RDMA == 0 {
                    return Err(SessionError::Mismatch(
                        "the destination does not move pages by RDMA (start it with --transport rdma)".into(),
                    ));
                }
                self.phase = SourcePhase::Ready;
                self.session = *session;
                self.recovery = features & FEATURE_RECOVERY != 0;
                self.zeros = features & FEATURE_ZEROS != 0;
                Ok(SourceEvent::Accepted { session: *session, features: *features })
            }
            // The destination keeps the source waiting while it prepares
            // memory for the accepted hello (seconds per GiB): it says it is alive.
            (SourcePhase::AwaitHelloAck, Msg::KeepAlive) => Ok(SourceEvent::KeepAlive),
            (SourcePhase::AwaitServerHello | SourcePhase::AwaitHelloAck, _) => Err(unexpected(self.phase)),
            (SourcePhase::Reconnecting, Msg::ServerHello(s)) => {
                if s.min_version > VERSION || s.max_version < MIN_VERSION {
                    return Err(SessionError::Version { min: s.min_version, max: s.max_version });
                }
                let version = VERSION.min(s.max_version);
                let mac = match (&self.offer.key, s.flags & SERVER_FLAG_AUTH_REQUIRED != 0) {
                    (Some(key), _) => auth::hello_mac(key, &s.nonce, &resume_mac_input(version, self.session)),
                    (None, true) => {
                        return Err(SessionError::Auth("the destination requires a key and none was given"));
                    }
                    (None, false) => [0; MAC_LEN],
                };
                self.phase = SourcePhase::AwaitResumeAck;
                self.have = Some(PageBitmap::new(self.offer.layout.n_pages()));
                Ok(SourceEvent::SendResume { version, session: self.session, mac })
            }
            (SourcePhase::Reconnecting, _) => Err(unexpected(self.phase)),
            (SourcePhase::Ready, Msg::RdmaSetup(_)) if self.offer.rdma && !self.rdma_setup_seen => {
                self.rdma_setup_seen = true;
                Ok(SourceEvent::RdmaSetup)
            }
            (_, Msg::KeepAlive) => Ok(SourceEvent::KeepAlive),
            (SourcePhase::AwaitResumeAck, Msg::Have { first_word, words }) => {
                let Some(have) = self.have.as_mut() else { return Err(unexpected(self.phase)) };
                load_words(have, "have bitmap", *first_word, words)?;
                Ok(SourceEvent::Have)
            }
            (SourcePhase::AwaitResumeAck, Msg::ResumeAck { state, n_have }) => {
                let Some(have) = self.have.take() else { return Err(unexpected(self.phase)) };
                let sent = have.count_ones();
                if sent != *n_have {
                    return Err(SessionError::Count { what: "pages the destination holds", said: *n_have, sent });
                }
                self.phase = match state {
                    ResumeState::Running => {
                        self.acked = true;
                        SourcePhase::Postcopy
                    }
                    ResumeState::Complete => {
                        self.completed = true;
                        SourcePhase::Done
                    }
                    ResumeState::NotSwitched if self.acked => {
                        return Err(SessionError::Mismatch(
                            "the destination says no switchover happened after acknowledging one".into(),
                        ));
                    }
                    ResumeState::NotSwitched => SourcePhase::Done,
                };
                Ok(SourceEvent::Reattached { state: *state, have })
            }
            (SourcePhase::AwaitSwitchoverAck, Msg::SwitchoverAck(t)) => {
                self.phase = SourcePhase::Postcopy;
                self.acked = true;
                Ok(SourceEvent::Resumed(*t))
            }
            (SourcePhase::Postcopy, Msg::RangeRequest { ranges, .. }) => {
                for r in ranges.iter() {
                    check_pages(&self.offer.layout, "range request", r.first, r.n_pages)?;
                }
                Ok(SourceEvent::Request)
            }
            (SourcePhase::Postcopy, Msg::Complete { n_present }) => {
                let n = self.offer.layout.n_pages();
                if *n_present != n {
                    return Err(SessionError::Count { what: "pages present at completion", said: *n_present, sent: n });
                }
                self.phase = SourcePhase::Done;
                self.completed = true;
                Ok(SourceEvent::Complete)
            }
            (p, _) => Err(unexpected(p)),
        }
    }

    /// We sent the switchover: the guest is committed to move.
    pub fn on_switchover_sent(&mut self) {
        debug_assert_eq!(self.phase, SourcePhase::Ready);
        self.phase = SourcePhase::AwaitSwitchoverAck;
    }

    /// Whether the guest has been acknowledged as running on the destination:
    /// from then on the source must never resume it.
    pub fn switched_over(&self) -> bool {
        self.acked
    }

    /// Whether the switchover was sent but not acknowledged: the outcome is
    /// unknown, so the source must neither resume nor drop the guest.
    pub fn switchover_in_doubt(&self) -> bool {
        !self.acked
            && matches!(
                self.phase,
                SourcePhase::AwaitSwitchoverAck | SourcePhase::Reconnecting | SourcePhase::AwaitResumeAck
            )
    }
}

/// Validate a page run the driver is about to request or install, for use
/// outside the machines (e.g. precopy installs).
pub fn check_range(layout: &MemLayout, what: &'static str, r: PageRange) -> Result<(), SessionError> {
    check_pages(layout, what, r.first, r.n_pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ResumeTimes, encode_ranges, encode_words, range_list, word_list};
    use crate::{PageIdx, PageRange};

    fn layout() -> MemLayout {
        MemLayout::single(PageSize::Size4K, 128 * 4096).unwrap()
    }

    fn offer(key: Option<&[u8]>) -> SourceOffer {
        SourceOffer {
            guest_kind: GuestKind::Workload,
            mode: Mode::Postcopy,
            layout: layout(),
            key: key.map(<[u8]>::to_vec),
            prefetch_pages: 0,
            prefetch_around: false,
            recovery: true,
            rdma: false,
        }
    }

    /// Drive both machines through a handshake; returns them ready.
    fn handshake(key_d: Option<&[u8]>, key_s: Option<&[u8]>) -> Result<(DestSession, SourceSession), SessionError> {
        let expect = DestExpect { key: key_d.map(<[u8]>::to_vec), recovery: true, ..Default::default() };
        let mut d = DestSession::new(expect, [5; 16], 77);
        let mut s = SourceSession::new(offer(key_s));
        let SourceEvent::SendHello(h) = s.on_recv(&d.server_hello())? else { panic!("no hello") };
        let DestEvent::Accepted(a) = d.on_recv(&Msg::Hello(h))? else { panic!("not accepted") };
        assert_eq!(a.layout, layout());
        let ack = Msg::HelloAck { session: d.session(), features: a.features };
        assert_eq!(s.on_recv(&ack)?, SourceEvent::Accepted { session: 77, features: FEATURE_RECOVERY | FEATURE_ZEROS });
        assert!(s.zeros());
        assert!(d.recovery() && s.recovery());
        Ok((d, s))
    }

    #[test]
    fn rdma_is_negotiated_by_both_sides_or_refused_before_anything_is_committed() {
        for (dest_rdma, src_rdma) in [(true, true), (true, false), (false, true), (false, false)] {
            let expect = DestExpect { rdma: dest_rdma, ..Default::default() };
            let mut d = DestSession::new(expect, [5; 16], 77);
            let mut s = SourceSession::new(SourceOffer { rdma: src_rdma, ..offer(None) });
            let SourceEvent::SendHello(h) = s.on_recv(&d.server_hello()).unwrap() else { panic!("no hello") };
            let a = match d.on_recv(&Msg::Hello(h)) {
                Ok(DestEvent::Accepted(a)) => a,
                Err(SessionError::Mismatch(m)) => {
                    assert!(dest_rdma && !src_rdma, "{m}");
                    assert!(m.contains("RDMA"), "{m}");
                    continue;
                }
                other => panic!("{other:?}"),
            };
            let ack = Msg::HelloAck { session: d.session(), features: a.features };
            match s.on_recv(&ack) {
                Ok(SourceEvent::Accepted { .. }) => {}
                Err(SessionError::Mismatch(m)) => {
                    assert!(src_rdma && !dest_rdma, "{m}");
                    continue;
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(d.rdma(), dest_rdma && src_rdma);
            let setup = Msg::RdmaSetup(b"offer");
            if d.rdma() {
                assert_eq!(d.on_recv(&setup).unwrap(), DestEvent::RdmaSetup);
                assert!(d.on_recv(&setup).is_err(), "a second offer");
                assert_eq!(s.on_recv(&setup).unwrap(), SourceEvent::RdmaSetup);
                assert!(s.on_recv(&setup).is_err(), "a second answer");
            } else {
                assert!(d.on_recv(&setup).is_err(), "an offer without the feature");
            }
        }
    }

    /// Guest state and an empty outstanding set through to switchover.
    fn switch(d: &mut DestSession, s: &mut SourceSession) {
        d.on_recv(&Msg::GuestState(b"st")).unwrap();
        s.on_switchover_sent();
        assert!(matches!(
            d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 }).unwrap(),
            DestEvent::SwitchoverReady { .. }
        ));
    }

    /// A reconnecting source against the destination: ServerHello, Resume,
    /// the Have frames of `have`, ResumeAck.
    fn resume(
        d: &mut DestSession,
        s: &mut SourceSession,
        nonce: [u8; 16],
        have: &PageBitmap,
    ) -> Result<SourceEvent, SessionError> {
        let flags = if d.expect.key.is_some() { SERVER_FLAG_AUTH_REQUIRED } else { 0 };
        let sh = Msg::ServerHello(ServerHello { min_version: 1, max_version: VERSION, flags, nonce });
        let SourceEvent::SendResume { version, session, mac } = s.on_recv(&sh)? else { panic!("no resume") };
        let state = d.on_resume(&nonce, &Msg::Resume { version, session, mac })?;
        let mut wb = Vec::new();
        encode_words(have.words(), &mut wb);
        assert_eq!(s.on_recv(&Msg::Have { first_word: 0, words: word_list(&wb) })?, SourceEvent::Have);
        s.on_recv(&Msg::ResumeAck { state, n_have: have.count_ones() })
    }

    #[test]
    fn resume_after_switchover_is_bound_to_the_session_and_key() {
        let (mut d, mut s) = handshake(Some(b"k"), Some(b"k")).unwrap();
        switch(&mut d, &mut s);
        assert!(s.switchover_in_doubt());
        // The ack is lost with the link: the source reconnects in doubt.
        assert!(s.on_link_lost());
        assert!(s.switchover_in_doubt() && !s.switched_over());
        let mut have = PageBitmap::new(128);
        have.set_range(PageRange::new(PageIdx(3), 10));
        let ev = resume(&mut d, &mut s, [9; 16], &have).unwrap();
        assert_eq!(ev, SourceEvent::Reattached { state: ResumeState::Running, have: have.clone() });
        assert!(s.switched_over() && !s.switchover_in_doubt());
        // Requests flow on the new link.
        let mut rb = Vec::new();
        encode_ranges(&[PageRange::new(PageIdx(0), 1)], &mut rb);
        assert_eq!(s.on_recv(&Msg::RangeRequest { req_id: 1, ranges: range_list(&rb) }).unwrap(), SourceEvent::Request);
        // Lost again; a resume with the wrong session, or forged without the key, is refused.
        assert!(s.on_link_lost());
        let nonce = [4; 16];
        let bad_session = Msg::Resume {
            version: 1,
            session: 78,
            mac: crate::auth::hello_mac(b"k", &nonce, &resume_mac_input(1, 78)),
        };
        assert_eq!(d.on_resume(&nonce, &bad_session), Err(SessionError::Auth("resume presented an unknown session")));
        let forged = Msg::Resume {
            version: 1,
            session: 77,
            mac: crate::auth::hello_mac(b"x", &nonce, &resume_mac_input(1, 77)),
        };
        assert_eq!(d.on_resume(&nonce, &forged), Err(SessionError::Auth("wrong key")));
        let replayed = Msg::Resume {
            version: 1,
            session: 77,
            mac: crate::auth::hello_mac(b"k", &[1; 16], &resume_mac_input(1, 77)),
        };
        assert_eq!(d.on_resume(&nonce, &replayed), Err(SessionError::Auth("wrong key")), "another nonce's MAC");
        assert!(matches!(d.on_resume(&nonce, &Msg::KeepAlive), Err(SessionError::Unexpected { .. })));
        // A Have bitmap that disagrees with its count, or runs past the guest, is refused.
        let sh = Msg::ServerHello(ServerHello { min_version: 1, max_version: 1, flags: 1, nonce });
        assert!(matches!(s.on_recv(&sh).unwrap(), SourceEvent::SendResume { .. }));
        let mut wb = Vec::new();
        encode_words(&[1, 1, 1], &mut wb);
        assert!(matches!(
            s.on_recv(&Msg::Have { first_word: 0, words: word_list(&wb) }),
            Err(SessionError::OutOfRange { .. })
        ));
        assert!(s.on_link_lost());
        assert!(matches!(s.on_recv(&sh).unwrap(), SourceEvent::SendResume { .. }));
        let e = s.on_recv(&Msg::ResumeAck { state: ResumeState::Running, n_have: 5 }).unwrap_err();
        assert!(matches!(e, SessionError::Count { .. }));
        // Completion, then a resume: the destination says it is complete.
        d.on_complete_sent();
        assert!(s.on_link_lost());
        let ev = resume(&mut d, &mut s, [8; 16], &PageBitmap::full(128)).unwrap();
        assert!(matches!(ev, SourceEvent::Reattached { state: ResumeState::Complete, .. }));
        assert!(matches!(d.on_recv(&Msg::CompleteAck(SourceStats::default())).unwrap(), DestEvent::Finished(_)));
    }

    #[test]
    fn resume_before_switchover_cancels_the_destination_for_good() {
        let (mut d, mut s) = handshake(None, None).unwrap();
        d.on_recv(&Msg::GuestState(b"st")).unwrap();
        assert!(d.got_state());
        // Before the switchover is sent the source does not reconnect: the guest is its own.
        assert!(!s.on_link_lost());
        s.on_switchover_sent();
        assert!(s.on_link_lost());
        let ev = resume(&mut d, &mut s, [1; 16], &PageBitmap::new(128)).unwrap();
        assert!(matches!(ev, SourceEvent::Reattached { state: ResumeState::NotSwitched, .. }));
        // The Switchover arriving late is refused: the source took the guest back.
        let e = d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 }).unwrap_err();
        assert!(matches!(e, SessionError::Unexpected { .. }));
        // Asked again, the answer stays.
        let mut s2 = SourceSession::new(offer(None));
        s2.phase = SourcePhase::Reconnecting;
        s2.recovery = true;
        s2.session = 77;
        assert!(matches!(
            resume(&mut d, &mut s2, [2; 16], &PageBitmap::new(128)).unwrap(),
            SourceEvent::Reattached { state: ResumeState::NotSwitched, .. }
        ));
        // A destination that acknowledged a switchover cannot take it back.
        let (mut d, mut s) = handshake(None, None).unwrap();
        switch(&mut d, &mut s);
        s.on_recv(&Msg::SwitchoverAck(crate::wire::ResumeTimes::default())).unwrap();
        assert!(s.on_link_lost());
        let sh = Msg::ServerHello(ServerHello { min_version: 1, max_version: 1, flags: 0, nonce: [0; 16] });
        s.on_recv(&sh).unwrap();
        let e = s.on_recv(&Msg::ResumeAck { state: ResumeState::NotSwitched, n_have: 0 }).unwrap_err();
        assert!(matches!(e, SessionError::Mismatch(_)));
    }

    #[test]
    fn recovery_is_negotiated_not_assumed() {
        // A destination that does not offer it: the feature is not accepted,
        // a link loss ends the run, and a Resume is refused.
        let mut d = DestSession::new(DestExpect::default(), [5; 16], 77);
        let mut s = SourceSession::new(offer(None));
        let SourceEvent::SendHello(h) = s.on_recv(&d.server_hello()).unwrap() else { panic!() };
        assert_eq!(h.features, FEATURE_RECOVERY | FEATURE_ZEROS);
        let DestEvent::Accepted(a) = d.on_recv(&Msg::Hello(h)).unwrap() else { panic!() };
        assert_eq!(a.features, FEATURE_ZEROS);
        s.on_recv(&Msg::HelloAck { session: 77, features: a.features }).unwrap();
        assert!(!s.recovery());
        switch(&mut d, &mut s);
        assert!(!s.on_link_lost());
        let r = d.on_resume(&[0; 16], &Msg::Resume { version: 1, session: 77, mac: [0; 32] });
        assert!(matches!(r, Err(SessionError::Unexpected { .. })));
    }

    #[test]
    fn full_sequence() {
        let (mut d, mut s) = handshake(None, None).unwrap();
        assert_eq!(d.on_recv(&Msg::GuestState(b"st")).unwrap(), DestEvent::Data);
        let mut wb = Vec::new();
        encode_words(&[u64::MAX, 0b1011], &mut wb);
        assert_eq!(d.on_recv(&Msg::Outstanding { first_word: 0, words: word_list(&wb) }).unwrap(), DestEvent::Data);
        let ev = d.on_recv(&Msg::Switchover { n_outstanding: 67, precopy_rounds: 0 }).unwrap();
        assert!(matches!(ev, DestEvent::SwitchoverReady { outstanding, .. } if outstanding.count_ones() == 67));
        s.on_switchover_sent();
        assert!(s.switchover_in_doubt());
        assert!(matches!(s.on_recv(&Msg::SwitchoverAck(ResumeTimes::default())).unwrap(), SourceEvent::Resumed(_)));
        assert!(s.switched_over());
        let mut rb = Vec::new();
        encode_ranges(&[PageRange::new(PageIdx(3), 4)], &mut rb);
        assert_eq!(s.on_recv(&Msg::RangeRequest { req_id: 1, ranges: range_list(&rb) }).unwrap(), SourceEvent::Request);
        let data = vec![0; 4096];
        let demand = Msg::Pages { first: PageIdx(127), n_pages: 1, kind: PageKind::Demand, data: &data };
        assert_eq!(d.on_recv(&demand).unwrap(), DestEvent::Data);
        d.on_complete_sent();
        assert_eq!(s.on_recv(&Msg::Complete { n_present: 128 }).unwrap(), SourceEvent::Complete);
        assert!(matches!(d.on_recv(&Msg::CompleteAck(SourceStats::default())).unwrap(), DestEvent::Finished(_)));
    }

    #[test]
    fn out_of_order_and_out_of_range_are_rejected() {
        let mut d = DestSession::new(DestExpect::default(), [0; 16], 1);
        assert!(matches!(
            d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 }),
            Err(SessionError::Unexpected { .. })
        ));
        let (mut d, mut s) = handshake(None, None).unwrap();
        // Switchover before the guest state.
        assert!(matches!(
            d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 }),
            Err(SessionError::Unexpected { .. })
        ));
        // Outstanding words past the end of the bitmap (128 pages = 2 words).
        let (mut d2, _) = handshake(None, None).unwrap();
        let mut wb = Vec::new();
        encode_words(&[1, 1], &mut wb);
        let r = d2.on_recv(&Msg::Outstanding { first_word: 1, words: word_list(&wb) });
        assert!(matches!(r, Err(SessionError::OutOfRange { .. })));
        let r = d2.on_recv(&Msg::Outstanding { first_word: u64::MAX, words: word_list(&wb) });
        assert!(matches!(r, Err(SessionError::OutOfRange { .. })));
        // A wrong outstanding count.
        d.on_recv(&Msg::GuestState(b"")).unwrap();
        assert!(matches!(
            d.on_recv(&Msg::Switchover { n_outstanding: 5, precopy_rounds: 0 }),
            Err(SessionError::Count { .. })
        ));
        // A range request before switchover, then one out of range.
        let mut rb = Vec::new();
        encode_ranges(&[PageRange::new(PageIdx(120), 9)], &mut rb);
        let req = Msg::RangeRequest { req_id: 1, ranges: range_list(&rb) };
        assert!(matches!(s.on_recv(&req), Err(SessionError::Unexpected { .. })));
        s.on_switchover_sent();
        s.on_recv(&Msg::SwitchoverAck(ResumeTimes::default())).unwrap();
        assert!(matches!(s.on_recv(&req), Err(SessionError::OutOfRange { .. })));
        // Completion with the wrong count.
        assert!(matches!(s.on_recv(&Msg::Complete { n_present: 5 }), Err(SessionError::Count { .. })));
    }

    #[test]
    fn auth_is_enforced_both_ways() {
        assert!(handshake(Some(b"k"), Some(b"k")).is_ok());
        assert!(matches!(handshake(Some(b"k"), Some(b"x")), Err(SessionError::Auth("wrong key"))));
        assert!(matches!(handshake(Some(b"k"), None), Err(SessionError::Auth(_))));
        // A hello forged without the key (zero MAC) against a keyed destination.
        let mut d = DestSession::new(DestExpect { key: Some(b"k".to_vec()), ..Default::default() }, [1; 16], 1);
        let mut s = SourceSession::new(offer(None));
        let unkeyed = ServerHello { min_version: 1, max_version: 1, flags: 0, nonce: [1; 16] };
        let SourceEvent::SendHello(h) = s.on_recv(&Msg::ServerHello(unkeyed)).unwrap() else { panic!() };
        assert!(matches!(d.on_recv(&Msg::Hello(h)), Err(SessionError::Auth(_))));
    }

    #[test]
    fn version_and_mismatch() {
        let mut s = SourceSession::new(offer(None));
        let future = ServerHello { min_version: VERSION + 1, max_version: VERSION + 5, flags: 0, nonce: [0; 16] };
        assert!(matches!(s.on_recv(&Msg::ServerHello(future)), Err(SessionError::Version { .. })));
        let mut d = DestSession::new(
            DestExpect { mem_bytes: Some(1 << 30), guest_kind: Some(GuestKind::Vm), ..Default::default() },
            [0; 16],
            1,
        );
        let mut s = SourceSession::new(offer(None));
        let SourceEvent::SendHello(mut h) = s.on_recv(&d.server_hello()).unwrap() else { panic!() };
        let e = d.on_recv(&Msg::Hello(h.clone())).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Mismatch);
        h.version = VERSION + 1;
        let mut d = DestSession::new(DestExpect::default(), [0; 16], 1);
        assert!(matches!(d.on_recv(&Msg::Hello(h)), Err(SessionError::Version { .. })));
    }

    #[test]
    fn oversized_guest_is_refused_before_anything_is_sized_by_it() {
        // The layout is 512 KiB; a destination accepting 256 KiB refuses it,
        // and allocates no outstanding bitmap for it.
        let mut d = DestSession::new(DestExpect { max_mem_bytes: Some(256 << 10), ..Default::default() }, [0; 16], 1);
        let mut s = SourceSession::new(offer(None));
        let SourceEvent::SendHello(h) = s.on_recv(&d.server_hello()).unwrap() else { panic!() };
        let e = d.on_recv(&Msg::Hello(h.clone())).unwrap_err();
        assert_eq!(e, SessionError::TooLarge { bytes: 512 << 10, max_bytes: 256 << 10 });
        assert_eq!(e.code(), ErrorCode::Capacity);
        assert!(d.outstanding.is_none() && d.layout().is_none());
        // With a key, an unauthenticated oversized hello fails on the key first.
        let expect = DestExpect { key: Some(b"k".to_vec()), max_mem_bytes: Some(1), ..Default::default() };
        let mut d = DestSession::new(expect, [0; 16], 1);
        assert!(matches!(d.on_recv(&Msg::Hello(h)), Err(SessionError::Auth(_))));
        let mut d = DestSession::new(DestExpect { max_mem_bytes: Some(512 << 10), ..Default::default() }, [0; 16], 1);
        let SourceEvent::SendHello(h) = SourceSession::new(offer(None)).on_recv(&d.server_hello()).unwrap() else {
            panic!()
        };
        assert!(matches!(d.on_recv(&Msg::Hello(h)), Ok(DestEvent::Accepted(_))), "exactly the limit is fine");
    }

    #[test]
    fn peer_errors_surface() {
        let mut d = DestSession::new(DestExpect::default(), [0; 16], 1);
        let e = d.on_recv(&Msg::Error { code: ErrorCode::Aborted, message: "bye" }).unwrap_err();
        assert_eq!(e, SessionError::Peer { code: ErrorCode::Aborted, message: "bye".into() });
    }

    #[test]
    fn bulk_machine() {
        let mut b = DestBulk::new(9, layout());
        let data = vec![0; 4096];
        let push = Msg::Pages { first: PageIdx(0), n_pages: 1, kind: PageKind::Push, data: &data };
        assert!(matches!(b.on_recv(&push), Err(SessionError::Unexpected { .. })));
        assert!(matches!(
            b.on_recv(&Msg::BulkHello { version: 1, session: 8, streams: 1 }),
            Err(SessionError::Auth(_))
        ));
        let mut b = DestBulk::new(9, layout());
        assert_eq!(b.on_recv(&Msg::BulkHello { version: 1, session: 9, streams: 1 }).unwrap(), BulkEvent::Bound);
        let pre = Msg::Pages { first: PageIdx(0), n_pages: 1, kind: PageKind::Precopy, data: &data };
        assert_eq!(b.on_recv(&pre).unwrap(), BulkEvent::Pages);
        b.on_switchover();
        assert!(b.on_recv(&pre).is_err(), "precopy pages after switchover");
        assert_eq!(b.on_recv(&push).unwrap(), BulkEvent::Pages);
        let far = Msg::Pages { first: PageIdx(128), n_pages: 1, kind: PageKind::Push, data: &data };
        assert!(matches!(b.on_recv(&far), Err(SessionError::OutOfRange { .. })));
        assert!(matches!(b.on_recv(&Msg::PushDone { n_pushed: 0 }), Err(SessionError::Count { .. })));
        let mut b = DestBulk::new(9, layout());
        b.on_recv(&Msg::BulkHello { version: 1, session: 9, streams: 1 }).unwrap();
        b.on_switchover();
        b.on_recv(&push).unwrap();
        assert_eq!(b.on_recv(&Msg::PushDone { n_pushed: 3 }).unwrap(), BulkEvent::PushDone { lost: 2 });
    }

    #[test]
    fn zero_runs_are_legal_where_pages_are_and_only_when_negotiated() {
        // Bulk: a Zeros push counts toward the push like Pages, range-checked.
        let mut b = DestBulk::new(9, layout());
        b.on_recv(&Msg::BulkHello { version: 1, session: 9, streams: 1 }).unwrap();
        let pre = Msg::Zeros { first: PageIdx(0), n_pages: 4, kind: PageKind::Precopy };
        assert_eq!(
            b.on_recv(&pre).unwrap(),
            BulkEvent::Zeros { first: PageIdx(0), n_pages: 4, kind: PageKind::Precopy }
        );
        b.on_switchover();
        assert!(b.on_recv(&pre).is_err(), "precopy zeros after switchover");
        let push = Msg::Zeros { first: PageIdx(120), n_pages: 8, kind: PageKind::Push };
        assert!(matches!(b.on_recv(&push), Ok(BulkEvent::Zeros { n_pages: 8, .. })));
        let far = Msg::Zeros { first: PageIdx(121), n_pages: 8, kind: PageKind::Push };
        assert!(matches!(b.on_recv(&far), Err(SessionError::OutOfRange { .. })));
        let demand = Msg::Zeros { first: PageIdx(0), n_pages: 1, kind: PageKind::Demand };
        assert!(b.on_recv(&demand).is_err(), "demand zeros on the bulk connection");
        assert_eq!(b.on_recv(&Msg::PushDone { n_pushed: 8 }).unwrap(), BulkEvent::PushDone { lost: 0 });

        // Control: demand zeros after switchover when negotiated.
        let (mut d, mut s) = handshake(None, None).unwrap();
        assert!(s.zeros());
        switch(&mut d, &mut s);
        assert_eq!(d.on_recv(&demand).unwrap(), DestEvent::Data);
        let far = Msg::Zeros { first: PageIdx(127), n_pages: 2, kind: PageKind::Demand };
        assert!(matches!(d.on_recv(&far), Err(SessionError::OutOfRange { .. })));

        // A source that did not offer it: the destination refuses them.
        let mut d = DestSession::new(DestExpect::default(), [5; 16], 77);
        let SourceEvent::SendHello(mut h) = SourceSession::new(offer(None)).on_recv(&d.server_hello()).unwrap() else {
            panic!()
        };
        h.features = 0;
        let DestEvent::Accepted(a) = d.on_recv(&Msg::Hello(h)).unwrap() else { panic!() };
        assert_eq!(a.features, 0);
        d.on_recv(&Msg::GuestState(b"st")).unwrap();
        d.on_recv(&Msg::Switchover { n_outstanding: 0, precopy_rounds: 0 }).unwrap();
        assert!(matches!(d.on_recv(&demand), Err(SessionError::Unexpected { .. })));
    }
}
