//! A fault-injecting relay between a source and a destination: it forwards
//! whole frames of the postcopy protocol in both directions on every
//! connection it carries, counts them by direction and type across all
//! connections, and at chosen frames cuts every connection it holds (a
//! reset) or black-holes them (bytes are read and dropped, nothing closes:
//! only liveness checks can notice). New connections after a cut are
//! carried normally, so a source that reconnects gets through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Source to destination, or back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination.
    ToDest,
    /// Destination to source.
    ToSource,
}

/// What to do to every connection held when a rule fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Close every connection with a reset (SO_LINGER 0).
    Reset,
    /// Keep every connection open and forward nothing on it any more.
    Blackhole,
    /// Change nothing: only count (a test acts on `fired`).
    Mark,
}

/// Fire `action` at the `nth` frame (from 1) going `dir` with message tag
/// `tag` (and, for Pages, kind `kind`), counted over all connections; the
/// frame itself is forwarded first if `after`, else dropped with the cut.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Direction.
    pub dir: Dir,
    /// Message tag.
    pub tag: u8,
    /// Pages kind (1 demand, 2 push, 3 precopy), for tag 12.
    pub kind: Option<u8>,
    /// Which one.
    pub nth: u64,
    /// Whether the frame goes through before the cut.
    pub after: bool,
    /// What happens.
    pub action: Action,
}

struct Held {
    streams: Vec<TcpStream>,
    /// Set for every pump of connections black-holed so far.
    holes: Vec<Arc<AtomicBool>>,
}

struct State {
    rules: Vec<(Rule, bool)>,
    counts: std::collections::HashMap<(bool, u8, u8), u64>,
    held: Held,
    blackholed: Vec<TcpStream>,
    fired: u64,
}

/// A running relay.
pub struct Relay {
    /// Where the source connects.
    pub addr: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relay connections on a free loopback port to `upstream`, applying `rules`.
    pub fn start(upstream: &str, rules: Vec<Rule>) -> std::io::Result<Relay> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        l.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(State {
            rules: rules.into_iter().map(|r| (r, false)).collect(),
            counts: Default::default(),
            held: Held { streams: Vec::new(), holes: Vec::new() },
            blackholed: Vec::new(),
            fired: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, up) = (Arc::clone(&state), Arc::clone(&stop), upstream.to_string());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        if let Err(e) = carry(c, &up, &st) {
                            tracing::warn!("relay: carrying a connection failed: {e}");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Relay { addr, state, stop })
    }

    /// Add a rule (counting continues from the frames already seen).
    pub fn add_rule(&self, r: Rule) {
        self.state.lock().rules.push((r, false));
    }

    /// How many frames went `dir` with `tag` (any Pages kind) so far.
    pub fn count(&self, dir: Dir, tag: u8) -> u64 {
        let s = self.state.lock();
        s.counts.iter().filter(|((d, t, _), _)| *d == (dir == Dir::ToDest) && *t == tag).map(|(_, n)| *n).sum()
    }

    /// Every frame count so far, sorted: ((to the destination, tag, Pages
    /// kind), frames). For messages from tests that say where a run stopped.
    pub fn counts(&self) -> Vec<((bool, u8, u8), u64)> {
        let mut v: Vec<_> = self.state.lock().counts.iter().map(|(k, n)| (*k, *n)).collect();
        v.sort();
        v
    }

    /// How many rules fired.
    pub fn fired(&self) -> u64 {
        self.state.lock().fired
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let s = self.state.lock();
        for t in s.held.streams.iter().chain(&s.blackholed) {
            let _ = t.shutdown(Shutdown::Both);
        }
    }
}

/// Connect `c` to `up` and pump both ways.
fn carry(c: TcpStream, up: &str, st: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let u = TcpStream::connect(up)?;
    c.set_nonblocking(false)?;
    // Whole frames go out one write each: Nagle would hold a small one back
    // for the peer's delayed ACK (40 ms), which is no fault we mean to inject.
    c.set_nodelay(true)?;
    u.set_nodelay(true)?;
    let hole = Arc::new(AtomicBool::new(false));
    let pairs = [(c.try_clone()?, u.try_clone()?, Dir::ToDest), (u.try_clone()?, c.try_clone()?, Dir::ToSource)];
    {
        let mut s = st.lock();
        s.held.streams.push(c);
        s.held.streams.push(u);
        s.held.holes.push(Arc::clone(&hole));
    }
    for (from, to, dir) in pairs {
        let (st, hole) = (Arc::clone(st), Arc::clone(&hole));
        std::thread::Builder::new().name("relay-pump".into()).spawn(move || pump(from, to, dir, &st, &hole))?;
    }
    Ok(())
}

fn cut(s: &mut State, action: Action) {
    s.fired += 1;
    match action {
        Action::Reset => {
            for t in s.held.streams.drain(..) {
                // SO_LINGER 0: close sends a reset, as a dropped link would.
                let _ = socket_linger_zero(&t);
                let _ = t.shutdown(Shutdown::Both);
            }
            s.held.holes.clear();
        }
        Action::Blackhole => {
            for h in s.held.holes.drain(..) {
                h.store(true, Ordering::Relaxed);
            }
            // Keep the sockets open, out of reach of later cuts.
            let kept = std::mem::take(&mut s.held.streams);
            s.blackholed.extend(kept);
        }
        Action::Mark => {}
    }
}

fn socket_linger_zero(t: &TcpStream) -> nix::Result<()> {
    let l = nix::libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(t, nix::sys::socket::sockopt::Linger, &l)
}

fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, st: &Mutex<State>, hole: &AtomicBool) {
    let mut buf = vec![0u8; 17 << 20];
    loop {
        let mut h = [0u8; 8];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if len > buf.len() - 8 {
            break;
        }
        buf[..8].copy_from_slice(&h);
        if from.read_exact(&mut buf[8..8 + len]).is_err() {
            break;
        }
        if hole.load(Ordering::Relaxed) {
            continue;
        }
        let tag = h[0];
        let kind = if tag == 12 && len >= 13 { buf[8 + 12] } else { 0 };
        let mut fire = None;
        {
            let mut s = st.lock();
            let n = {
                let c = s.counts.entry((dir == Dir::ToDest, tag, kind)).or_default();
                *c += 1;
                *c
            };
            for (r, done) in s.rules.iter_mut() {
                if !*done && r.dir == dir && r.tag == tag && r.kind.is_none_or(|k| k == kind) && r.nth == n {
                    *done = true;
                    fire = Some(*r);
                    break;
                }
            }
            if let Some(r) = fire
                && !r.after
            {
                cut(&mut s, r.action);
                continue;
            }
        }
        if to.write_all(&buf[..8 + len]).is_err() {
            break;
        }
        if let Some(r) = fire {
            cut(&mut st.lock(), r.action);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
