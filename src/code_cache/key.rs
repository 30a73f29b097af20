//! The key of a code exchange: a 128-bit keyed hash of (API, appid, credential, js_code).
//!
//! The hash is keyed with a random per-process salt, so no credential, code or session is
//! ever a map key, nobody can choose keys that collide, and a caller with another credential
//! has another key (so it goes upstream and gets WeChat's own answer).

use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::wechat::Api;

/// A 128-bit keyed hash of (API, appid, credential, js_code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeKey(u64, u64);

/// The credential of an exchange, hashed into its key and never stored.
#[derive(Debug, Clone, Copy)]
pub enum CodeCredential<'a> {
    /// `/sns/jscode2session`: the app secret.
    Secret(&'a [u8]),
    /// `/sns/component/jscode2session`: the platform's appid and access token.
    Component {
        /// `component_appid`.
        appid: &'a [u8],
        /// `component_access_token`.
        access_token: &'a [u8],
    },
}

/// Makes [`CodeKey`]s with the process's salt.
pub(super) struct KeyMaker {
    /// The keys of the SipHash behind every [`CodeKey`], drawn per process.
    salt: (u64, u64),
}

impl KeyMaker {
    /// A key maker with a fresh random salt.
    pub(super) fn new() -> KeyMaker {
        KeyMaker {
            // Derived from std's RandomState, whose keys come from the OS's random source.
            salt: (
                RandomState::new().hash_one(0x77_78_67_61_74_65_u64),
                RandomState::new().hash_one(0x63_6f_64_65_73_u64),
            ),
        }
    }

    /// The key of an exchange.
    pub(super) fn key(
        &self,
        api: Api,
        appid: &[u8],
        credential: CodeCredential<'_>,
        js_code: &[u8],
    ) -> CodeKey {
        let fields = match credential {
            CodeCredential::Secret(secret) => (api.index(), appid, secret, &b""[..], js_code),
            CodeCredential::Component {
                appid: component,
                access_token,
            } => (api.index(), appid, component, access_token, js_code),
        };
        // One pass of SipHash-1-3 with a 128-bit output, over the raw bytes (never a lossy
        // text conversion). A slice's Hash writes its length first, so ("ab", "c") and
        // ("a", "bc") hash differently.
        let mut hasher = SipHasher13::new_with_keys(self.salt.0, self.salt.1);
        fields.hash(&mut hasher);
        let hash = hasher.finish128();
        CodeKey(hash.h1, hash.h2)
    }
}

impl Hash for CodeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: half of it places the key in the map, both halves compare.
        state.write_u64(self.0);
    }
}

/// The map's hasher: a [`CodeKey`] is the output of a keyed SipHash with a per-process
/// secret, so it is used as it is (hashing it again would buy no protection against
/// chosen keys, only cost).
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `CodeKey`; any input still hashes consistently.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
impl CodeKey {
    /// A key with chosen halves, for tests of the containers that hold keys.
    pub(super) fn from_parts(high: u64, low: u64) -> CodeKey {
        CodeKey(high, low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_field_and_are_stable() {
        let keys = KeyMaker::new();
        let secret = |api, appid: &[u8], secret: &'static [u8], code: &[u8]| {
            keys.key(api, appid, CodeCredential::Secret(secret), code)
        };
        let base = secret(Api::JsCode2Session, b"wxa", b"s", b"code");
        assert_eq!(base, secret(Api::JsCode2Session, b"wxa", b"s", b"code"));
        let component = CodeCredential::Component {
            appid: b"s",
            access_token: b"",
        };
        for other in [
            secret(Api::JsCode2Session, b"wxb", b"s", b"code"),
            secret(Api::JsCode2Session, b"wxa", b"t", b"code"),
            secret(Api::JsCode2Session, b"wxa", b"s", b"code2"),
            secret(Api::JsCode2Session, b"wxas", b"", b"code"),
            secret(Api::JsCode2Session, b"wxa", b"s\xff", b"code"),
            keys.key(Api::ComponentJsCode2Session, b"wxa", component, b"code"),
        ] {
            assert_ne!(base, other);
        }
        // Another process (another salt) keys the same exchange differently.
        let other_process = KeyMaker::new();
        let again = other_process.key(
            Api::JsCode2Session,
            b"wxa",
            CodeCredential::Secret(b"s"),
            b"code",
        );
        assert_ne!(base, again);
    }

    proptest::proptest! {
        /// Two exchanges that differ in API, appid, credential or code never share a key.
        #[test]
        fn different_exchanges_never_share_a_key(
            a in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..6), 4),
            b in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..6), 4),
            component in proptest::bool::ANY,
        ) {
            let keys = KeyMaker::new();
            let key = |f: &[Vec<u8>]| {
                let credential = if component {
                    CodeCredential::Component { appid: &f[1], access_token: &f[2] }
                } else {
                    CodeCredential::Secret(&f[1])
                };
                keys.key(Api::JsCode2Session, &f[0], credential, &f[3])
            };
            let same_fields = if component { a == b } else { (&a[0], &a[1], &a[3]) == (&b[0], &b[1], &b[3]) };
            proptest::prop_assert_eq!(key(&a) == key(&b), same_fields);
        }
    }
}
