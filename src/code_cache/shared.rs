//! Code exchanges shared with the other replicas (`[cluster]`): one upstream call per code,
//! and its definitive answer remembered where every replica finds it.
//!
//! A leader with Redis reachable first claims its exchange in Redis under the exchange's
//! fingerprint (a keyed HMAC of API, appid, credential and `js_code`, so no key names any of
//! them), in the slot of its appid's tag, where its quota bucket is too ([`ExchangeName`]). The claim and the look-up of a remembered answer are one atomic round trip
//! ([`ClaimCode`]), which also takes the call's first quota turn when the quota can give one
//! ([`QuotaGate::turn_to_claim`](crate::quota::QuotaGate::turn_to_claim); settled by
//! [`FirstTurn::after_claim`]). Then:
//! - a remembered answer answers the exchange, and is kept in this replica's memory too;
//! - a claim won: this replica calls WeChat, renewing the claim's lease while the call runs
//!   (so a replica that dies releases it by itself), and completes the claim with the answer
//!   ([`CompleteClaim`]): remembered for `code_cache.ttl_secs` when definitive, handed to
//!   waiting replicas in any case;
//! - another replica's claim: this one waits for the holder's message (Redis pub/sub on the
//!   exchange's channel), with a bounded fallback look ([`PeekCode`]) every
//!   [`FALLBACK_LOOK`] in case the message was missed.
//!
//! A code is never sent twice while a live claim holds it; when a claim vanishes without a
//! result (its holder died and the lease ran out), the waiters answer `-1` and say so,
//! rather than spend the code again. A waiter waits one lease at most, whatever Redis says
//! (a claim written or kept alive by something else than a replica ends there too), and
//! a claim without expiry, which no replica writes, is taken over by the next claimant. Values are sealed with the fingerprint as associated
//! data: nothing stored is readable, and an answer moved to another key does not open.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use wxgate_contract::CacheStatus;

use super::key::CodeCredential;
use super::leader::CodeFlight;
use super::metrics::Tier;
use super::request;
use super::slots::{is_definitive, CodeSlot, MAX_REMEMBERED_BYTES};
use super::{CodeCache, CodeKey};
use crate::answer::{Answer, LocalAnswer, RememberedAnswer};
use crate::cluster::scripts::{
    ClaimCode, ClaimReply, CompleteClaim, PeekCode, PeekReply, RenewClaim,
};
use crate::cluster::{owner_id, Cluster, RedisOp, Tag};
use crate::dispatch::{Call, Dispatcher};
use crate::quota::FirstTurn;
use crate::wechat::{Api, WechatParams, JSON_CONTENT_TYPE};

/// How often a waiting replica looks in Redis for a result it may have missed.
const FALLBACK_LOOK: Duration = Duration::from_millis(500);

/// How long the holder's result stays for waiters that look late.
const RESULT_FOR_WAITERS: Duration = Duration::from_secs(5);

/// The code cache's side of the replicas' shared state.
pub struct SharedCodes {
    cluster: Arc<Cluster>,
    /// How long definitive answers are remembered (`code_cache.ttl_secs`), in ms; a reload
    /// may change it.
    ttl_ms: AtomicU64,
    /// A claim's lease: a little longer than one upstream call may take, renewed every
    /// third of it while the call runs.
    lease: Duration,
}

/// What a code exchange is named by in Redis: its appid's tag (the slot of its keys, and of
/// its quota bucket, so that a claim takes the call's first turn in the same script) and
/// its fingerprint.
pub(super) struct ExchangeName {
    tag: Tag,
    fingerprint: String,
}

/// A claim this replica holds.
struct Ticket {
    name: ExchangeName,
    owner: String,
}

impl CodeCache {
    /// With `[cluster]`: the exchange looked up and claimed in Redis under its `fingerprint`
    /// first; a remembered answer or another replica's call answers it without a call of
    /// this replica's own.
    pub(super) async fn lead_shared(
        &self,
        shared: &SharedCodes,
        name: ExchangeName,
        key: CodeKey,
        flight: &Arc<CodeFlight>,
        call: &Call,
        dispatcher: &Dispatcher,
    ) -> (Answer, CacheStatus) {
        // The call's first quota turn rides on the claim when the quota can give one there.
        let turn = call
            .quota_key
            .as_ref()
            .and_then(|key| dispatcher.quota().turn_to_claim(key));
        let owner = owner_id();
        let claim = ClaimCode {
            tag: &name.tag,
            fingerprint: &name.fingerprint,
            owner: &owner,
            lease: shared.lease,
            turn: turn.as_ref().map(|turn| turn.bucket()),
        };
        match shared.cluster.eval(&claim).await {
            Some(ClaimReply::Claimed { turn }) => {
                self.metrics.lookup(Tier::Redis, CacheStatus::Miss);
                let ticket = Ticket { name, owner };
                let call = self.call(key, flight, call, dispatcher, FirstTurn::after_claim(turn));
                let answer = shared.holding(&ticket, call).await;
                shared.complete(ticket, &answer).await;
                (answer, CacheStatus::Miss)
            }
            Some(ClaimReply::HeldElsewhere) => {
                self.metrics.lookup(Tier::Redis, CacheStatus::Coalesced);
                self.forget_flight(key, flight);
                (shared.wait(&name).await, CacheStatus::Coalesced)
            }
            Some(ClaimReply::Remembered(sealed)) => {
                match shared.open(&name.fingerprint, &sealed, RedisOp::CodeClaim) {
                    Some(answer) => {
                        self.metrics.lookup(Tier::Redis, CacheStatus::Hit);
                        (self.remember(key, answer), CacheStatus::Hit)
                    }
                    // Sealed under another secret, or tampered with: as if Redis were away.
                    None => self.call_alone(key, flight, call, dispatcher).await,
                }
            }
            // Redis is not available: the exchange goes on as in a single process.
            None => self.call_alone(key, flight, call, dispatcher).await,
        }
    }

    /// Keeps an answer another replica remembered, so that the next replay here costs no
    /// Redis round trip.
    fn remember(&self, key: CodeKey, answer: RememberedAnswer) -> Answer {
        let now = self.seconds(Instant::now());
        match CodeSlot::remembered(answer.encode(), self.expiry_from(now)) {
            Some(slot) => self.keep(key, slot, now),
            None => {
                self.slots.remove(&key);
            }
        }
        self.update_gauge();
        Answer::Remembered(answer)
    }
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

    /// The name under which the replicas share the exchange of `api` with `query`: a keyed
    /// HMAC of what makes exchanges identical, the same on every replica, in its appid's
    /// slot.
    pub(super) fn name(&self, api: Api, query: &str) -> Option<ExchangeName> {
        let params = WechatParams::parse(query);
        let checked = request::check(api, &params).ok()?;
        let (kind, first, second): (&[u8], &[u8], &[u8]) = match checked.credential {
            CodeCredential::Secret(secret) => (b"secret", secret, b""),
            CodeCredential::Component {
                appid,
                access_token,
            } => (b"component", appid, access_token),
        };
        let fields = [
            api.label().as_bytes(),
            checked.appid,
            kind,
            first,
            second,
            checked.js_code,
        ];
        Some(ExchangeName {
            tag: self.cluster.appid_tag(checked.appid),
            fingerprint: self.cluster.sealing().fingerprint("code", &fields),
        })
    }

    /// Runs `call` while renewing `ticket`'s lease, so that other replicas keep waiting for
    /// as long as this one is alive and calling.
    async fn holding<F: Future>(&self, ticket: &Ticket, call: F) -> F::Output {
        let mut call = std::pin::pin!(call);
        let every = self.lease / 3;
        let mut next = Instant::now() + every;
        loop {
            tokio::select! {
                biased;
                output = &mut call => return output,
                () = tokio::time::sleep_until(next) => {
                    let renew = RenewClaim {
                        tag: &ticket.name.tag,
                        fingerprint: &ticket.name.fingerprint,
                        owner: &ticket.owner,
                        lease: self.lease,
                    };
                    let _ = self.cluster.eval(&renew).await;
                    next = Instant::now() + every;
                }
            }
        }
    }

    /// Ends the claim with this replica's `answer`: remembered for every replica if it is
    /// definitive, handed to waiting replicas in any case.
    async fn complete(&self, ticket: Ticket, answer: &Answer) {
        let (shared, definitive) = for_replicas(answer);
        let encoded = match shared.encode() {
            Some(encoded) => encoded,
            // A Content-Type too long to encode: the waiters get the rest.
            None => RememberedAnswer {
                content_type: None,
                ..shared
            }
            .encode()
            .expect("an answer without a Content-Type encodes"),
        };
        let definitive =
            definitive && RememberedAnswer::own_bytes(&encoded) <= MAX_REMEMBERED_BYTES;
        let remember = if definitive {
            Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
        } else {
            Duration::ZERO
        };
        let sealed = self
            .cluster
            .sealing()
            .seal(&ticket.name.fingerprint, &encoded);
        let complete = CompleteClaim {
            tag: &ticket.name.tag,
            fingerprint: &ticket.name.fingerprint,
            owner: &ticket.owner,
            sealed: &sealed,
            remember,
            for_waiters: RESULT_FOR_WAITERS,
        };
        let _ = self.cluster.eval(&complete).await;
    }

    /// Waits for the result of the replica holding the claim: one lease at most, whatever
    /// Redis says (a claim kept alive by anyone else than a replica ends there too).
    async fn wait(&self, name: &ExchangeName) -> Answer {
        let deadline = Instant::now() + self.lease;
        let fingerprint = name.fingerprint.as_str();
        let Some(mut listener) = self.cluster.listen(&name.tag, fingerprint).await else {
            return Answer::Local(LocalAnswer::ClaimUnreachable);
        };
        let peek = PeekCode {
            tag: &name.tag,
            fingerprint,
            lease: self.lease,
        };
        let answer = loop {
            // Looked at after subscribing, so a result published before is not missed.
            match self.cluster.eval(&peek).await {
                Some(PeekReply::Answer(sealed)) => {
                    match self.open(fingerprint, &sealed, RedisOp::CodePeek) {
                        Some(answer) => break Answer::Remembered(answer),
                        None => break Answer::Local(LocalAnswer::ClaimHolderGone),
                    }
                }
                Some(PeekReply::Claimed) if Instant::now() >= deadline => {
                    break Answer::Local(LocalAnswer::ClaimHolderGone)
                }
                Some(PeekReply::Claimed) => {}
                Some(PeekReply::Gone) => break Answer::Local(LocalAnswer::ClaimHolderGone),
                None => break Answer::Local(LocalAnswer::ClaimUnreachable),
            }
            let next_look = (Instant::now() + FALLBACK_LOOK).min(deadline);
            tokio::select! {
                message = listener.message() => {
                    let opened = message.and_then(|sealed| self.open(fingerprint, &sealed, RedisOp::Subscribe));
                    if let Some(answer) = opened {
                        break Answer::Remembered(answer);
                    }
                }
                () = tokio::time::sleep_until(next_look) => {}
            }
        };
        listener.close().await;
        answer
    }

    /// Opens a sealed answer (read by `op`); one that does not open (tampering, another
    /// cluster secret) is treated as absent, and reported as forged.
    fn open(&self, fingerprint: &str, sealed: &[u8], op: RedisOp) -> Option<RememberedAnswer> {
        let answer = self
            .cluster
            .sealing()
            .open(fingerprint, sealed)
            .ok()
            .and_then(|plain| RememberedAnswer::decode(&plain));
        if answer.is_none() {
            self.cluster.forged(
                op,
                "a code-exchange answer that does not open under this fingerprint",
            );
        }
        answer
    }
}

/// What the replicas waiting for this replica's call get, and whether it is definitive
/// (remembered for every replica): WeChat's answer as it came, or the answer wxgate gave
/// itself.
fn for_replicas(answer: &Answer) -> (RememberedAnswer, bool) {
    let written_by_wxgate = |body| RememberedAnswer {
        status: http::StatusCode::OK,
        content_type: Some(HeaderValue::from_static(JSON_CONTENT_TYPE)),
        body,
    };
    match answer {
        Answer::Wechat(answer) => {
            let response = &answer.response;
            let definitive = is_definitive(response.status, answer.errcode);
            (RememberedAnswer::of(response), definitive)
        }
        Answer::Remembered(remembered) => (remembered.clone(), false),
        Answer::Token(body) => (written_by_wxgate(body.clone()), false),
        Answer::Local(local) => (
            RememberedAnswer {
                status: local.status(),
                ..written_by_wxgate(local.body())
            },
            false,
        ),
    }
}
