//! The two-host lab: a source and a destination "host" as two network
//! namespaces joined by a veth pair, with an optional rate limit (tc tbf on
//! both ends) and an optional added round-trip delay.
//!
//! This kernel has no netem (and no fq for eBPF departure times), so the
//! delay comes from a relay in the destination namespace that holds every
//! chunk it reads for half the RTT in each direction before writing it on
//! (`ppoll` with a 1 ns timer slack). A relay costs CPU and adds its own
//! hop, so the lab measures what the link really is before each run (TCP
//! round trip and one stream's rate) and corrects the relay's delay once by
//! what it overshot; the report carries the measured figures.
//!
//! Namespaces are named `pcl-<pid>-s` / `pcl-<pid>-d` and deleted when the
//! [`NetLab`] drops; namespaces left by a process that no longer exists
//! (killed with SIGKILL) are deleted by the next lab.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sched::{CloneFlags, setns};
use nix::sys::time::TimeSpec;

/// The source's address.
pub const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The destination's address.
pub const DST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// What link a run crosses.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// False: loopback in one namespace.
    pub veth: bool,
    /// Rate limit in bits/s.
    pub rate_bps: Option<u64>,
    /// Round-trip delay to add.
    pub rtt: Option<Duration>,
    /// The rate limit honors the engine's marks (`:prio`): an HTB with a
    /// class for DSCP EF (the control connection: demand) served ahead of
    /// the rest, instead of one FIFO (tbf). Models a host that controls the
    /// bottleneck's queue.
    pub prio: bool,
}

impl LinkSpec {
    /// Loopback.
    pub fn loopback() -> LinkSpec {
        LinkSpec { veth: false, rate_bps: None, rtt: None, prio: false }
    }
}

/// A number with a unit suffix, scaled by the unit's factor.
fn with_unit(s: &str, what: &str, units: &[(&str, f64)], example: &str) -> Result<f64> {
    let l = s.to_ascii_lowercase();
    let (num, factor) =
        units.iter().find_map(|(suf, m)| l.strip_suffix(suf).map(|n| (n.to_string(), *m))).ok_or_else(|| {
            let names: Vec<&str> = units.iter().map(|u| u.0).collect();
            anyhow!("{what} {s:?}: expected a number and {} (e.g. {example})", names.join(", "))
        })?;
    let v: f64 = num.trim().parse().map_err(|_| anyhow!("{what} {s:?}: {num:?} is not a number"))?;
    Ok(v * factor)
}

/// Parse a rate in bits per second: `10gbit`, `500mbit`, `1.5gbit`, `100kbit`.
pub fn parse_rate(s: &str) -> Result<u64> {
    let bps = with_unit(s, "rate", &[("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)], "10gbit")?;
    if !(1e5..=1e12).contains(&bps) {
        bail!("rate {s:?} out of range (100kbit..1000gbit)");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bps as u64)
}

/// Parse a duration: `100us`, `1ms`, `2.5ms`, `1s`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let secs = with_unit(s, "duration", &[("us", 1e-6), ("ms", 1e-3), ("s", 1.0)], "100us")?;
    if !(0.0..=10.0).contains(&secs) {
        bail!("duration {s:?} out of range (0..10s)");
    }
    Ok(Duration::from_secs_f64(secs))
}

impl FromStr for LinkSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<LinkSpec> {
        let mut parts = s.split(':');
        match parts.next() {
            Some("loopback") if s == "loopback" => return Ok(LinkSpec::loopback()),
            Some("veth") => {}
            _ => bail!("link {s:?}: expected loopback or veth[:RATE][:RTT][:prio] (e.g. veth:10gbit:100us)"),
        }
        let mut spec = LinkSpec { veth: true, rate_bps: None, rtt: None, prio: false };
        for p in parts {
            let l = p.to_ascii_lowercase();
            if l == "prio" {
                if std::mem::replace(&mut spec.prio, true) {
                    bail!("link {s:?}: prio twice");
                }
            } else if l.ends_with("bit") {
                if spec.rate_bps.replace(parse_rate(p)?).is_some() {
                    bail!("link {s:?}: two rates");
                }
            } else if spec.rtt.replace(parse_duration(p)?).is_some() {
                bail!("link {s:?}: two delays");
            }
        }
        if spec.prio && spec.rate_bps.is_none() {
            bail!("link {s:?}: prio needs a rate (the queue it orders is the rate limit's)");
        }
        Ok(spec)
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog} (scripts/setup installs iproute2)"))?;
    if !out.status.success() {
        bail!("{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Enter network namespace `name` (this thread only).
fn enter(name: &str) -> Result<()> {
    let f = File::open(netns_path(name)).with_context(|| format!("opening namespace {name}"))?;
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).with_context(|| format!("entering namespace {name}"))?;
    Ok(())
}

/// Start a thread that enters namespace `ns`, listens on `ip` (any port)
/// and runs `serve` on the listener; returns the address once it listens.
fn listen_in(
    ns: &str,
    ip: Ipv4Addr,
    name: &str,
    serve: impl FnOnce(TcpListener) + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let t = std::thread::Builder::new().name(name.into()).spawn(move || {
        let l = enter(&ns).and_then(|()| Ok(TcpListener::bind((ip, 0))?));
        match l.and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((addr, l)) => {
                let _ = tx.send(Ok(addr));
                serve(l);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    })?;
    let addr = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow!("the {name} did not start"))??;
    Ok((addr, t))
}

/// Delete namespaces (`pcl-<pid>-s/d`) and veth pairs (`pcl<pid>s/d`, if
/// a failure left one in this namespace) of lab processes that no longer
/// exist.
fn clean_stale() {
    let dead = |pid: &str| pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists();
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default()
    };
    for name in names("/var/run/netns") {
        if name.strip_prefix("pcl-").and_then(|r| r.split('-').next()).is_some_and(dead) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
    for name in names("/sys/class/net") {
        let pid = name.strip_prefix("pcl").and_then(|r| r.strip_suffix('s').or_else(|| r.strip_suffix('d')));
        if pid.is_some_and(dead) {
            let _ = ip(&["link", "del", &name]);
        }
    }
}

/// Two namespaces joined by a veth pair, deleted on drop.
pub struct NetLab {
    /// The source's namespace.
    pub src_ns: String,
    /// The destination's namespace.
    pub dst_ns: String,
    spec: LinkSpec,
    /// One-way delay the relays apply.
    one_way: Duration,
    relays: Vec<Relay>,
}

impl NetLab {
    /// Create the namespaces, the veth pair, addresses and shaping.
    pub fn create(spec: &LinkSpec) -> Result<NetLab> {
        if !spec.veth {
            bail!("a loopback link needs no lab");
        }
        clean_stale();
        let pid = std::process::id();
        let lab = NetLab {
            src_ns: format!("pcl-{pid}-s"),
            dst_ns: format!("pcl-{pid}-d"),
            spec: spec.clone(),
            one_way: spec.rtt.unwrap_or_default() / 2,
            relays: Vec::new(),
        };
        // From here on, dropping `lab` deletes whatever was created.
        let (vs, vd) = (format!("pcl{pid}s"), format!("pcl{pid}d"));
        ip(&["netns", "add", &lab.src_ns]).context("creating a network namespace (needs root)")?;
        ip(&["netns", "add", &lab.dst_ns])?;
        ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vd])?;
        ip(&["link", "set", &vs, "netns", &lab.src_ns])?;
        ip(&["link", "set", &vd, "netns", &lab.dst_ns])?;
        for (ns, dev, addr) in [(&lab.src_ns, &vs, SRC_IP), (&lab.dst_ns, &vd, DST_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            if let Some(bps) = spec.rate_bps
                && spec.prio
            {
                shape_prio(ns, dev, bps)?;
            } else if let Some(bps) = spec.rate_bps {
                // tbf's bucket must hold what arrives in a timer tick (and a
                // 64 KiB GSO packet): 4 ms at the rate, at least 256 KiB.
                let burst = (bps / 8 / 250).max(256 << 10);
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{bps}bit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "20ms",
                    ],
                )?;
            }
        }
        Ok(lab)
    }

    /// Bytes the source's end of a `:prio` link served in its urgent class
    /// (DSCP EF) so far; `None` for a FIFO link.
    pub fn urgent_bytes(&self) -> Result<Option<u64>> {
        if !self.spec.prio {
            return Ok(None);
        }
        let dev = format!("pcl{}s", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "exec", &self.src_ns, "tc", "-s", "class", "show", "dev", &dev, "classid", "1:10"])
            .stdin(Stdio::null())
            .output()
            .context("running tc")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let sent = text
            .split_whitespace()
            .skip_while(|w| *w != "Sent")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("tc -s class show: no byte count in {text:?}"))?;
        Ok(Some(sent))
    }

    /// A command that runs `exe` in the source's (`src`) or the
    /// destination's namespace.
    pub fn command(&self, src: bool, exe: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", if src { &self.src_ns } else { &self.dst_ns }]).arg(exe);
        c
    }

    /// Where the source reaches a destination listening on `port` (in its
    /// namespace, on every address): the destination itself, or a relay in
    /// front of it when the link adds delay.
    pub fn route_to(&mut self, port: u16) -> Result<SocketAddr> {
        self.route(port, true)
    }

    fn route(&mut self, port: u16, relay: bool) -> Result<SocketAddr> {
        let target = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        if !relay || self.spec.rtt.is_none_or(|d| d.is_zero()) {
            return Ok(SocketAddr::V4(SocketAddrV4::new(DST_IP, port)));
        }
        let r = Relay::start(&self.dst_ns, target, self.one_way)?;
        let addr = r.addr;
        self.relays.push(r);
        Ok(addr)
    }

    /// Measure the link (through a relay when it adds delay), correcting
    /// the relay's delay once by its own overhead.
    pub fn measure(&mut self) -> Result<LinkMeasure> {
        let mut rtt = self.measure_rtt(true, None)?;
        if let Some(target) = self.spec.rtt.filter(|d| !d.is_zero()) {
            // What the relay adds beyond the bare link should be `target`.
            let base = self.measure_rtt(false, None)?;
            let added = rtt.saturating_sub(base);
            if added > target {
                self.one_way = self.one_way.saturating_sub((added - target) / 2);
                rtt = self.measure_rtt(true, None)?;
            }
        }
        let rtt_idle = self.measure_rtt(true, Some(IDLE_GAP))?;
        let gbit = self.measure_rate()?;
        Ok(LinkMeasure { rtt, rtt_idle, gbit })
    }

    /// Median of one-byte TCP ping-pongs from the source namespace (through
    /// the relay if `relay`): 200 back to back, or, with a `gap` between
    /// them, 50 (each then finds the CPUs idle, as a guest's rare fault does).
    fn measure_rtt(&mut self, relay: bool, gap: Option<Duration>) -> Result<Duration> {
        let (port, server) = self.probe_server(true)?;
        let to = self.route(port, relay)?;
        let src = self.src_ns.clone();
        let client = std::thread::spawn(move || -> Result<Duration> {
            enter(&src)?;
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let n = if gap.is_some() { 50 } else { 200 };
            let mut v = Vec::with_capacity(n + 20);
            let mut b = [0u8; 1];
            for _ in 0..n + 20 {
                if let Some(g) = gap {
                    std::thread::sleep(g);
                }
                let t = Instant::now();
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                v.push(t.elapsed());
            }
            // The first round trips warm the path up.
            let mut v = v.split_off(20);
            v.sort();
            Ok(v[v.len() / 2])
        });
        let r = client.join().map_err(|_| anyhow!("the RTT probe panicked"))?;
        let _ = server.join();
        self.relays.clear();
        r.context("measuring the link's round trip")
    }

    /// A one-connection probe server in the destination namespace: it
    /// echoes (`echo`), or counts what it receives and answers the count
    /// at EOF.
    fn probe_server(&self, echo: bool) -> Result<(u16, JoinHandle<()>)> {
        let (addr, t) = listen_in(&self.dst_ns, Ipv4Addr::UNSPECIFIED, "probe server", move |l| {
            let _ = l.set_nonblocking(true);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => return,
                }
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) if echo => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Ok(n) => total += n as u64,
                }
            }
            if !echo {
                let _ = s.write_all(&total.to_le_bytes());
            }
        })?;
        Ok((addr.port(), t))
    }

    /// One TCP stream's rate from the source namespace, Gbit/s.
    fn measure_rate(&mut self) -> Result<f64> {
        let (port, server) = self.probe_server(false)?;
        let to = self.route_to(port)?;
        // About a quarter of a second at the configured rate (64 KiB..256 MiB).
        let bytes = self.spec.rate_bps.map_or(256 << 20, |bps| (bps / 8 / 4).clamp(64 << 10, 256 << 20));
        let src = self.src_ns.clone();
        let client = std::thread::spawn(move || -> Result<f64> {
            enter(&src)?;
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))?;
            let chunk = vec![0x5a_u8; 64 << 10];
            let t = Instant::now();
            let mut sent = 0u64;
            while sent < bytes {
                s.write_all(&chunk)?;
                sent += chunk.len() as u64;
            }
            s.shutdown(Shutdown::Write)?;
            let mut got = [0u8; 8];
            s.read_exact(&mut got)?;
            let secs = t.elapsed().as_secs_f64();
            if u64::from_le_bytes(got) != sent {
                bail!("the probe server received {} of {sent} bytes", u64::from_le_bytes(got));
            }
            #[allow(clippy::cast_precision_loss)]
            Ok(sent as f64 * 8.0 / secs / 1e9)
        });
        let r = client.join().map_err(|_| anyhow!("the rate probe panicked"))?;
        let _ = server.join();
        self.relays.clear();
        r.context("measuring the link's rate")
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.relays.clear();
        // A pair created but never moved (a failure in between) is still here.
        let veth = format!("pcl{}s", std::process::id());
        if Path::new("/sys/class/net").join(&veth).exists() {
            let _ = ip(&["link", "del", &veth]);
        }
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        for ns in [&self.src_ns, &self.dst_ns] {
            if netns_path(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("postcopy: warning: could not delete namespace {ns}: {e:#}");
            }
        }
    }
}

/// Shape `dev` in `ns` to `bps` with an HTB whose class 1:10 (packets
/// marked DSCP EF, the engine's control connection; guaranteed half the
/// link) has priority over class 1:20 (everything else): each class has its own queue, so a demand reply
/// waits at most for the packet on the wire, not behind the push's backlog.
fn shape_prio(ns: &str, dev: &str, bps: u64) -> Result<()> {
    // As tbf's bucket: what arrives in a 4 ms timer tick, at least 256 KiB.
    let burst = (bps / 8 / 250).max(256 << 10).to_string();
    // Demand is never more than the guest asks for, but a guest that faults
    // flat-out asks for a tenth of 1 Gbit: below its guaranteed rate the
    // urgent class needs no borrowing (measured: a tenth of the link gave
    // p50 2.65x the RTT, half 0.98x).
    let (rate, urgent, rest) = (format!("{bps}bit"), format!("{}bit", bps / 2), format!("{}bit", bps - bps / 2));
    let tc = |args: &[&str]| run("ip", &[&["netns", "exec", ns, "tc"], args].concat());
    tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"])?;
    tc(&["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate, "burst", &burst])?;
    for (id, r, prio) in [("1:10", &urgent, "0"), ("1:20", &rest, "1")] {
        tc(&[
            "class", "add", "dev", dev, "parent", "1:1", "classid", id, "htb", "rate", r, "ceil", &rate, "burst",
            &burst, "cburst", &burst, "prio", prio,
        ])?;
    }
    // DSCP EF: the TOS byte 0xb8 under the mask of its six DSCP bits.
    tc(&[
        "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "tos",
        "0xb8", "0xfc", "flowid", "1:10",
    ])
}

/// What the lab measured of its link before a run.
#[derive(Clone, Copy, Debug)]
pub struct LinkMeasure {
    /// Median round trip of back-to-back small messages.
    pub rtt: Duration,
    /// Median round trip of small messages `IDLE_GAP` apart: on a virtual
    /// machine each then pays the wake-ups of CPUs that went idle, as a
    /// guest's rare fault does.
    pub rtt_idle: Duration,
    /// One TCP stream's rate, Gbit/s.
    pub gbit: f64,
}

/// The gap between the idle round-trip probes (a guest faulting 100 times
/// a second).
const IDLE_GAP: Duration = Duration::from_millis(10);

/// Chunks a relay holds per direction before it stops reading.
const RELAY_QUEUE_BYTES: usize = 16 << 20;

/// A TCP relay in a namespace that delays each direction by `one_way`.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(ns: &str, target: SocketAddr, one_way: Duration) -> Result<Relay> {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, thread) = {
            let stop = Arc::clone(&stop);
            listen_in(ns, DST_IP, "relay", move |l| relay_accept(&l, target, one_way, &stop))?
        };
        Ok(Relay { addr, stop, thread: Some(thread) })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_accept(l: &TcpListener, target: SocketAddr, one_way: Duration, stop: &Arc<AtomicBool>) {
    let _ = nix::sys::prctl::set_timerslack(1);
    let mut pipes = Vec::new();
    let _ = l.set_nonblocking(true);
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((down, _)) => {
                let up = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("postcopy: relay: connecting to {target}: {e}");
                        continue;
                    }
                };
                for s in [&down, &up] {
                    let _ = s.set_nodelay(true);
                }
                let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else { continue };
                for (from, to) in [(down, up), (up2, down2)] {
                    let stop = Arc::clone(stop);
                    pipes.push(std::thread::spawn(move || pipe(from, to, one_way, &stop)));
                }
            }
            Err(_) => {
                let fd = l.as_fd();
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(Duration::from_millis(20))), None);
            }
        }
    }
    for p in pipes {
        let _ = p.join();
    }
}

/// Copy `from` to `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, stop: &AtomicBool) {
    let _ = nix::sys::prctl::set_timerslack(1);
    // Blocking sockets: the two directions share them (dup'ed), so neither
    // may change their flags; a read only follows POLLIN, so it returns at once.
    let _ = to.set_write_timeout(Some(Duration::from_secs(5)));
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued = 0usize;
    let mut eof = false;
    let mut buf = vec![0u8; 256 << 10];
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if let Some((due, _)) = queue.front()
            && *due <= now
        {
            let (_, data) = queue.pop_front().expect("checked");
            queued -= data.len();
            if to.write_all(&data).is_err() {
                break;
            }
            continue;
        }
        if eof && queue.is_empty() {
            let _ = to.shutdown(Shutdown::Write);
            break;
        }
        let wait = queue.front().map_or(Duration::from_millis(50), |(due, _)| due.saturating_duration_since(now));
        if eof || queued >= RELAY_QUEUE_BYTES {
            std::thread::sleep(wait);
            continue;
        }
        let readable = {
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
            ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None).unwrap_or(0) > 0
        };
        if !readable {
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                queue.push_back((Instant::now() + delay, buf[..n].to_vec()));
                queued += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => eof = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_or_explain() {
        assert_eq!("loopback".parse::<LinkSpec>().unwrap(), LinkSpec::loopback());
        let l: LinkSpec = "veth:10gbit:100us".parse().unwrap();
        assert_eq!((l.veth, l.rate_bps, l.rtt), (true, Some(10_000_000_000), Some(Duration::from_micros(100))));
        assert!(!l.prio);
        assert!("veth:1gbit:100us:prio".parse::<LinkSpec>().unwrap().prio);
        let l: LinkSpec = "veth:1ms".parse().unwrap();
        assert_eq!((l.rate_bps, l.rtt), (None, Some(Duration::from_millis(1))));
        assert_eq!("veth:2.5gbit".parse::<LinkSpec>().unwrap().rate_bps, Some(2_500_000_000));
        for bad in [
            "",
            "lo",
            "veth:10gbit:1gbit",
            "veth:fast",
            "veth:-1ms",
            "veth:0gbit",
            "loopback:1gbit",
            "veth:99s",
            "veth:prio",
            "veth:1gbit:prio:prio",
        ] {
            assert!(bad.parse::<LinkSpec>().is_err(), "{bad}");
        }
    }
}
