//! Code exchanges across replicas: one upstream call per code, and its definitive answer
//! remembered where every replica finds it.
//!
//! Per exchange, Redis holds up to four keys, all named by the exchange's fingerprint (a
//! keyed HMAC of API, appid, credential and `js_code`, so no key names any of them):
//! - `ca:` the remembered answer (definitive answers only, for `code_cache.ttl_secs`);
//! - `cl:` the claim: the replica calling WeChat for this exchange, with a lease that the
//!   holder renews while its call runs, so a replica that dies releases it by itself;
//! - `cw:` a flag that other replicas wait, so that the holder publishes its result;
//! - `cr:` the holder's result for late waiters, a few seconds (not remembered otherwise).
//!
//! Values are sealed ([`super::sealing`]) with the fingerprint as associated data: nothing
//! stored is readable, and an answer moved to another key does not open.
//!
//! The claim and the look-up of a remembered answer are one atomic round trip
//! ([`super::scripts::CODE_CLAIM`]). A replica that finds another's claim waits for the
//! holder's message (Redis pub/sub on the fingerprint's channel), with a bounded fallback
//! look every [`FALLBACK_LOOK`] in case the message was missed. A code is never sent twice
//! while a live claim holds it; when a claim vanishes without a result (its holder died and
//! the lease ran out), the waiters answer `-1` and say so, rather than spend the code again.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio::time::Instant;

use super::quota::Turn;
use super::Cluster;
use super::RedisOp;

/// How often a waiting replica looks in Redis for a result it may have missed.
const FALLBACK_LOOK: Duration = Duration::from_millis(500);

/// How long the holder's result stays for waiters that look late.
const RESULT_FOR_WAITERS: Duration = Duration::from_secs(5);

/// The shared side of the code exchange.
pub struct SharedCodes {
    cluster: Arc<Cluster>,
    /// How long definitive answers are remembered (`code_cache.ttl_secs`), in ms; a reload
    /// may change it.
    ttl_ms: AtomicU64,
    /// A claim's lease: a little longer than one upstream call may take, renewed every
    /// third of it while the call runs.
    lease: Duration,
}

/// An answer as it is shared: status, Content-Type and body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAnswer {
    /// The upstream (or wxgate's) status.
    pub status: StatusCode,
    /// The Content-Type, if any.
    pub content_type: Option<HeaderValue>,
    /// The body.
    pub body: Bytes,
}

/// What a claim found.
pub enum Claim {
    /// A definitive answer another replica remembered.
    Remembered(SharedAnswer),
    /// This replica holds the claim: it calls WeChat, then [`SharedCodes::complete`]s. With
    /// the quota script's `(admitted, wait µs)` when a turn was taken along.
    Mine(Ticket, Option<(i64, i64)>),
    /// Another replica holds it: [`SharedCodes::wait`] for its result.
    Held,
    /// Redis is not available: the exchange goes on as in a single process.
    Unavailable,
}

/// What a waiting replica learned.
pub enum Waited {
    /// The holder's result (remembered or not).
    Answer(SharedAnswer),
    /// The claim vanished without a result: its holder went away.
    HolderGone,
    /// Redis went away while waiting.
    Unavailable,
}

/// A claim this replica holds.
pub struct Ticket {
    fingerprint: String,
    owner: String,
}

impl SharedCodes {
    /// Code exchanges shared through `cluster`, answers remembered for `ttl`, claims leased
    /// for a little longer than `call_timeout`.
    pub fn new(cluster: Arc<Cluster>, ttl: Duration, call_timeout: Duration) -> SharedCodes {
        SharedCodes {
            cluster,
            ttl_ms: AtomicU64::new(ttl.as_millis() as u64),
            lease: call_timeout + Duration::from_secs(2),
        }
    }

    /// Remember definitive answers for `ttl` from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether Redis can be asked now (a degraded replica keeps its exchanges to itself).
    pub fn available(&self) -> bool {
        self.cluster.reachable()
    }

    /// The fingerprint of an exchange: `fields` are the API and what makes it identical.
    pub fn fingerprint(&self, fields: &[&[u8]]) -> String {
        self.cluster.sealing().fingerprint("code", fields)
    }

    /// Looks for a remembered answer, or claims the exchange; when `turn` is given and the
    /// claim is won, the call's quota turn is taken in the same round trip
    /// ([`super::scripts::CODE_CLAIM`]).
    pub async fn claim(&self, fingerprint: &str, turn: Option<&Turn>) -> Claim {
        let cluster = &self.cluster;
        let owner = super::random_id();
        let mut invocation = cluster.scripts.code_claim.prepare_invoke();
        invocation
            .key(cluster.key("ca", fingerprint))
            .key(cluster.key("cl", fingerprint))
            .key(cluster.key("cw", fingerprint))
            .arg(&owner)
            .arg(self.lease.as_millis() as u64);
        if let Some(turn) = turn {
            // Keys 4 to 6 and arguments 3 to 5.
            turn.add_to(&mut invocation);
        }
        let Some((found, sealed, admitted, wait)) = cluster
            .eval::<(i64, Vec<u8>, i64, i64)>(RedisOp::CodeClaim, invocation)
            .await
        else {
            return Claim::Unavailable;
        };
        match found {
            1 => match self.open(fingerprint, &sealed) {
                Some(answer) => Claim::Remembered(answer),
                None => Claim::Unavailable,
            },
            2 => Claim::Mine(
                Ticket {
                    fingerprint: fingerprint.to_owned(),
                    owner,
                },
                turn.map(|_| (admitted, wait)),
            ),
            _ => Claim::Held,
        }
    }

    /// Runs `call` while renewing `ticket`'s lease, so that other replicas keep waiting for
    /// as long as this one is alive and calling.
    pub async fn holding<F: Future>(&self, ticket: &Ticket, call: F) -> F::Output {
        let mut call = std::pin::pin!(call);
        let every = self.lease / 3;
        let mut next = Instant::now() + every;
        loop {
            tokio::select! {
                biased;
                output = &mut call => return output,
                () = tokio::time::sleep_until(next) => {
                    self.renew(ticket).await;
                    next = Instant::now() + every;
                }
            }
        }
    }

    async fn renew(&self, ticket: &Ticket) {
        let cluster = &self.cluster;
        let mut invocation = cluster.scripts.code_renew.prepare_invoke();
        invocation
            .key(cluster.key("cl", &ticket.fingerprint))
            .arg(&ticket.owner)
            .arg(self.lease.as_millis() as u64);
        let _: Option<i64> = cluster.eval(RedisOp::CodeRenew, invocation).await;
    }

    /// Ends the claim with `answer`: remembered if `definitive`, handed to waiting replicas
    /// in any case.
    pub async fn complete(&self, ticket: Ticket, answer: &SharedAnswer, definitive: bool) {
        let cluster = &self.cluster;
        let sealed = cluster.sealing().seal(&ticket.fingerprint, &encode(answer));
        let remember = if definitive {
            Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
        } else {
            Duration::ZERO
        };
        let mut invocation = cluster.scripts.code_complete.prepare_invoke();
        invocation
            .key(cluster.key("ca", &ticket.fingerprint))
            .key(cluster.key("cl", &ticket.fingerprint))
            .key(cluster.key("cw", &ticket.fingerprint))
            .key(cluster.key("cr", &ticket.fingerprint))
            .arg(&ticket.owner)
            .arg(sealed)
            .arg(remember.as_millis() as u64)
            .arg(RESULT_FOR_WAITERS.as_millis() as u64)
            .arg(cluster.key("cn", &ticket.fingerprint));
        let _: Option<i64> = cluster.eval(RedisOp::CodeComplete, invocation).await;
    }

    /// Waits for the result of the replica holding the claim.
    pub async fn wait(&self, fingerprint: &str) -> Waited {
        let cluster = &self.cluster;
        let channel = cluster.key("cn", fingerprint);
        let mut notice = cluster.notices.register(&channel);
        if !cluster.subscribe(&channel).await {
            return Waited::Unavailable;
        }
        let waited = loop {
            // Looked at after subscribing, so a result published before is not missed.
            match self.peek(fingerprint).await {
                Some(Peeked::Answer(answer)) => break Waited::Answer(answer),
                Some(Peeked::Claimed) => {}
                Some(Peeked::Gone) => break Waited::HolderGone,
                None => break Waited::Unavailable,
            }
            tokio::select! {
                sealed = &mut notice => match sealed.ok().and_then(|sealed| self.open(fingerprint, &sealed)) {
                    Some(answer) => break Waited::Answer(answer),
                    None => notice = cluster.notices.register(&channel),
                },
                () = tokio::time::sleep(FALLBACK_LOOK) => {}
            }
        };
        drop(notice);
        if !cluster.notices.still_waited(&channel) {
            cluster.unsubscribe(&channel).await;
        }
        waited
    }

    async fn peek(&self, fingerprint: &str) -> Option<Peeked> {
        let cluster = &self.cluster;
        let mut invocation = cluster.scripts.code_peek.prepare_invoke();
        invocation
            .key(cluster.key("ca", fingerprint))
            .key(cluster.key("cl", fingerprint))
            .key(cluster.key("cr", fingerprint));
        let (found, sealed): (i64, Vec<u8>) = cluster.eval(RedisOp::CodePeek, invocation).await?;
        Some(match found {
            1 | 4 => match self.open(fingerprint, &sealed) {
                Some(answer) => Peeked::Answer(answer),
                None => Peeked::Gone,
            },
            3 => Peeked::Claimed,
            _ => Peeked::Gone,
        })
    }

    /// Opens a sealed answer; one that does not open (another cluster secret, tampering) is
    /// treated as absent, and logged without its content.
    fn open(&self, fingerprint: &str, sealed: &[u8]) -> Option<SharedAnswer> {
        match self.cluster.sealing().open(fingerprint, sealed) {
            Ok(plain) => decode(&plain),
            Err(error) => {
                tracing::warn!(%error, "a shared code-exchange answer was ignored");
                None
            }
        }
    }
}

enum Peeked {
    Answer(SharedAnswer),
    Claimed,
    Gone,
}

/// `status (2) | content-type length (2, 0xFFFF: none) | content-type | body`.
fn encode(answer: &SharedAnswer) -> Vec<u8> {
    let content_type = answer.content_type.as_ref().map(HeaderValue::as_bytes);
    let len = content_type.map_or(u16::MAX, |value| value.len() as u16);
    let mut out = Vec::with_capacity(4 + content_type.map_or(0, <[u8]>::len) + answer.body.len());
    out.extend_from_slice(&answer.status.as_u16().to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(content_type.unwrap_or_default());
    out.extend_from_slice(&answer.body);
    out
}

fn decode(data: &[u8]) -> Option<SharedAnswer> {
    let status = StatusCode::from_u16(u16::from_be_bytes([*data.first()?, *data.get(1)?])).ok()?;
    let len = u16::from_be_bytes([*data.get(2)?, *data.get(3)?]);
    let (content_type, body) = if len == u16::MAX {
        (None, data.get(4..)?)
    } else {
        let end = 4 + usize::from(len);
        let value = HeaderValue::from_bytes(data.get(4..end)?).ok()?;
        (Some(value), data.get(end..)?)
    };
    Some(SharedAnswer {
        status,
        content_type,
        body: Bytes::copy_from_slice(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_their_encoding() {
        for content_type in [None, Some("application/json; encoding=utf-8"), Some("")] {
            let answer = SharedAnswer {
                status: StatusCode::OK,
                content_type: content_type.map(|value| HeaderValue::from_str(value).unwrap()),
                body: Bytes::from_static(br#"{"openid":"o","session_key":"k"}"#),
            };
            assert_eq!(decode(&encode(&answer)), Some(answer));
        }
        assert_eq!(decode(b"\x00"), None);
        assert_eq!(decode(b"\x00\xc8\x00\x09ab"), None);
    }
}
