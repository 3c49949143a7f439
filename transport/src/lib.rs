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
//! RDMA (one-sided writes for the push, reads or requests for faults) is not
//! built yet: it would be a third implementation behind a cargo feature.

pub mod conformance;
mod conn;
mod frames;
pub mod mem;
pub mod sched;
pub mod tcp;

pub use conn::{Conn, IoSpan, IoSpanMut, Listener, PagePlacer, PathInfo, PlaceError, Placed, TransportError, Wait};
