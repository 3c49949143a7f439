//! Frames: the header every message starts with, the limits checked on it
//! before a byte of the body is buffered, the table of message types, and
//! what can go wrong decoding. Layouts are in the module doc of `wire`.

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
/// Most bulk connections (push streams) on one link.
pub const MAX_STREAMS: u16 = 8;
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
/// Feature bit: runs of zero pages travel as `Zeros` frames, without data.
pub const FEATURE_ZEROS: u64 = 2;
/// Feature bit: post-copy pages move by RDMA (the destination reads them);
/// both sides must have been started for it.
pub const FEATURE_RDMA: u64 = 4;
/// Largest RDMA setup body before its MAC.
pub const MAX_RDMA_SETUP: u32 = 4096;

/// Defines the message types once: the tag enum, its byte values, each
/// type's largest body, and the list of all of them.
macro_rules! message_types {
    ($( $(#[$doc:meta])* $name:ident = $val:literal, max $max:expr; )*) => {
        /// Message type tags (0 is invalid).
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Tag {
            $( $(#[$doc])* $name = $val, )*
        }

        impl Tag {
            /// Every message type, in tag order.
            pub const ALL: &'static [Tag] = &[$(Tag::$name),*];

            pub(crate) fn from_u8(v: u8) -> Option<Tag> {
                match v {
                    $( $val => Some(Tag::$name), )*
                    _ => None,
                }
            }

            /// Largest body this tag may carry.
            pub fn max_body_len(self) -> u32 {
                match self {
                    $( Tag::$name => $max, )*
                }
            }
        }
    };
}

const fn u32_of(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64);
    #[allow(clippy::cast_possible_truncation)]
    let r = v as u32;
    r
}

message_types! {
    /// The destination's opening: versions it speaks, whether it wants a key, the nonce.
    ServerHello = 1, max 28;
    /// The source's offer: version, guest kind, mode, features, page size, regions, MAC.
    Hello = 2, max u32_of(32 + 16 * crate::types::MAX_REGIONS as u64 + MAC_LEN as u64);
    /// The hello accepted: the session cookie and the accepted features.
    HelloAck = 3, max 16;
    /// The first frame of the bulk connection, binding it to the session.
    BulkHello = 4, max 16;
    /// Why the sender stops; it closes after this.
    Error = 5, max 4 + MAX_ERROR_LEN as u32;
    /// Nothing but proof of life.
    KeepAlive = 6, max 0;
    /// The paused guest's opaque state.
    GuestState = 7, max MAX_STATE_BYTES;
    /// A piece of the outstanding-page bitmap.
    Outstanding = 8, max 8 + 8 * MAX_OUTSTANDING_WORDS;
    /// The guest is committed to move: its state and outstanding set are complete.
    Switchover = 9, max 16;
    /// The guest runs on the destination now.
    SwitchoverAck = 10, max 24;
    /// Page ranges the destination wants, faulting pages first.
    RangeRequest = 11, max 8 + 12 * MAX_REQUEST_RANGES;
    /// A run of pages: demand reply, push or precopy.
    Pages = 12, max u32_of(PAGES_PREFIX_LEN as u64 + MAX_RUN_BYTES);
    /// The background push sent everything it had.
    PushDone = 13, max 8;
    /// The destination holds every page.
    Complete = 14, max 8;
    /// The source's figures; it may release the guest now.
    CompleteAck = 15, max 56;
    /// The end of a precopy round.
    PrecopyRound = 16, max 16;
    /// A reconnecting source's answer to the server hello (recovery).
    Resume = 17, max u32_of(16 + MAC_LEN as u64);
    /// A piece of the bitmap of pages the destination holds (recovery).
    Have = 18, max 8 + 8 * MAX_OUTSTANDING_WORDS;
    /// Where the destination stands after a reconnection (recovery).
    ResumeAck = 19, max 16;
    /// A run of zero pages, without data: demand reply, push or precopy.
    Zeros = 20, max 16;
    /// RDMA setup on the control connection (`FEATURE_RDMA`): the source's
    /// offer or the destination's answer, then a MAC (zeros without a key).
    RdmaSetup = 21, max MAX_RDMA_SETUP + u32_of(MAC_LEN as u64);
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
