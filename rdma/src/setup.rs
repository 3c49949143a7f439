//! What the two sides exchange on the control connection to set up RDMA:
//! the source's offer (its queue pairs' endpoints and where each page of
//! guest memory is, with the key to read it) and the destination's answer
//! (its endpoints). Bounded, checked encodings: the bytes come from a peer.

use crate::verbs::{Endpoint, MAX_ENDPOINT_LEN};

/// Largest encoded setup message.
pub const MAX_SETUP_LEN: usize = 4096;
/// Most regions an offer names.
pub const MAX_REGIONS: usize = 64;
/// Most queue pairs.
pub const MAX_QPS: usize = 4;

const KIND_OFFER: u8 = 1;
const KIND_ANSWER: u8 = 2;
const VERSION: u8 = 1;

/// Pages `[first_page, first_page + n_pages)` are at `addr` in the source,
/// readable with `rkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// First page.
    pub first_page: u64,
    /// Pages.
    pub n_pages: u64,
    /// Source address of the first page.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// The source's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Its device (`sim` or a NIC's name), so a mismatch is named.
    pub device: String,
    /// Its queue pairs' endpoints, in order: demand, background.
    pub endpoints: Vec<Endpoint>,
    /// Where guest memory is.
    pub regions: Vec<RemoteRegion>,
}

/// The destination's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Its queue pairs' endpoints, matching the offer's.
    pub endpoints: Vec<Endpoint>,
    /// When the source is to WRITE the background (instead of the
    /// destination reading it): where.
    pub ring: Option<Ring>,
}

/// The destination's staging ring for background WRITEs: `slots` slots of
/// `slot_bytes` at `addr`, and a 16-byte header per slot at `headers`
/// (first page u64, pages u32, zero u32), all writable with `rkey`. The
/// source writes a slot's data, then its header with WRITE_WITH_IMM (the
/// slot's index as immediate); the destination gives the slot back with a
/// 4-byte SEND of its index once the pages are installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Data of slot 0.
    pub addr: u64,
    /// Header of slot 0.
    pub headers: u64,
    /// Key of both.
    pub rkey: u32,
    /// Slots.
    pub slots: u32,
    /// Bytes per slot.
    pub slot_bytes: u64,
}

/// Most ring slots.
pub const MAX_RING_SLOTS: u32 = 256;
/// Largest ring slot.
pub const MAX_SLOT_BYTES: u64 = 8 << 20;
/// Bytes of a slot header.
pub const HEADER_BYTES: u64 = 16;

impl Ring {
    /// A slot header: first page and pages.
    pub fn header(first: u64, n_pages: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&first.to_le_bytes());
        h[8..12].copy_from_slice(&n_pages.to_le_bytes());
        h
    }

    /// Decode a slot header the peer wrote (checked by the caller against the guest).
    pub fn parse_header(h: &[u8; 16]) -> (u64, u32) {
        let mut f = [0u8; 8];
        f.copy_from_slice(&h[..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&h[8..12]);
        (u64::from_le_bytes(f), u32::from_le_bytes(n))
    }
}

/// A malformed setup message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed RDMA setup: {0}")]
pub struct SetupError(pub String);

fn err(s: &str) -> SetupError {
    SetupError(s.to_string())
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SetupError> {
        if self.0.len() < n {
            return Err(err("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SetupError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, SetupError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| err("truncated"))?))
    }
    fn u64(&mut self) -> Result<u64, SetupError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| err("truncated"))?))
    }
}

/// A count or length as one byte (the decoder refuses what is over its limits).
fn byte(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn put_endpoints(out: &mut Vec<u8>, eps: &[Endpoint]) {
    out.push(byte(eps.len()));
    for e in eps {
        out.push(byte(e.0.len()));
        out.extend_from_slice(&e.0);
    }
}

fn get_endpoints(rd: &mut Rd<'_>) -> Result<Vec<Endpoint>, SetupError> {
    let n = rd.u8()? as usize;
    if n == 0 || n > MAX_QPS {
        return Err(err("queue pair count"));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let len = rd.u8()? as usize;
        if len == 0 || len > MAX_ENDPOINT_LEN {
            return Err(err("endpoint length"));
        }
        v.push(Endpoint(rd.take(len)?.to_vec()));
    }
    Ok(v)
}

impl Offer {
    /// Encode (panics on nothing: oversized parts are cut by the caller's checks).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![KIND_OFFER, VERSION];
        let name = &self.device.as_bytes()[..self.device.len().min(64)];
        out.push(byte(name.len()));
        out.extend_from_slice(name);
        put_endpoints(&mut out, &self.endpoints);
        out.push(byte(self.regions.len()));
        for r in &self.regions {
            out.extend_from_slice(&r.first_page.to_le_bytes());
            out.extend_from_slice(&r.n_pages.to_le_bytes());
            out.extend_from_slice(&r.addr.to_le_bytes());
            out.extend_from_slice(&r.rkey.to_le_bytes());
        }
        out
    }

    /// Decode and check it against a guest of `n_pages` pages of
    /// `page_bytes`: the regions must cover every page once, in order.
    pub fn decode(b: &[u8], n_pages: u64, page_bytes: u64) -> Result<Offer, SetupError> {
        if b.len() > MAX_SETUP_LEN {
            return Err(err("too long"));
        }
        let mut rd = Rd(b);
        if rd.u8()? != KIND_OFFER {
            return Err(err("not an offer"));
        }
        if rd.u8()? != VERSION {
            return Err(err("version"));
        }
        let nl = rd.u8()? as usize;
        if nl > 64 {
            return Err(err("device name length"));
        }
        let device = String::from_utf8(rd.take(nl)?.to_vec()).map_err(|_| err("device name is not UTF-8"))?;
        let endpoints = get_endpoints(&mut rd)?;
        let nr = rd.u8()? as usize;
        if nr == 0 || nr > MAX_REGIONS {
            return Err(err("region count"));
        }
        let mut regions = Vec::with_capacity(nr);
        let mut next = 0u64;
        for _ in 0..nr {
            let r = RemoteRegion { first_page: rd.u64()?, n_pages: rd.u64()?, addr: rd.u64()?, rkey: rd.u32()? };
            if r.first_page != next || r.n_pages == 0 {
                return Err(err("regions do not cover the guest's pages in order"));
            }
            let bytes = r.n_pages.checked_mul(page_bytes).ok_or_else(|| err("region size"))?;
            if r.addr.checked_add(bytes).is_none() {
                return Err(err("region address"));
            }
            next = next.checked_add(r.n_pages).ok_or_else(|| err("region size"))?;
            regions.push(r);
        }
        if next != n_pages {
            return Err(err("regions do not cover the guest's pages"));
        }
        if !rd.0.is_empty() {
            return Err(err("trailing bytes"));
        }
        Ok(Offer { device, endpoints, regions })
    }

    /// Where page `p` is in the source, and its key; `n` pages from it lie
    /// in one region (`n` is cut to the region's end).
    pub fn locate(&self, p: u64, n: u64, page_bytes: u64) -> Option<(u64, u32, u64)> {
        let i = self.regions.partition_point(|r| r.first_page + r.n_pages <= p);
        let r = self.regions.get(i)?;
        if p < r.first_page {
            return None;
        }
        let n = n.min(r.first_page + r.n_pages - p);
        Some((r.addr + (p - r.first_page) * page_bytes, r.rkey, n))
    }
}

impl Answer {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![KIND_ANSWER, VERSION];
        put_endpoints(&mut out, &self.endpoints);
        match &self.ring {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                out.extend_from_slice(&r.addr.to_le_bytes());
                out.extend_from_slice(&r.headers.to_le_bytes());
                out.extend_from_slice(&r.rkey.to_le_bytes());
                out.extend_from_slice(&r.slots.to_le_bytes());
                out.extend_from_slice(&r.slot_bytes.to_le_bytes());
            }
        }
        out
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Answer, SetupError> {
        if b.len() > MAX_SETUP_LEN {
            return Err(err("too long"));
        }
        let mut rd = Rd(b);
        if rd.u8()? != KIND_ANSWER {
            return Err(err("not an answer"));
        }
        if rd.u8()? != VERSION {
            return Err(err("version"));
        }
        let endpoints = get_endpoints(&mut rd)?;
        let ring = match rd.u8()? {
            0 => None,
            1 => {
                let r = Ring {
                    addr: rd.u64()?,
                    headers: rd.u64()?,
                    rkey: rd.u32()?,
                    slots: rd.u32()?,
                    slot_bytes: rd.u64()?,
                };
                if r.slots == 0 || r.slots > MAX_RING_SLOTS {
                    return Err(err("ring slot count"));
                }
                if r.slot_bytes == 0 || r.slot_bytes > MAX_SLOT_BYTES {
                    return Err(err("ring slot size"));
                }
                let span = u64::from(r.slots) * r.slot_bytes;
                if r.addr.checked_add(span).is_none()
                    || r.headers.checked_add(u64::from(r.slots) * HEADER_BYTES).is_none()
                {
                    return Err(err("ring address"));
                }
                Some(r)
            }
            _ => return Err(err("ring flag")),
        };
        if !rd.0.is_empty() {
            return Err(err("trailing bytes"));
        }
        Ok(Answer { endpoints, ring })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            device: "sim".into(),
            endpoints: vec![Endpoint(vec![1; 17]), Endpoint(vec![2; 17])],
            regions: vec![
                RemoteRegion { first_page: 0, n_pages: 10, addr: 0x10000, rkey: 7 },
                RemoteRegion { first_page: 10, n_pages: 6, addr: 0x90000, rkey: 8 },
            ],
        }
    }

    #[test]
    fn round_trips_and_locates() {
        let o = offer();
        let d = Offer::decode(&o.encode(), 16, 4096).unwrap();
        assert_eq!(d, o);
        assert_eq!(d.locate(3, 100, 4096), Some((0x10000 + 3 * 4096, 7, 7)));
        assert_eq!(d.locate(12, 2, 4096), Some((0x90000 + 2 * 4096, 8, 2)));
        assert_eq!(d.locate(16, 1, 4096), None);
        let a = Answer { endpoints: vec![Endpoint(vec![3; 9])], ring: None };
        assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        let ring = Ring { addr: 0x1000, headers: 0x9000, rkey: 5, slots: 16, slot_bytes: 256 << 10 };
        let a = Answer { endpoints: vec![Endpoint(vec![3; 9])], ring: Some(ring) };
        assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        let bad = Answer { ring: Some(Ring { slots: 0, ..ring }), ..a.clone() };
        assert!(Answer::decode(&bad.encode()).is_err());
        let bad = Answer { ring: Some(Ring { slot_bytes: 1 << 40, ..ring }), ..a };
        assert!(Answer::decode(&bad.encode()).is_err());
        assert_eq!(Ring::parse_header(&Ring::header(77, 9)), (77, 9));
    }

    #[test]
    fn refuses_what_does_not_match_the_guest() {
        let b = offer().encode();
        assert!(Offer::decode(&b, 17, 4096).is_err());
        assert!(Offer::decode(&b[..b.len() - 1], 16, 4096).is_err());
        let mut gap = offer();
        gap.regions[1].first_page = 11;
        assert!(Offer::decode(&gap.encode(), 17, 4096).is_err());
        let mut wrap = offer();
        wrap.regions[1].addr = u64::MAX - 4096;
        assert!(Offer::decode(&wrap.encode(), 16, 4096).is_err());
        assert!(Answer::decode(&b).is_err());
        let mut name = offer().encode();
        name[3] = 0xfa;
        assert!(Offer::decode(&name, 16, 4096).is_err(), "a device name that is not UTF-8");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Offer::decode(&b, 100, 4096);
            let _ = Answer::decode(&b);
        }
    }
}
