//! The destination's half of reconnection: answering a source that comes
//! back after a broken link (the resume handshake, what this side holds),
//! and binding a fresh bulk connection to the session.
//!
//! Each resume attempt is challenged with a fresh nonce, so with a key a
//! recorded Resume cannot be replayed; without a key the 64-bit random
//! session cookie (handed out once, in HelloAck) is what binds it, as for
//! the bulk connection.

use std::time::{Duration, Instant};

use proto::session::{DestBulk, DestSession};
use proto::wire::{self, Msg, NONCE_LEN, ResumeState};
use proto::{MemLayout, PageBitmap};
use transport::{Conn, Listener, Wait};

use crate::config::PagerConfig;
use crate::error::{PagerError, error_chain};

/// Fresh random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source does not fail on Linux once booted; if it ever
    // did, a zero nonce only weakens replay protection, it opens nothing.
    if getrandom::fill(&mut b).is_err() {
        tracing::error!("the OS random source failed");
    }
    b
}

/// Best effort: tell the peer why we stop.
pub(crate) fn send_error(conn: &mut dyn Conn, e: &PagerError) {
    let text = format!("destination: {}", error_chain(e));
    let _ = conn.send(&Msg::Error { code: e.code(), message: &text });
}

/// Send `bm` as Have frames.
fn send_have(conn: &mut dyn Conn, bm: &PageBitmap) -> Result<(), PagerError> {
    let mut enc = Vec::new();
    for (first_word, chunk) in wire::bitmap_chunks(bm.words()) {
        enc.clear();
        wire::encode_words(chunk, &mut enc);
        conn.send(&Msg::Have { first_word, words: wire::word_list(&enc) })?;
    }
    Ok(())
}

/// Run the resume handshake on a newly accepted `conn`: challenge, check
/// the Resume, and answer with what this side holds (`have`) and where it
/// stands. A connection that fails any check is told why.
pub(crate) fn resume_handshake(
    conn: &mut dyn Conn,
    session: &mut DestSession,
    cfg: &PagerConfig,
    have: impl FnOnce() -> PageBitmap,
) -> Result<ResumeState, PagerError> {
    let nonce: [u8; NONCE_LEN] = random_bytes();
    let checked = (|| {
        conn.send(&session.server_hello_with(nonce))?;
        let deadline = Instant::now() + cfg.resume_step_timeout();
        let Some(msg) = conn.recv(Wait::Until(deadline))? else {
            return Err(PagerError::Timeout {
                what: "a reconnecting source's resume",
                after: cfg.resume_step_timeout(),
            });
        };
        Ok(session.on_resume(&nonce, &msg)?)
    })();
    let state = match checked {
        Ok(s) => s,
        Err(e) => {
            send_error(conn, &e);
            return Err(e);
        }
    };
    let have = match state {
        ResumeState::Running | ResumeState::Complete => have(),
        // Nothing to claim: the source takes the guest back.
        ResumeState::NotSwitched => PageBitmap::new(0),
    };
    send_have(conn, &have)?;
    conn.send(&Msg::ResumeAck { state, n_have: have.count_ones() })?;
    Ok(state)
}

/// Accept the bulk connection of the session `session` (by `accept_by`)
/// and check its hello (within `hello_within` of the accept: a connection
/// accepted at the end of a short accept slice still gets its full time).
pub(crate) fn accept_bulk(
    listener: &dyn Listener,
    session: u64,
    layout: &MemLayout,
    accept_by: Instant,
    hello_within: Duration,
) -> Result<(Box<dyn Conn>, DestBulk), PagerError> {
    let mut bulk = listener.accept(accept_by)?;
    bulk.set_page_size(layout.page_size());
    let mut bs = DestBulk::new(session, layout.clone());
    match bulk.recv(Wait::for_(hello_within))? {
        Some(m) => {
            bs.on_recv(&m)?;
        }
        None => {
            return Err(PagerError::Timeout { what: "bulk connection hello", after: hello_within });
        }
    }
    // Its ACKs yield to the requests on the control connection.
    bulk.mark_as_bulk();
    Ok((bulk, bs))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use proto::{MemLayout, PageSize};
    use transport::tcp::{TcpConn, TcpListen, TcpOptions};
    use transport::{Conn, Listener};

    use super::*;

    /// A bulk connection accepted at the end of a short accept slice gets
    /// its whole hello time (it once got what was left of the slice, and a
    /// hello 1 ms late failed the migration, blaming a 30 s timeout).
    #[test]
    fn a_hello_after_the_accept_slice_is_still_accepted() {
        let l = TcpListen::bind("127.0.0.1:0", TcpOptions::default()).unwrap();
        let addr = l.local_addr().to_string();
        let client = std::thread::spawn(move || {
            let mut c = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            c.send(&Msg::BulkHello { version: wire::VERSION, session: 7, streams: 1 }).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let layout = MemLayout::single(PageSize::Size4K, 1 << 20).unwrap();
        let listener: &dyn Listener = &l;
        let slice = Instant::now() + Duration::from_millis(50);
        let r = accept_bulk(listener, 7, &layout, slice, Duration::from_secs(5));
        assert!(r.is_ok(), "{:?}", r.err());
        client.join().unwrap();
    }

    /// The destination's listener marks what it accepts urgent (a control
    /// connection's requests); a bulk connection, once its hello says so,
    /// carries the bulk marks (DSCP LE, priority 1).
    #[test]
    fn an_accepted_bulk_connection_takes_the_bulk_marks() {
        let opts = TcpOptions { marking: transport::tcp::Marking::Urgent, ..TcpOptions::default() };
        let l = TcpListen::bind("127.0.0.1:0", opts).unwrap();
        let addr = l.local_addr().to_string();
        let client = std::thread::spawn(move || {
            let mut c = TcpConn::connect(&addr, Duration::from_secs(5), &TcpOptions::default()).unwrap();
            c.send(&Msg::BulkHello { version: wire::VERSION, session: 7, streams: 1 }).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let layout = MemLayout::single(PageSize::Size4K, 1 << 20).unwrap();
        let (bulk, _) =
            accept_bulk(&l, 7, &layout, Instant::now() + Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        use nix::sys::socket::{getsockopt, sockopt};
        let fd = bulk.readiness();
        assert_eq!(getsockopt(&fd, sockopt::Ipv4Tos).unwrap(), 0x04);
        assert_eq!(getsockopt(&fd, sockopt::Priority).unwrap(), 1);
        client.join().unwrap();
    }
}
