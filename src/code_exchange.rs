//! Code exchanges made safe to repeat: identical exchanges in flight share one upstream call,
//! and definitive answers are remembered for a code's lifetime.
//!
//! *Identical* means the same API, appid, credential (`secret`, or `component_appid` +
//! `component_access_token`) and `js_code`. The key is a 128-bit keyed hash of those with a
//! random per-process salt: no credential, code or session is ever a map key, and a caller
//! with another credential has another key, so it goes upstream and gets WeChat's own answer.
//!
//! The first caller drives the upstream call itself (no task, no hand-over on the common
//! path), but the call does not belong to it: if that caller goes away, the call moves to a
//! task of its own and carries on, so its answer is still remembered and given to anyone
//! waiting. Only while the call waits for quota, before anything is sent, does it stop when
//! every caller has gone.
//!
//! Remembered answers live in one map beside the calls in flight, so a lookup is one probe.
//! Every entry has the same lifetime, so insertion order is expiry order: a FIFO of
//! (expiry, key) expires entries on time and evicts the oldest when `max_entries` is reached,
//! with no per-entry timers and no LRU bookkeeping on the read path.

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use http::{HeaderValue, StatusCode};
use siphasher::sip128::{Hasher128, SipHasher13};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::api::Api;
use crate::config::CodeCacheConfig;
use crate::dispatch::{Call, CallOutcome, Dispatcher};
use crate::metrics::Metrics;
use crate::upstream::UpstreamResponse;
use crate::wechat::{Errcode, JSON_CONTENT_TYPE as JSON};

/// Where an exchange's answer came from: the `X-Wxgate-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// This request made the upstream call.
    Miss,
    /// This request waited for an identical call in flight.
    Coalesced,
    /// This request got a remembered answer.
    Hit,
}

impl CacheStatus {
    /// The header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Hit => "hit",
        })
    }
}

/// The answer of an exchange, shared by everyone who asked.
#[derive(Debug, Clone)]
pub enum ExchangeAnswer {
    /// WeChat's answer (all headers for the caller and its coalesced followers).
    Upstream(Arc<UpstreamResponse>, Errcode),
    /// A remembered answer: status, Content-Type and body, byte for byte.
    Remembered(Remembered),
    /// The call ended without a WeChat answer.
    NoAnswer(CallOutcome),
}

/// A remembered answer as a replay hands it out.
#[derive(Debug, Clone)]
pub struct Remembered {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// A remembered answer as it is kept: 24 bytes plus one allocation of the body (and of an
/// unusual Content-Type), WeChat's usual Content-Type shared by all.
#[derive(Debug)]
struct Stored {
    /// Content-Type bytes (unless `JSON` or none) followed by the body.
    data: Box<[u8]>,
    /// Seconds since the exchange's `base`.
    expires: u32,
    status: u16,
    /// 0: none, 1: `JSON`, 2: the first `content_type_len` bytes of `data`.
    content_type: u8,
    content_type_len: u8,
}

impl Stored {
    fn new(response: &UpstreamResponse, expires: u32) -> Option<Stored> {
        let (tag, prefix) = match response.headers.get(http::header::CONTENT_TYPE) {
            None => (0, &[][..]),
            Some(v) if v.as_bytes() == JSON.as_bytes() => (1, &[][..]),
            Some(v) => (2, v.as_bytes()),
        };
        let content_type_len = u8::try_from(prefix.len()).ok()?;
        let mut data = Vec::with_capacity(prefix.len() + response.body.len());
        data.extend_from_slice(prefix);
        data.extend_from_slice(&response.body);
        Some(Stored {
            data: data.into_boxed_slice(),
            expires,
            status: response.status.as_u16(),
            content_type: tag,
            content_type_len,
        })
    }

    fn remembered(&self) -> Remembered {
        let split = usize::from(self.content_type_len);
        Remembered {
            status: StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK),
            content_type: match self.content_type {
                0 => None,
                1 => Some(HeaderValue::from_static(JSON)),
                _ => HeaderValue::from_bytes(&self.data[..split]).ok(),
            },
            body: Bytes::copy_from_slice(&self.data[split..]),
        }
    }
}

impl Remembered {
    /// The upstream status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The upstream Content-Type, if it had one.
    pub fn content_type(&self) -> Option<HeaderValue> {
        self.content_type.clone()
    }

    /// The upstream body.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }
}

/// The credential of an exchange, hashed into its key and never stored.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// `/sns/jscode2session`: the app secret.
    Secret(&'a str),
    /// `/sns/component/jscode2session`: the platform's appid and access token.
    Component {
        /// `component_appid`.
        appid: &'a str,
        /// `component_access_token`.
        access_token: &'a str,
    },
}

/// A 128-bit keyed hash of (API, appid, credential, js_code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeKey(u64, u64);

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
struct KeyHasher(u64);

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

/// What the map holds for a key, as a caller about to make the call finds it.
pub enum Lookup {
    /// A remembered answer.
    Remembered(Remembered),
    /// An identical call is in flight: wait for its answer.
    InFlight(Waiter),
    /// Nothing: the call is to be made.
    Absent,
}

/// A caller waiting for an identical call in flight.
pub struct Waiter(watch::Receiver<Option<ExchangeAnswer>>);

impl Waiter {
    /// The call's answer.
    pub async fn answer(self) -> ExchangeAnswer {
        wait(self.0).await
    }
}

struct Flight {
    answer: watch::Sender<Option<ExchangeAnswer>>,
    /// Set when the leader went away and the call moved to a task of its own.
    leader_gone: AtomicBool,
}

/// The first caller's side of a call: it polls the call itself and counts as one of its
/// waiters. Dropped before the call ends (the caller went away), it moves the call to a task
/// of its own, which finishes it for the followers and for the code's next caller.
struct Leader {
    call: Option<Pin<Box<dyn Future<Output = ExchangeAnswer> + Send>>>,
    flight: Arc<Flight>,
    receiver: Option<watch::Receiver<Option<ExchangeAnswer>>>,
}

impl Future for Leader {
    type Output = ExchangeAnswer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ExchangeAnswer> {
        let Some(call) = self.call.as_mut() else {
            return Poll::Ready(ExchangeAnswer::NoAnswer(CallOutcome::Abandoned));
        };
        let answer = ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(answer)
    }
}

/// Frees a call's slot and answers its followers when the call ends unfinished.
struct Unfinished<'a> {
    exchange: &'a CodeExchange,
    key: CodeKey,
    flight: &'a Arc<Flight>,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.exchange.forget_flight(self.key, self.flight);
            let answer = ExchangeAnswer::NoAnswer(CallOutcome::Abandoned);
            self.flight.answer.send_replace(Some(answer));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        if std::thread::panicking() {
            // The call panicked while this leader polled it: it cannot be polled again
            // (dropping it frees its slot, see `Unfinished`).
            return;
        }
        // From now on only followers wait (see `lead`); and if there are none, a call still
        // waiting for quota sees everyone gone.
        self.flight.leader_gone.store(true, Ordering::Release);
        self.receiver = None;
        // Without a runtime (it is shutting down) the call goes with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                call.await;
            });
        }
    }
}

enum Slot {
    InFlight(Arc<Flight>),
    Ready(Stored),
}

impl Slot {
    /// What a caller finds here at `now` (seconds since the exchange's `base`): an expired
    /// answer is as good as none.
    fn lookup(&self, now: u32) -> Lookup {
        match self {
            Slot::Ready(stored) if stored.expires > now => Lookup::Remembered(stored.remembered()),
            Slot::InFlight(flight) => Lookup::InFlight(Waiter(flight.answer.subscribe())),
            Slot::Ready(_) => Lookup::Absent,
        }
    }
}

/// The code-exchange coalescer and its remembered answers.
pub struct CodeExchange {
    slots: DashMap<CodeKey, Slot, BuildHasherDefault<KeyHasher>>,
    /// (expiry, key) of every remembered answer, oldest first.
    expiry: Mutex<ExpiryQueue>,
    base: Instant,
    remembered: AtomicUsize,
    ttl: Duration,
    max_entries: usize,
    /// The keys of the SipHash behind every [`CodeKey`], drawn per process.
    salt: (u64, u64),
    metrics: Metrics,
}

impl CodeExchange {
    /// An empty exchange with `[code_cache]` settings.
    pub fn new(config: &CodeCacheConfig, metrics: Metrics) -> CodeExchange {
        CodeExchange {
            // Many small shards: a shard's table is rehashed whole when it grows, and with a
            // million answers in four shards that stalls the runtime for milliseconds.
            slots: DashMap::with_hasher_and_shard_amount(Default::default(), SHARDS),
            expiry: Mutex::new(ExpiryQueue::default()),
            base: Instant::now(),
            remembered: AtomicUsize::new(0),
            ttl: config.ttl,
            max_entries: config.max_entries,
            // Derived from std's RandomState, whose keys come from the OS's random source.
            salt: (
                RandomState::new().hash_one(0x77_78_67_61_74_65_u64),
                RandomState::new().hash_one(0x63_6f_64_65_73_u64),
            ),
            metrics,
        }
    }

    /// The key of an exchange.
    pub fn key(&self, api: Api, appid: &str, credential: Credential<'_>, js_code: &str) -> CodeKey {
        let fields = match credential {
            Credential::Secret(secret) => (api.index(), appid, secret, "", js_code),
            Credential::Component {
                appid: component,
                access_token,
            } => (api.index(), appid, component, access_token, js_code),
        };
        // One pass of SipHash-1-3 with a 128-bit output.
        let mut hasher = SipHasher13::new_with_keys(self.salt.0, self.salt.1);
        fields.hash(&mut hasher);
        let hash = hasher.finish128();
        CodeKey(hash.h1, hash.h2)
    }

    /// What the map holds for `key`: one probe under a shard's read lock.
    pub fn lookup(&self, key: CodeKey) -> Lookup {
        match self.slots.get(&key) {
            Some(slot) => slot.lookup(self.seconds(Instant::now())),
            None => Lookup::Absent,
        }
    }

    /// Answers an exchange: from memory, by joining an identical call in flight, or by
    /// making the call (see the module documentation for who drives it).
    pub async fn exchange(
        self: &Arc<Self>,
        key: CodeKey,
        call: Call,
        dispatcher: &Arc<Dispatcher>,
    ) -> (ExchangeAnswer, CacheStatus) {
        let now = self.seconds(Instant::now());
        let (flight, receiver) = match self.slots.entry(key) {
            // Filled since the caller's `lookup`: the same reading, now under the write lock.
            Entry::Occupied(mut occupied) => match occupied.get().lookup(now) {
                Lookup::Remembered(remembered) => {
                    return (ExchangeAnswer::Remembered(remembered), CacheStatus::Hit)
                }
                Lookup::InFlight(waiter) => {
                    drop(occupied);
                    return (waiter.answer().await, CacheStatus::Coalesced);
                }
                Lookup::Absent => {
                    // Expired and not yet swept: the expiry queue's record will find the key
                    // holding something else and leave it alone.
                    self.remembered.fetch_sub(1, Ordering::Relaxed);
                    let (flight, receiver) = Flight::new();
                    occupied.insert(Slot::InFlight(flight.clone()));
                    (flight, receiver)
                }
            },
            Entry::Vacant(vacant) => {
                let (flight, receiver) = Flight::new();
                vacant.insert(Slot::InFlight(flight.clone()));
                (flight, receiver)
            }
        };
        self.update_gauge();
        let leader = Leader {
            call: Some(Box::pin(self.clone().lead(
                key,
                flight.clone(),
                call,
                dispatcher.clone(),
            ))),
            flight,
            receiver: Some(receiver),
        };
        (leader.await, CacheStatus::Miss)
    }

    /// Makes the call of `flight`, settles its slot and hands the answer to any follower.
    async fn lead(
        self: Arc<Self>,
        key: CodeKey,
        flight: Arc<Flight>,
        call: Call,
        dispatcher: Arc<Dispatcher>,
    ) -> ExchangeAnswer {
        // If this future is dropped before it ends (its task cancelled at shutdown, no runtime
        // to move to, a panic), the slot is freed and the followers are answered.
        let mut unfinished = Unfinished {
            exchange: &self,
            key,
            flight: &flight,
            armed: true,
        };
        let gone = || self.everyone_gone(key, &flight);
        let answer = match dispatcher.call(&call, gone).await {
            CallOutcome::Answered(response, errcode) => {
                self.settle(key, &flight, &response, errcode);
                ExchangeAnswer::Upstream(Arc::new(response), errcode)
            }
            CallOutcome::Abandoned => {
                // The slot is already gone (see `everyone_gone`); nobody is left to answer.
                unfinished.armed = false;
                return ExchangeAnswer::NoAnswer(CallOutcome::Abandoned);
            }
            other => {
                self.forget_flight(key, &flight);
                ExchangeAnswer::NoAnswer(other)
            }
        };
        // The slot no longer holds this flight, so nobody subscribes from now on. The answer
        // is published only if somebody other than the leader waits: the leader then keeps
        // the only reference and its response is built without copying.
        unfinished.armed = false;
        let leader_waits = usize::from(!flight.leader_gone.load(Ordering::Acquire));
        if flight.answer.receiver_count() > leader_waits {
            flight.answer.send_replace(Some(answer.clone()));
        }
        answer
    }

    /// Completes when no caller waits for `flight` any more and its slot has been removed.
    async fn everyone_gone(&self, key: CodeKey, flight: &Arc<Flight>) {
        loop {
            flight.answer.closed().await;
            // A follower subscribes under the shard's read lock; this removal takes the write
            // lock, so either the follower is counted here or it finds no flight.
            let removed = self.slots.remove_if(&key, |_, slot| {
                matches!(slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight) && f.answer.receiver_count() == 0)
            });
            if removed.is_some() {
                self.update_gauge();
                return;
            }
            // Somebody joined meanwhile; wait for them to go too.
            tokio::task::yield_now().await;
        }
    }

    fn settle(
        &self,
        key: CodeKey,
        flight: &Arc<Flight>,
        response: &UpstreamResponse,
        errcode: Errcode,
    ) {
        // Rounded up to the second: an answer is never forgotten early.
        let now = self.seconds(Instant::now());
        let expires = now + self.ttl.as_secs() as u32 + 1;
        let remembered = is_definitive(response.status, errcode)
            .then(|| Stored::new(response, expires))
            .flatten();
        match remembered {
            Some(remembered) => {
                let expires = remembered.expires;
                self.slots.insert(key, Slot::Ready(remembered));
                self.remembered.fetch_add(1, Ordering::Relaxed);
                let mut expiry = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
                expiry.push_back((expires, key));
                self.evict(&mut expiry, now);
            }
            None => self.forget_flight(key, flight),
        }
        self.update_gauge();
    }

    fn forget_flight(&self, key: CodeKey, flight: &Arc<Flight>) {
        self.slots.remove_if(
            &key,
            |_, slot| matches!(slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight)),
        );
        self.update_gauge();
    }

    /// Drops expired answers, and the oldest ones while there are more than `max_entries`.
    fn seconds(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.base).as_secs() as u32
    }

    fn evict(&self, expiry: &mut ExpiryQueue, now: u32) {
        while let Some((expires, key)) = expiry.front() {
            let over = self.remembered.load(Ordering::Relaxed) > self.max_entries;
            if !over && expires > now {
                break;
            }
            expiry.pop_front();
            let removed = self.slots.remove_if(
                &key,
                |_, slot| matches!(slot, Slot::Ready(r) if r.expires == expires),
            );
            if removed.is_some() {
                self.remembered.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops expired answers; run on a timer so that answers nobody reads again still go.
    pub fn expire(&self) {
        let mut expiry = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        self.evict(&mut expiry, self.seconds(Instant::now()));
        drop(expiry);
        self.update_gauge();
    }

    /// Answers remembered right now.
    pub fn len(&self) -> usize {
        self.remembered.load(Ordering::Relaxed)
    }

    fn update_gauge(&self) {
        self.metrics.code_cache_entries.set(self.len() as i64);
    }
}

/// Shards of the map of slots (a power of two).
const SHARDS: usize = 256;

/// Records of the expiry queue per block.
const EXPIRY_BLOCK: usize = 4096;

/// A FIFO of (expiry, key) kept in fixed-size blocks: it grows and shrinks a block at a
/// time, so no push copies the whole queue (a `VecDeque` of a million records doubling
/// would stall the runtime for milliseconds).
#[derive(Default)]
struct ExpiryQueue {
    blocks: VecDeque<Vec<(u32, CodeKey)>>,
    /// Records of the first block already popped.
    head: usize,
}

impl ExpiryQueue {
    fn push_back(&mut self, record: (u32, CodeKey)) {
        match self.blocks.back_mut() {
            Some(block) if block.len() < EXPIRY_BLOCK => block.push(record),
            _ => {
                let mut block = Vec::with_capacity(EXPIRY_BLOCK);
                block.push(record);
                self.blocks.push_back(block);
            }
        }
    }

    fn front(&self) -> Option<(u32, CodeKey)> {
        self.blocks.front()?.get(self.head).copied()
    }

    fn pop_front(&mut self) {
        let only_block = self.blocks.len() == 1;
        let Some(first) = self.blocks.front_mut() else {
            return;
        };
        self.head += 1;
        if self.head >= first.len() {
            if only_block && first.len() < EXPIRY_BLOCK {
                // The only block, not full yet: reuse it.
                first.clear();
            } else {
                self.blocks.pop_front();
            }
            self.head = 0;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum::<usize>() - self.head
    }
}

impl Flight {
    fn new() -> (Arc<Flight>, watch::Receiver<Option<ExchangeAnswer>>) {
        let (answer, receiver) = watch::channel(None);
        let flight = Flight {
            answer,
            leader_gone: AtomicBool::new(false),
        };
        (Arc::new(flight), receiver)
    }
}

async fn wait(mut receiver: watch::Receiver<Option<ExchangeAnswer>>) -> ExchangeAnswer {
    match receiver.wait_for(Option::is_some).await {
        Ok(answer) => answer
            .clone()
            .unwrap_or(ExchangeAnswer::NoAnswer(CallOutcome::Abandoned)),
        // The call ended without publishing (see `Unfinished`, which normally does).
        Err(_) => ExchangeAnswer::NoAnswer(CallOutcome::Abandoned),
    }
}

/// Answers the same code will always get: success, invalid code, code used, risky user.
/// Transient ones (-1, 45011, 45009, 5xx, no answer) are never remembered.
pub fn is_definitive(status: StatusCode, errcode: Errcode) -> bool {
    status == StatusCode::OK
        && matches!(
            errcode,
            Errcode::Success | Errcode::Code(40029) | Errcode::Code(40163) | Errcode::Code(40226)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_field_and_are_stable() {
        let registry = prometheus::Registry::new();
        let exchange = CodeExchange::new(
            &crate::Config::default().code_cache,
            Metrics::new(&registry).unwrap(),
        );
        let base = exchange.key(Api::JsCode2Session, "wxa", Credential::Secret("s"), "code");
        assert_eq!(
            base,
            exchange.key(Api::JsCode2Session, "wxa", Credential::Secret("s"), "code")
        );
        for other in [
            exchange.key(Api::JsCode2Session, "wxb", Credential::Secret("s"), "code"),
            exchange.key(Api::JsCode2Session, "wxa", Credential::Secret("t"), "code"),
            exchange.key(Api::JsCode2Session, "wxa", Credential::Secret("s"), "code2"),
            exchange.key(Api::JsCode2Session, "wxas", Credential::Secret(""), "code"),
            exchange.key(
                Api::ComponentJsCode2Session,
                "wxa",
                Credential::Component {
                    appid: "s",
                    access_token: "",
                },
                "code",
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn the_expiry_queue_is_first_in_first_out_across_blocks() {
        let mut queue = ExpiryQueue::default();
        let now = 1u32;
        let total = EXPIRY_BLOCK * 2 + 10;
        for i in 0..total {
            queue.push_back((now, CodeKey(0, i as u64)));
        }
        assert_eq!(queue.len(), total);
        for i in 0..total - 5 {
            assert_eq!(queue.front(), Some((now, CodeKey(0, i as u64))));
            queue.pop_front();
        }
        assert_eq!(queue.len(), 5);
        queue.push_back((now, CodeKey(u64::MAX, u64::MAX)));
        for i in total - 5..total {
            assert_eq!(queue.front(), Some((now, CodeKey(0, i as u64))));
            queue.pop_front();
        }
        assert_eq!(queue.front(), Some((now, CodeKey(u64::MAX, u64::MAX))));
        queue.pop_front();
        assert_eq!(queue.front(), None);
        assert_eq!(queue.len(), 0);
        queue.pop_front();
        queue.push_back((now, CodeKey(0, 7)));
        assert_eq!(queue.front(), Some((now, CodeKey(0, 7))));
    }

    #[test]
    fn definitive_answers() {
        assert!(is_definitive(StatusCode::OK, Errcode::Success));
        assert!(is_definitive(StatusCode::OK, Errcode::Code(40163)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(-1)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(45011)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(45009)));
        assert!(!is_definitive(StatusCode::BAD_GATEWAY, Errcode::Success));
        assert!(!is_definitive(StatusCode::OK, Errcode::NotJson));
    }
}
