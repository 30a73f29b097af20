//! A cached token and what proves who may have it: the [`Entry`], the keyed fingerprint of
//! the secret that minted it ([`TokenCredential`]), and the two JSON forms of a token (WeChat's
//! answer read, wxgate's answer written).
//!
//! The secret itself is never kept. A [`TokenCredential`] is HMAC-SHA256 over (API, appid,
//! secret) under a key that is random per process, or derived from the cluster secret when
//! replicas share tokens (so that each replica can check a secret against a token another
//! one fetched). A presented secret is checked with `hmac::verify`, in constant time.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::policy::Held;
use super::request::{TokenKind, TokenRequest};
use crate::wechat::LenientNumber;

/// The longest token wxgate caches (WeChat asks for 512 characters of storage).
pub const MAX_TOKEN_LEN: usize = 2048;

/// The longest lifetime wxgate believes (WeChat's is at most 7200 s).
const MAX_LIFETIME_SECS: u64 = 86_400;

/// A token in the cache.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The token, handed to callers whose credential matches.
    pub token: Arc<str>,
    /// Its times, for the decisions of [`super::policy`].
    pub held: Held,
    /// Whose secret minted it.
    pub credential: TokenCredential,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// The keyed fingerprint of the secret that minted a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenCredential([u8; 32]);

impl TokenCredential {
    /// Whether two credentials are the same, in constant time.
    pub fn same_as(&self, other: &TokenCredential) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for TokenCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCredential(..)")
    }
}

/// Makes and checks [`TokenCredential`]s.
pub struct TokenCredentialKey(hmac::Key);

impl TokenCredentialKey {
    /// A key of this process alone (no replicas share its tokens).
    pub fn random() -> TokenCredentialKey {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the operating system's random source works");
        TokenCredentialKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
    }

    /// The key every replica derives from the cluster secret (its own label, so that it is
    /// independent of the keys of fingerprints and sealing).
    pub fn from_cluster_secret(secret: &[u8]) -> TokenCredentialKey {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&root, b"wxgate token credential v1");
        TokenCredentialKey(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// The credential of `request`.
    pub fn credential(&self, request: &TokenRequest) -> TokenCredential {
        let tag = hmac::sign(&self.0, &Self::message(request));
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(tag.as_ref());
        TokenCredential(bytes)
    }

    /// (API, appid, secret), each with its length, so that no two triples write the same
    /// bytes.
    fn message(request: &TokenRequest) -> Vec<u8> {
        let key = request.key();
        let fields: [&[u8]; 3] = [
            key.kind.api().label().as_bytes(),
            key.appid.as_bytes(),
            request.secret(),
        ];
        let mut message = Vec::with_capacity(64 + request.secret().len());
        for field in fields {
            message.extend_from_slice(&(field.len() as u64).to_be_bytes());
            message.extend_from_slice(field);
        }
        message
    }
}

impl Entry {
    /// The entry for WeChat's successful answer to a fetch sent at `issued`, if the body is
    /// a token answer wxgate can read (`None`: passed through, not cached).
    pub fn from_answer(
        kind: TokenKind,
        body: &[u8],
        issued: SystemTime,
        credential: TokenCredential,
        forced_at: Option<SystemTime>,
    ) -> Option<Entry> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let token = value.get(kind.token_field())?.as_str()?;
        let expires_in = serde_json::from_value::<LenientNumber>(value.get("expires_in")?.clone());
        let lifetime = u64::try_from(expires_in.ok()?.value()?).ok()?;
        let plausible = (1..=MAX_TOKEN_LEN).contains(&token.len())
            && (1..=MAX_LIFETIME_SECS).contains(&lifetime);
        let lifetime = Duration::from_secs(lifetime);
        plausible.then(|| Entry {
            token: token.into(),
            held: Held {
                issued,
                // From when the fetch was sent: never later than WeChat's own expiry.
                expires_at: issued + lifetime,
                lifetime,
                forced_at,
            },
            credential,
        })
    }

    /// wxgate's answer with this token: WeChat's fields, the lifetime that remains.
    pub fn answer_body(&self, kind: TokenKind, expires_in: u64) -> Bytes {
        let mut body = serde_json::Map::new();
        body.insert(kind.token_field().into(), (*self.token).into());
        body.insert("expires_in".into(), expires_in.into());
        Bytes::from(serde_json::Value::Object(body).to_string())
    }

    /// The entry as replicas store it (sealed before it reaches Redis).
    pub fn to_record(&self) -> Vec<u8> {
        let record = EntryRecord {
            token: self.token.to_string(),
            issued_us: micros(self.held.issued),
            expires_at_us: micros(self.held.expires_at),
            lifetime_ms: self.held.lifetime.as_millis() as u64,
            forced_at_us: self.held.forced_at.map(micros),
            credential: self.credential.0,
        };
        serde_json::to_vec(&record).expect("an entry's record serializes")
    }

    /// An entry stored by [`Entry::to_record`].
    pub fn from_record(bytes: &[u8]) -> Option<Entry> {
        let record: EntryRecord = serde_json::from_slice(bytes).ok()?;
        Some(Entry {
            token: record.token.into(),
            held: Held {
                issued: from_micros(record.issued_us),
                expires_at: from_micros(record.expires_at_us),
                lifetime: Duration::from_millis(record.lifetime_ms),
                forced_at: record.forced_at_us.map(from_micros),
            },
            credential: TokenCredential(record.credential),
        })
    }
}

/// What a replica writes (inside the sealed value) for an entry.
#[derive(Serialize, Deserialize)]
struct EntryRecord {
    token: String,
    issued_us: u64,
    expires_at_us: u64,
    lifetime_ms: u64,
    forced_at_us: Option<u64>,
    credential: [u8; 32],
}

/// Microseconds since the epoch: how times travel between replicas (and order tokens in
/// Redis, where a Lua number holds them exactly).
pub fn micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The time `micros` after the epoch.
pub fn from_micros(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::Api;
    use http::Method;

    fn request(secret: &str) -> TokenRequest {
        let query =
            format!("grant_type=client_credential&appid=wx00000000000000a1&secret={secret}");
        TokenRequest::read(Api::Token, &Method::GET, &query, b"").unwrap()
    }

    #[test]
    fn a_credential_matches_its_own_secret_only() {
        let key = TokenCredentialKey::random();
        let credential = key.credential(&request("right"));
        assert!(key.credential(&request("right")).same_as(&credential));
        assert!(!key.credential(&request("wrong")).same_as(&credential));
        // Another process: another key, so its credentials mean nothing here.
        assert!(!TokenCredentialKey::random()
            .credential(&request("right"))
            .same_as(&credential));
        // Replicas derive the same key from the cluster secret.
        let secret = [7u8; 32];
        let a = TokenCredentialKey::from_cluster_secret(&secret);
        let b = TokenCredentialKey::from_cluster_secret(&secret);
        assert!(b
            .credential(&request("right"))
            .same_as(&a.credential(&request("right"))));
        assert_eq!(format!("{credential:?}"), "TokenCredential(..)");
    }

    #[test]
    fn wechat_answers_are_read_leniently_and_checked() {
        let issued = from_micros(1_700_000_000_000_000);
        let credential = TokenCredentialKey::random().credential(&request("s"));
        let read = |kind, body: &str| {
            Entry::from_answer(kind, body.as_bytes(), issued, credential.clone(), None)
        };
        let entry = read(
            TokenKind::Token,
            r#"{"access_token":"T","expires_in":7200}"#,
        )
        .unwrap();
        assert_eq!(&*entry.token, "T");
        assert_eq!(entry.held.expires_at, issued + Duration::from_secs(7200));
        assert!(read(
            TokenKind::Token,
            r#"{"access_token":"T","expires_in":"7200"}"#
        )
        .is_some());
        let component = r#"{"component_access_token":"C","expires_in":7200}"#;
        assert!(read(TokenKind::Component, component).is_some());
        assert!(read(TokenKind::Token, component).is_none());
        for body in [
            r#"{"access_token":"T"}"#,
            r#"{"access_token":"T","expires_in":0}"#,
            r#"{"access_token":"","expires_in":7200}"#,
            r#"{"access_token":7,"expires_in":7200}"#,
            r#"{"errcode":40125,"errmsg":"invalid appsecret"}"#,
            "not json",
        ] {
            assert!(read(TokenKind::Token, body).is_none(), "{body}");
        }
    }

    #[test]
    fn answers_and_stored_entries_round_trip() {
        let issued = from_micros(1_700_000_000_123_456);
        let credential = TokenCredentialKey::random().credential(&request("s"));
        let body = r#"{"access_token":"T\"1","expires_in":7200}"#;
        let entry = Entry::from_answer(
            TokenKind::Stable,
            body.as_bytes(),
            issued,
            credential,
            Some(issued),
        )
        .unwrap();
        let written = entry.answer_body(TokenKind::Stable, 42);
        let value: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(value["access_token"], "T\"1");
        assert_eq!(value["expires_in"], 42);
        assert_eq!(Entry::from_record(&entry.to_record()), Some(entry.clone()));
        assert!(!format!("{entry:?}").contains("T\\\"1"));
    }
}
