//! What makes the shared state unreadable to anyone with access to Redis, and what a
//! replica written value proves: keys are keyed fingerprints, values are sealed (encrypted
//! and authenticated) or carry a MAC.
//!
//! The three keys come from the cluster secret that every replica shares (`[cluster]
//! secret_file` or `WXGATE_CLUSTER_SECRET`), through HMAC-SHA256 with a label per use, so
//! that the fingerprint key, the MAC key and the sealing key are independent. ring provides
//! HMAC and ChaCha20-Poly1305 (it is already in the tree for TLS): no hand-written
//! cryptography.
//!
//! - A **fingerprint** of (what, fields…) is HMAC-SHA256 over the fields, each written with
//!   its length so that no two field lists write the same bytes, truncated to 128 bits and
//!   written as 32 hex characters. Without the secret, a fingerprint says nothing of the
//!   appid, credential or code behind it, and nobody can aim at a chosen key.
//! - A **MAC** of (what, fields…) is written the same way under its own key: a value stored
//!   in plain text (a token entry's issue time, a heartbeat) carries the MAC of what it
//!   states, and a replica believes it only if the MAC is right ([`Sealing::verify`]).
//!   Nobody without the secret can write a value that passes.
//! - A **sealed** value is a random 96-bit nonce followed by ChaCha20-Poly1305 ciphertext
//!   and tag, with the key's fingerprint as associated data: a value moved to another key
//!   does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Lower-case hex digits, for fingerprints.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Fingerprints and sealing under the cluster secret.
pub struct Sealing {
    fingerprint: hmac::Key,
    mac: hmac::Key,
    seal: LessSafeKey,
    random: SystemRandom,
}

/// A sealed value did not open: wrong secret, another key's value, or tampering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a value in Redis did not open with this cluster secret")]
pub struct Unsealable;

impl Sealing {
    /// Derives the fingerprint and sealing keys from the cluster secret.
    pub fn new(secret: &[u8]) -> Sealing {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let fingerprint =
            hmac::Key::new(hmac::HMAC_SHA256, derive(b"wxgate fingerprint v1").as_ref());
        let mac = hmac::Key::new(hmac::HMAC_SHA256, derive(b"wxgate mac v1").as_ref());
        let seal_key = derive(b"wxgate seal v1");
        let seal = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, seal_key.as_ref())
                .expect("an HMAC-SHA256 output is a 256-bit key"),
        );
        Sealing {
            fingerprint,
            mac,
            seal,
            random: SystemRandom::new(),
        }
    }

    /// The fingerprint of `fields` for the use `what` (`quota`, `code`, `token`…).
    pub fn fingerprint(&self, what: &str, fields: &[&[u8]]) -> String {
        hex_tag(&self.fingerprint, what, fields)
    }

    /// The MAC of `fields` for the use `what`, as 32 hex characters.
    pub fn mac(&self, what: &str, fields: &[&[u8]]) -> String {
        hex_tag(&self.mac, what, fields)
    }

    /// Whether `mac` is the MAC of `fields` for the use `what` (compared in constant time).
    pub fn verify(&self, what: &str, fields: &[&[u8]], mac: &[u8]) -> bool {
        let expected = self.mac(what, fields);
        expected.len() == mac.len()
            && expected
                .bytes()
                .zip(mac)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Seals `plain` for the key whose fingerprint is `fingerprint`.
    pub fn seal(&self, fingerprint: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the operating system's random source works");
        let mut sealed = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plain);
        let tag = self
            .seal
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(fingerprint.as_bytes()),
                &mut sealed[NONCE_LEN..],
            )
            .expect("a value under 256 GiB seals");
        sealed.extend_from_slice(tag.as_ref());
        sealed
    }

    /// Opens a value sealed for `fingerprint`.
    pub fn open(&self, fingerprint: &str, sealed: &[u8]) -> Result<Vec<u8>, Unsealable> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(Unsealable);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unsealable)?;
        let mut buffer = rest.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::from(fingerprint.as_bytes()), &mut buffer)
            .map_err(|_| Unsealable)?;
        Ok(plain.to_vec())
    }
}

/// HMAC-SHA256 under `key` of `what` and `fields`, each written with its length, truncated
/// to 128 bits and written as 32 hex characters.
fn hex_tag(key: &hmac::Key, what: &str, fields: &[&[u8]]) -> String {
    let mut context = hmac::Context::with_key(key);
    for field in std::iter::once(what.as_bytes()).chain(fields.iter().copied()) {
        context.update(&(field.len() as u64).to_be_bytes());
        context.update(field);
    }
    let tag = context.sign();
    let mut hex = String::with_capacity(32);
    for byte in &tag.as_ref()[..16] {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn fingerprints_are_stable_keyed_and_unambiguous() {
        let sealing = Sealing::new(SECRET);
        let a = sealing.fingerprint("code", &[b"wxa", b"secret", b"code"]);
        assert_eq!(a.len(), 32);
        assert_eq!(
            a,
            sealing.fingerprint("code", &[b"wxa", b"secret", b"code"])
        );
        assert_ne!(
            a,
            sealing.fingerprint("code", &[b"wxas", b"ecret", b"code"])
        );
        assert_ne!(
            a,
            sealing.fingerprint("quota", &[b"wxa", b"secret", b"code"])
        );
        let other = Sealing::new(b"another secret, also 32 bytes!!!");
        assert_ne!(a, other.fingerprint("code", &[b"wxa", b"secret", b"code"]));
        assert!(!a.contains("wxa"));
    }

    #[test]
    fn macs_verify_only_their_own_fields_under_their_own_secret() {
        let sealing = Sealing::new(SECRET);
        let mac = sealing.mac("token-entry", &[b"f", b"17"]);
        assert!(sealing.verify("token-entry", &[b"f", b"17"], mac.as_bytes()));
        assert!(!sealing.verify("token-entry", &[b"f", b"18"], mac.as_bytes()));
        assert!(!sealing.verify("token-dropped", &[b"f", b"17"], mac.as_bytes()));
        assert!(!sealing.verify("token-entry", &[b"f", b"17"], &mac.as_bytes()[1..]));
        assert!(!sealing.verify("token-entry", &[b"f", b"17"], b""));
        // Independent of the fingerprint of the same fields.
        assert_ne!(mac, sealing.fingerprint("token-entry", &[b"f", b"17"]));
        let other = Sealing::new(b"another secret, also 32 bytes!!!");
        assert!(!other.verify("token-entry", &[b"f", b"17"], mac.as_bytes()));
    }

    #[test]
    fn sealed_values_open_only_under_their_key_and_secret() {
        let sealing = Sealing::new(SECRET);
        let plain = br#"{"openid":"o","session_key":"k"}"#;
        let sealed = sealing.seal("f1", plain);
        assert!(!sealed.windows(11).any(|w| w == b"session_key"));
        assert_eq!(sealing.open("f1", &sealed).unwrap(), plain);
        // Moved to another key, tampered with, or under another secret: it does not open.
        assert_eq!(sealing.open("f2", &sealed), Err(Unsealable));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(sealing.open("f1", &tampered), Err(Unsealable));
        let other = Sealing::new(b"another secret, also 32 bytes!!!");
        assert_eq!(other.open("f1", &sealed), Err(Unsealable));
        assert_eq!(sealing.open("f1", b"short"), Err(Unsealable));
        // Two seals of the same value differ (fresh nonces).
        assert_ne!(sealed, sealing.seal("f1", plain));
    }
}
