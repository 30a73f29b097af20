//! One fetch, in a task of its own: agree with the other replicas on who fetches (see
//! `shared.rs`), send it upstream (under quota and retry policy), read WeChat's answer,
//! store it for the replicas, settle the result in the cache, hand it to every waiter.
//!
//! # Settling
//! A fetched token enters the cache only if it is newer than anything the cache holds or
//! dropped ([`policy::supersedes`]): a slow fetch that loses the race to a newer one hands
//! its waiters the newer token instead of overwriting it. The flight leaves its slot under
//! the same lock that stores the token, and publishes after, so every caller either waits
//! for this fetch or finds its token.
//!
//! # Its flight
//! Callers wait for a fetch on its [`TokenFlight`] ([`crate::flight`]'s single-flight, the
//! code cache's too), tagged with what the fetch is for ([`FetchPurpose`]): a caller joins
//! only a fetch that presents its own secret, and a forced caller only a forced one. They
//! join under the cache's lock, and the fetch leaves its slot before it sets its result, so
//! a caller either joins a flight or finds its result in the cache.
//!
//! # Cancellation
//! Nobody's disconnection stops a fetch (it is a task). If the task itself ends without a
//! result (it panicked, or the runtime shut down), its guard frees the slot and tells the
//! waiters, who answer with wxgate's `-1`.

use std::sync::Arc;
use std::time::SystemTime;

use super::budget::beijing_day;
use super::entry::{Entry, TokenCredential};
use super::policy;
use super::slots::TokenSlot;
use super::{TokenCache, TokenKey};
use crate::answer::{LocalAnswer, WechatAnswer};
use crate::dispatch::Call;
use crate::flight::{Flight, FlightWaiter};
use crate::wechat::Errcode;

/// A token fetch in flight, and the callers waiting for it.
pub(super) type TokenFlight = Flight<Fetched, FetchPurpose>;

/// A caller waiting for a token fetch.
pub(super) type TokenWaiter = FlightWaiter<Fetched, FetchPurpose>;

/// How a fetch ended, for everyone who waited for it.
#[derive(Debug, Clone)]
pub(super) enum Fetched {
    /// A token (served to each waiter with the lifetime that remains when it is served).
    Token {
        /// The token now cached.
        entry: Entry,
        /// This replica made the upstream call (rather than finding another replica's
        /// token in Redis).
        fetched_here: bool,
    },
    /// WeChat's answer was not a token (40125, 45009, -1…): passed to every waiter, who
    /// presented the same secret.
    Wechat(Arc<WechatAnswer>),
    /// WeChat gave no answer, or no quota turn came in time.
    Local(LocalAnswer),
    /// The fetch found nothing to do (a background refresh another replica was already
    /// making): the waiters decide again.
    DecideAgain,
}

/// What a fetch is for: the tag of its flight.
pub(super) struct FetchPurpose {
    /// Whose secret the fetch presents: only callers with the same secret wait for it.
    pub(super) credential: TokenCredential,
    /// For the cache, in the background, or for another secret.
    pub(super) mode: FetchMode,
}

impl FetchPurpose {
    /// A forced refresh of a stable token (an unforced caller may wait for it; a forced
    /// caller does not wait for an unforced fetch).
    pub(super) fn forced(&self) -> bool {
        self.mode == FetchMode::Fetch { forced: true }
    }
}

/// Which kind of fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FetchMode {
    /// Nothing usable is cached: a token for the cache (`forced`: a forced stable refresh).
    Fetch {
        /// `force_refresh: true`.
        forced: bool,
    },
    /// The cached token nears its expiry: its replacement, while it is still served.
    Background,
    /// Another secret than the cached token's: WeChat's answer for that secret.
    Own,
}

/// What a fetch does after asking the other replicas.
pub(super) enum Coordinated {
    /// Fetch; with the lease's owner id when this replica holds it.
    Fetch(Option<String>),
    /// Nothing to fetch: another replica's token serves (or, for a refresh ahead of expiry,
    /// another replica is making it).
    Done(Fetched),
}

/// One fetch to run.
pub(super) struct Job {
    pub(super) key: TokenKey,
    pub(super) call: Call,
    pub(super) flight: Arc<TokenFlight>,
}

impl Job {
    /// What the fetch is for.
    pub(super) fn purpose(&self) -> &FetchPurpose {
        self.flight.tag()
    }
}

/// Runs `job` to its end: agree with the other replicas, fetch, store, settle, publish.
pub(super) async fn run(cache: Arc<TokenCache>, job: Job) {
    let mut guard = FlightGuard {
        cache: &cache,
        job: &job,
        armed: true,
    };
    let (result, lease) = match cache.coordinate(&job).await {
        Coordinated::Done(result) => (result, None),
        Coordinated::Fetch(lease) => (fetch(&cache, &job).await, lease),
    };
    if let Fetched::Token {
        entry,
        fetched_here: true,
    } = &result
    {
        cache.share(&job.key, entry).await;
    }
    cache.release(&job.key, lease).await;
    let result = cache.settle(&job, result);
    guard.armed = false;
    job.flight.set(result);
}

/// Sends the fetch and reads WeChat's answer.
async fn fetch(cache: &TokenCache, job: &Job) -> Fetched {
    // Before the call (and its quota wait): the token's expiry is counted from here, so it
    // is never later than WeChat's.
    let issued = SystemTime::now();
    let answer = match cache.dispatcher.call(&job.call, std::future::pending).await {
        Ok(answer) => answer,
        Err(local) => return Fetched::Local(local),
    };
    cache.metrics.fetch(job.key.kind);
    let forced_at = (job.purpose().mode == FetchMode::Fetch { forced: true }).then_some(issued);
    let entry = (answer.errcode == Errcode::Success)
        .then(|| {
            let body = &answer.response.body;
            Entry::from_answer(
                job.key.kind,
                body,
                issued,
                job.purpose().credential.clone(),
                forced_at,
            )
        })
        .flatten();
    match entry {
        Some(entry) => {
            cache.count_minted(&job.key).await;
            Fetched::Token {
                entry,
                fetched_here: true,
            }
        }
        // An error, or a success wxgate cannot read: passed on as it came, not cached.
        None => Fetched::Wechat(Arc::new(answer)),
    }
}

impl TokenCache {
    /// Stores a fetched token if it is the newest, removes the flight from its slot, and
    /// says what the waiters get.
    fn settle(&self, job: &Job, result: Fetched) -> Fetched {
        let mut slots = self.slots.lock();
        let mut slot = slots.slot(&job.key);
        let slot = &mut *slot;
        slot.flights
            .retain(|flight| !Arc::ptr_eq(flight, &job.flight));
        match result {
            Fetched::Token {
                entry,
                fetched_here,
            } => {
                let entry = keep_newest(slot, entry);
                if job.purpose().mode == FetchMode::Background {
                    slot.refresh_failed_at = None;
                }
                Fetched::Token {
                    entry,
                    fetched_here,
                }
            }
            Fetched::DecideAgain => {
                // Another replica is refreshing: this one does not try again before the
                // backoff (its next read of Redis will likely find the new token).
                slot.refresh_failed_at = Some(SystemTime::now());
                Fetched::DecideAgain
            }
            failed => {
                if job.purpose().mode == FetchMode::Background {
                    slot.refresh_failed_at = Some(SystemTime::now());
                    tracing::warn!(
                        api = job.key.kind.api().label(),
                        "a token refresh ahead of expiry failed: the current token is still served, and refreshed again shortly"
                    );
                }
                failed
            }
        }
    }

    /// Counts a fetch that minted a token against the day's budget (in Redis too, when
    /// shared, so that every replica reports all replicas' fetches). A fetch WeChat answered
    /// without a token (40013, 40125…) spends no budget wxgate watches, and counting it would
    /// let made-up appids fill the budget's map.
    async fn count_minted(&self, key: &TokenKey) {
        let now = SystemTime::now();
        let shared = self.count_shared(key, beijing_day(now)).await;
        let mut budget = self.budget.lock();
        budget.record(key, now, shared);
        self.metrics
            .set_fetches_today_max(key.kind, budget.max(key.kind, now));
    }
}

/// Puts `fetched` in `slot` if it is newer than anything the slot holds or dropped, and
/// returns the token the waiters get: `fetched`, or the newer cached one when a fetch that
/// started later has already stored it (the older token would stop working five minutes
/// after the newer was minted, sooner than its `expires_in` says).
fn keep_newest(slot: &mut TokenSlot, mut fetched: Entry) -> Entry {
    if fetched.held.forced_at.is_none() {
        // A plain refresh keeps the time of the last forced one: the next forced request
        // within 30 s still gets the token that one minted.
        fetched.held.forced_at = slot.entry.as_ref().and_then(|entry| entry.held.forced_at);
    }
    if policy::supersedes(fetched.held.issued, slot.newest_issued()) {
        slot.entry = Some(fetched.clone());
        return fetched;
    }
    match &slot.entry {
        Some(newer) if newer.credential.same_as(&fetched.credential) => newer.clone(),
        // Another secret's token, or the newer one was dropped meanwhile: the waiters asked
        // with this secret, and get what WeChat gave them.
        _ => fetched,
    }
}

/// Frees the slot and answers the waiters if the fetch's task ends without a result.
struct FlightGuard<'a> {
    cache: &'a TokenCache,
    job: &'a Job,
    armed: bool,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut slots = self.cache.slots.lock();
            if let Some(mut slot) = slots.slot_if_present(&self.job.key) {
                slot.flights
                    .retain(|flight| !Arc::ptr_eq(flight, &self.job.flight));
            }
            drop(slots);
            self.job
                .flight
                .set(Fetched::Local(LocalAnswer::CallAbandoned));
        }
    }
}
