//! Optional pre-shared-key authentication of the source's hello.
//!
//! The destination sends a fresh random nonce in ServerHello; the source
//! answers with `HMAC-SHA256(key, nonce || hello-body-without-mac)`. A peer
//! without the key cannot produce a hello the destination accepts, and a
//! recorded hello cannot be replayed against another nonce. The bulk
//! connection is bound to the session by the 64-bit random session cookie
//! handed out only after an accepted hello.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// The MAC the source puts in its hello.
pub fn hello_mac(key: &[u8], nonce: &[u8; NONCE_LEN], body_without_mac: &[u8]) -> [u8; MAC_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(nonce);
    m.update(body_without_mac);
    m.finalize().into_bytes().into()
}

/// Check a hello's MAC in constant time.
pub fn verify_hello_mac(key: &[u8], nonce: &[u8; NONCE_LEN], body_without_mac: &[u8], mac: &[u8; MAC_LEN]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(nonce);
    m.update(body_without_mac);
    m.verify_slice(mac).is_ok()
}

fn setup_nonce(session: u64, dir: u8) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&session.to_le_bytes());
    n[8..15].copy_from_slice(b"RDMASET");
    n[15] = dir;
    n
}

/// An RDMA setup message's body followed by its MAC: over the session
/// cookie, the direction (`dir`: 1 offer, 2 answer) and the body, with the
/// key, so endpoints and remote keys are accepted only from the peer the
/// hello authenticated; zeros without a key.
pub fn seal_setup(key: Option<&[u8]>, session: u64, dir: u8, body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    match key {
        Some(k) => out.extend_from_slice(&hello_mac(k, &setup_nonce(session, dir), body)),
        None => out.extend_from_slice(&[0; MAC_LEN]),
    }
    out
}

/// The body of a sealed setup message, if its MAC checks (or no key is set).
pub fn open_setup<'a>(key: Option<&[u8]>, session: u64, dir: u8, sealed: &'a [u8]) -> Result<&'a [u8], &'static str> {
    if sealed.len() < MAC_LEN {
        return Err("shorter than its MAC");
    }
    let (body, mac) = sealed.split_at(sealed.len() - MAC_LEN);
    let mac: &[u8; MAC_LEN] = mac.try_into().map_err(|_| "MAC length")?;
    match key {
        Some(k) if !verify_hello_mac(k, &setup_nonce(session, dir), body, mac) => Err("wrong MAC"),
        _ => Ok(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_mac_binds_session_direction_and_body() {
        let s = seal_setup(Some(b"k"), 7, 1, b"offer");
        assert_eq!(open_setup(Some(b"k"), 7, 1, &s), Ok(&b"offer"[..]));
        assert!(open_setup(Some(b"k"), 8, 1, &s).is_err());
        assert!(open_setup(Some(b"k"), 7, 2, &s).is_err());
        assert!(open_setup(Some(b"x"), 7, 1, &s).is_err());
        let mut t = s.clone();
        t[0] ^= 1;
        assert!(open_setup(Some(b"k"), 7, 1, &t).is_err());
        assert!(open_setup(Some(b"k"), 7, 1, &s[..10]).is_err());
        assert_eq!(open_setup(None, 7, 1, &seal_setup(None, 7, 1, b"a")), Ok(&b"a"[..]));
    }

    #[test]
    fn mac_binds_key_nonce_and_body() {
        let n = [1u8; NONCE_LEN];
        let mac = hello_mac(b"secret", &n, b"body");
        assert!(verify_hello_mac(b"secret", &n, b"body", &mac));
        assert!(!verify_hello_mac(b"other", &n, b"body", &mac));
        assert!(!verify_hello_mac(b"secret", &[2u8; NONCE_LEN], b"body", &mac));
        assert!(!verify_hello_mac(b"secret", &n, b"bodY", &mac));
    }
}
