//! The source's half of RDMA: guest memory registered once for remote
//! reads, two queue pairs (demand, background) the destination reads
//! through, and nothing else. After switchover the guest is paused and its
//! memory does not move, so the destination reads every page it needs
//! with one-sided READs: the source's CPU is not on the post-copy path at
//! all (its threads only keep the control connection alive).
//!
//! The exchange runs on the control connection right after the hello,
//! before the bulk connection opens: the offer (device, endpoints, where
//! each page is and its remote key), sealed with the session key like the
//! hello; the destination's answer (its endpoints); then both connect.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::session::{SessionError, SourceEvent, SourceSession};
use proto::wire::Msg;
use rdma::setup::{Answer, Offer, RemoteRegion};
use rdma::{Access, Device, MemoryRegion, QpCaps, QueuePair};
use transport::{Conn, Wait};

use crate::error::SenderError;
use crate::map::SourceMap;

/// The source's registered memory and queue pairs, kept until completion.
pub struct SourceRdma {
    // Queue pairs first: they must be gone before the regions they may touch.
    _qps: Vec<Box<dyn QueuePair>>,
    _mrs: Vec<Box<dyn MemoryRegion>>,
    _dev: Arc<dyn Device>,
    /// Registering guest memory took this long.
    pub registration: Duration,
    /// The device used.
    pub device: String,
}

/// Queue pairs the destination reads through: demand, background.
pub const N_QPS: usize = 2;

fn rdma_err(what: &str, e: impl std::fmt::Display) -> SenderError {
    SenderError::Session(SessionError::Mismatch(format!("RDMA {what}: {e}")))
}

/// Register guest memory, offer it, and connect the queue pairs.
pub(crate) fn set_up(
    control: &mut dyn Conn,
    session: &mut SourceSession,
    map: &SourceMap,
    cfg: &rdma::Config,
    key: Option<&[u8]>,
    session_id: u64,
    timeout: Duration,
) -> Result<SourceRdma, SenderError> {
    let bind = control.local_ip().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let dev = cfg.open(bind).map_err(|e| rdma_err("device", e))?;
    let layout = map.layout();
    let t = Instant::now();
    let mut mrs = Vec::new();
    let mut regions = Vec::new();
    for (i, base) in map.bases().iter().enumerate() {
        let pages = layout.region_pages(i);
        let len = usize::try_from(pages.n_pages * layout.page_size().bytes()).map_err(|e| rdma_err("region", e))?;
        // SAFETY: guest memory stays mapped for the whole migration, and the
        // queue pairs that may read it are dropped before the regions
        // (field order of `SourceRdma`).
        let mr = unsafe { dev.register(base.0 as *mut u8, len, Access::REMOTE_READ) }
            .map_err(|e| rdma_err("registering guest memory", e))?;
        regions.push(RemoteRegion {
            first_page: pages.first.0,
            n_pages: pages.n_pages,
            addr: mr.addr(),
            rkey: mr.rkey(),
        });
        mrs.push(mr);
    }
    let registration = t.elapsed();
    let caps = QpCaps { max_send_wr: 1, max_recv_wr: 1, cq_depth: 4 };
    let mut qps = (0..N_QPS)
        .map(|_| dev.create_qp(caps))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rdma_err("queue pair", e))?;
    let offer =
        Offer { device: dev.name().to_string(), endpoints: qps.iter().map(|q| q.endpoint()).collect(), regions };
    let sealed = proto::auth::seal_setup(key, session_id, 1, &offer.encode());
    control.send(&Msg::RdmaSetup(&sealed))?;
    let deadline = Instant::now() + timeout;
    let answer = loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout { what: "the destination's RDMA answer", after: timeout });
        };
        match session.on_recv(&msg)? {
            SourceEvent::KeepAlive => {}
            SourceEvent::RdmaSetup => {
                let Msg::RdmaSetup(b) = msg else { unreachable!("the session said RdmaSetup") };
                let body = proto::auth::open_setup(key, session_id, 2, b).map_err(|e| rdma_err("answer", e))?;
                break Answer::decode(body).map_err(|e| rdma_err("answer", e))?;
            }
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting the RDMA answer" }.into()),
        }
    };
    if answer.endpoints.len() != qps.len() {
        return Err(rdma_err("answer", format!("{} endpoints for {} queue pairs", answer.endpoints.len(), qps.len())));
    }
    for (q, e) in qps.iter_mut().zip(&answer.endpoints) {
        q.connect(e, deadline).map_err(|e| rdma_err("connecting", e))?;
    }
    tracing::info!(
        device = dev.name(),
        registration_us = u64::try_from(registration.as_micros()).unwrap_or(u64::MAX),
        "RDMA set up: guest memory registered for remote reads"
    );
    Ok(SourceRdma { _qps: qps, _mrs: mrs, device: dev.name().to_string(), _dev: dev, registration })
}
