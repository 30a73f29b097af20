//! The proof, without a server, that no script can meet `CROSSSLOT`: every key of every
//! script (and the channel a result is published on) hashes to one Redis Cluster slot, by
//! Redis's own rule (CRC16 of the hash tag, modulo 16384). `tests/it/cluster_topologies.rs`
//! runs every script on a real cluster too.

use std::time::Duration;

use super::scripts::*;
use super::{Cluster, Invocation, Tag};
use crate::config::Config;

/// CRC16-CCITT (XModem), as Redis Cluster computes it.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (between the first `{` and the next `}`, when not
/// empty), else of the whole key.
fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

#[test]
fn the_slot_function_is_redis_clusters() {
    assert_eq!(crc16(b"123456789"), 0x31c3);
    // `CLUSTER KEYSLOT foo` and the tag rule's examples from Redis's documentation.
    assert_eq!(slot(b"foo"), 12182);
    assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
    assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
    assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
}

/// A replica's cluster layer (nothing is connected) with `key_prefix`.
fn cluster(key_prefix: &str) -> Cluster {
    let secret = std::env::temp_dir().join(format!(
        "wxgate-slots-secret-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let text = format!(
        "[cluster]\nredis_url = \"redis://127.0.0.1:1\"\nkey_prefix = \"{key_prefix}\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    let config = Config::from_toml_str(&text).unwrap();
    std::fs::remove_file(&secret).unwrap();
    let registry = prometheus::Registry::new();
    let metrics = crate::metrics::Metrics::new(&registry).unwrap();
    Cluster::new(
        config.cluster.as_ref().unwrap(),
        Duration::from_secs(60),
        &metrics,
    )
    .unwrap()
}

/// The keys a script is given, and the channel [`CompleteClaim`] publishes on.
fn keys_of<S: Script>(cluster: &Cluster, script: &S) -> Vec<String> {
    let mut invocation = Invocation::default();
    script.write(cluster, &mut invocation);
    let mut keys = invocation.keys.clone();
    for arg in &invocation.args {
        let text = String::from_utf8_lossy(arg);
        if text.contains(":cn:") {
            keys.push(text.into_owned());
        }
    }
    keys
}

/// Asserts that every key of `script` hashes to one slot, and that it names its keys.
fn one_slot<S: Script>(cluster: &Cluster, name: &str, script: &S) -> u16 {
    let keys = keys_of(cluster, script);
    assert!(!keys.is_empty(), "{name} names no key");
    let slots: Vec<u16> = keys.iter().map(|key| slot(key.as_bytes())).collect();
    assert!(
        slots.iter().all(|slot| *slot == slots[0]),
        "{name}'s keys are in several slots: {keys:?} → {slots:?}"
    );
    slots[0]
}

#[tokio::test]
async fn every_key_of_every_script_hashes_to_one_slot() {
    for prefix in ["wxgate:", "{deployment}:"] {
        let cluster = cluster(prefix);
        let tag = cluster.appid_tag(b"wx0123456789abcdef");
        let other = cluster.appid_tag(b"wxfedcba9876543210");
        assert_ne!(tag, other, "two appids, two tags");
        let bucket = Bucket {
            tag: tag.clone(),
            fingerprint: "f0".repeat(16),
            interval: Duration::from_millis(12),
            burst: 10,
            window: Duration::from_secs(60),
        };
        let code = "c0".repeat(16);
        let token = "70".repeat(16);
        let lease = Duration::from_secs(12);
        let mut appid_slots = vec![
            one_slot(&cluster, "TakeTurn", &TakeTurn(&bucket)),
            one_slot(
                &cluster,
                "PauseBucket",
                &PauseBucket {
                    tag: &tag,
                    fingerprint: &bucket.fingerprint,
                    window: bucket.window,
                },
            ),
        ];
        for turn in [None, Some(&bucket)] {
            appid_slots.push(one_slot(
                &cluster,
                "ClaimCode",
                &ClaimCode {
                    tag: &tag,
                    fingerprint: &code,
                    owner: "o",
                    lease,
                    turn,
                },
            ));
        }
        appid_slots.extend([
            one_slot(
                &cluster,
                "PeekCode",
                &PeekCode {
                    tag: &tag,
                    fingerprint: &code,
                    lease,
                },
            ),
            one_slot(
                &cluster,
                "RenewClaim",
                &RenewClaim {
                    tag: &tag,
                    fingerprint: &code,
                    owner: "o",
                    lease,
                },
            ),
            one_slot(
                &cluster,
                "CompleteClaim",
                &CompleteClaim {
                    tag: &tag,
                    fingerprint: &code,
                    owner: "o",
                    sealed: b"sealed",
                    remember: lease,
                    for_waiters: lease,
                },
            ),
            one_slot(
                &cluster,
                "ReadToken",
                &ReadToken {
                    tag: &tag,
                    fingerprint: &token,
                },
            ),
            one_slot(
                &cluster,
                "TakeLease",
                &TakeLease {
                    tag: &tag,
                    fingerprint: &token,
                    owner: "o",
                    ttl: lease,
                },
            ),
            one_slot(
                &cluster,
                "ReleaseLease",
                &ReleaseLease {
                    tag: &tag,
                    fingerprint: &token,
                    owner: "o",
                },
            ),
            one_slot(
                &cluster,
                "StoreToken",
                &StoreToken {
                    tag: &tag,
                    fingerprint: &token,
                    token_fingerprint: "ab",
                    issued_micros: 1,
                    sealed: b"sealed",
                    mac: "m",
                    keep: lease,
                    replacing: None,
                },
            ),
            one_slot(
                &cluster,
                "DropToken",
                &DropToken {
                    tag: &tag,
                    fingerprint: &token,
                    token_fingerprint: "ab",
                    mac: "m",
                },
            ),
            one_slot(
                &cluster,
                "CountFetch",
                &CountFetch {
                    tag: &tag,
                    fingerprint: &token,
                    day: 20_000,
                },
            ),
            one_slot(
                &cluster,
                "LeaseLimit",
                &LeaseLimit {
                    tag: &tag,
                    fingerprint: &bucket.fingerprint,
                    owner: "o",
                    lease,
                    take: true,
                },
            ),
            one_slot(
                &cluster,
                "StoreLimit",
                &StoreLimit {
                    record: LimitRecord::Learned,
                    tag: &tag,
                    fingerprint: &bucket.fingerprint,
                    sealed: b"sealed",
                    keep: lease,
                },
            ),
            one_slot(
                &cluster,
                "ReadLearned",
                &ReadLearned {
                    tag: &tag,
                    fingerprints: &[bucket.fingerprint.clone(), "b0".repeat(16)],
                },
            ),
            one_slot(
                &cluster,
                "ReadTurns",
                &ReadTurns {
                    tag: &tag,
                    fingerprint: &bucket.fingerprint,
                    window: bucket.window,
                },
            ),
        ]);
        // Everything of one appid in one slot, whatever the script.
        assert!(
            appid_slots.iter().all(|slot| *slot == appid_slots[0]),
            "{prefix}: {appid_slots:?}"
        );
        // The replicas' own keys, in one slot of their own.
        let heartbeat = Heartbeat {
            member: "m",
            previous: "",
            ttl: Duration::from_secs(5),
            fresh_epoch: "e",
            secret_check: "s",
            most: 10,
        };
        let replicas = one_slot(&cluster, "Heartbeat", &heartbeat);
        let resume = Resume {
            window: Duration::from_secs(60),
            margin: Duration::from_secs(2),
        };
        assert_eq!(one_slot(&cluster, "Resume", &resume), replicas);
        // The token index: one key, in its token's slot.
        let token_fingerprint = "3f".repeat(16);
        one_slot(
            &cluster,
            "IndexToken",
            &IndexToken {
                token_fingerprint: &token_fingerprint,
                tag: &tag,
                fingerprint: &token,
                keep: lease,
            },
        );
        one_slot(
            &cluster,
            "FindToken",
            &FindToken {
                token_fingerprint: &token_fingerprint,
            },
        );
        if prefix == "wxgate:" {
            // Without a tag in the prefix, appids spread over the slots.
            assert_ne!(appid_slots[0], replicas);
            let other_bucket = Bucket {
                tag: other.clone(),
                ..bucket.clone()
            };
            assert_ne!(
                one_slot(&cluster, "TakeTurn", &TakeTurn(&other_bucket)),
                appid_slots[0]
            );
        }
    }
}

#[test]
fn a_tag_read_back_is_hex_or_nothing() {
    assert_eq!(Tag::read("0123abcd"), Some(Tag("0123abcd".into())));
    assert_eq!(Tag::read("x}y{"), None);
    assert_eq!(Tag::read(""), None);
}
