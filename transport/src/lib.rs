//! Moving postcopy frames between the two ends.
//!
//! * [`Conn`]: one framed, bidirectional connection owned by one thread. It
//!   sends whole messages (page data gathered from guest memory without an
//!   intermediate copy) and hands out received messages that borrow its
//!   buffer. Every blocking call has a deadline; readiness is exposed as a file
//!   descriptor so a caller can wait on a connection and a userfaultfd at once.
//! * [`tcp`]: TCP, for every host.
//! * [`mem`]: an in-memory pair that can delay, drop, reorder and disconnect,
//!   for deterministic tests of the session logic.
//! * [`sched`]: the priority of the threads that move bulk data.
//!
//! * [`conformance`]: the properties every `Conn` must have, run by each
//!   implementation's tests.
//! * [`Listener`]: where a destination takes connections, the first pair and
//!   those of a source that reconnects after a broken link.
//!
//! RDMA is not a `Conn`: one-sided READs and WRITEs are not a byte stream,
//! so the `rdma` crate has its own interface and the pager and sender use
//! it directly for post-copy pages (see DESIGN.md, *RDMA*); the control
//! connection stays a `Conn`.

pub mod conformance;
mod conn;
mod frames;
pub mod mem;
pub mod sched;
pub mod tcp;

pub use conn::{Conn, IoSpan, IoSpanMut, Listener, PagePlacer, PathInfo, PlaceError, Placed, TransportError, Wait};
