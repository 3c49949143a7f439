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

#[cfg(test)]
mod tests {
    use super::*;

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
