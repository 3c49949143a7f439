//! `struct uffd_msg`, parsed with explicit offsets (no unsafe): every event
//! type, so a caller can report what it does not handle.

/// Size of one `struct uffd_msg`.
pub const MSG_LEN: usize = 32;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
const PAGEFAULT_FLAG_WRITE: u64 = 1;

/// One userfaultfd event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on a missing (or minor) page.
    Fault {
        /// Faulting address (page-aligned by the kernel for MISSING).
        addr: u64,
        /// Whether it was a write.
        write: bool,
        /// Faulting thread (with UFFD_FEATURE_THREAD_ID).
        tid: u32,
    },
    /// MADV_DONTNEED/REMOVE dropped `[start, end)` (a balloon): it must fault
    /// back in as zeros, and copies into it fail until this is read.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// mremap moved `len` bytes from `from` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Bytes.
        len: u64,
    },
    /// The process forked; `fd` is the child's userfaultfd.
    Fork {
        /// Its descriptor number.
        fd: u32,
    },
    /// An event this build does not know.
    Unknown(u8),
}

fn u64_at(m: &[u8; MSG_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&m[at..at + 8]);
    u64::from_ne_bytes(b)
}

fn u32_at(m: &[u8; MSG_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&m[at..at + 4]);
    u32::from_ne_bytes(b)
}

/// Parse one message (native byte order: it comes from this kernel).
pub fn parse(m: &[u8; MSG_LEN]) -> Event {
    match m[0] {
        EVENT_PAGEFAULT => {
            Event::Fault { addr: u64_at(m, 16), write: u64_at(m, 8) & PAGEFAULT_FLAG_WRITE != 0, tid: u32_at(m, 24) }
        }
        EVENT_REMOVE => Event::Remove { start: u64_at(m, 8), end: u64_at(m, 16) },
        EVENT_UNMAP => Event::Unmap { start: u64_at(m, 8), end: u64_at(m, 16) },
        EVENT_REMAP => Event::Remap { from: u64_at(m, 8), to: u64_at(m, 16), len: u64_at(m, 24) },
        EVENT_FORK => Event::Fork { fd: u32_at(m, 8) },
        other => Event::Unknown(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, words: [u64; 3]) -> [u8; MSG_LEN] {
        let mut m = [0u8; MSG_LEN];
        m[0] = event;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn every_event_type_parses() {
        assert_eq!(parse(&msg(0x12, [1, 0x7000, 42])), Event::Fault { addr: 0x7000, write: true, tid: 42 });
        assert_eq!(parse(&msg(0x12, [0, 0x9000, 7])), Event::Fault { addr: 0x9000, write: false, tid: 7 });
        assert_eq!(parse(&msg(0x15, [0x1000, 0x3000, 0])), Event::Remove { start: 0x1000, end: 0x3000 });
        assert_eq!(parse(&msg(0x16, [0x1000, 0x2000, 0])), Event::Unmap { start: 0x1000, end: 0x2000 });
        assert_eq!(parse(&msg(0x14, [1, 2, 3])), Event::Remap { from: 1, to: 2, len: 3 });
        assert_eq!(parse(&msg(0x13, [9, 0, 0])), Event::Fork { fd: 9 });
        assert_eq!(parse(&msg(0x77, [0; 3])), Event::Unknown(0x77));
    }
}
