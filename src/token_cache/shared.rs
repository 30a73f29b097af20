//! How a replica's token cache meets the other replicas' through Redis (with `[cluster]`;
//! without it, none of this runs and each wxgate is the single central server).
//!
//! - **Reading**: every token request first reads its key's entry from Redis (one round
//!   trip; token requests are rare, since every backend caches what it gets) and reconciles
//!   it with the replica's own copy ([`policy::reconcile`]): a newer token is taken, a
//!   refused one dropped, and a copy newer than Redis's (fetched while Redis was away, or
//!   Redis restarted empty) is stored there, so that the replicas agree on one token instead
//!   of one fetching a new token that would retire the others'.
//! - **Fetching**: a fetch for the cache first takes the key's lease (`SET NX PX`, with the
//!   entry read in the same step). The replica that gets it fetches, stores and gives it
//!   back; the others wait for its token, trying the lease again every [`LEASE_POLL`], and
//!   fetch themselves only if the lease comes free without a token that serves (the holder
//!   failed) or outlives its time. A refresh ahead of expiry that finds the lease taken
//!   leaves the work to its holder. A fetch for another secret takes no lease.
//! - **Dropping**: a token WeChat refused is dropped in Redis too (compare-and-delete on its
//!   fingerprint), found through the token index when this replica never served it.
//!
//! What Redis holds (every name a keyed fingerprint in the appid's slot, no appid, secret or
//! token readable; the scripts are [`crate::cluster::scripts`]'): per (API, appid) an entry
//! with the sealed
//! token, when its fetch was sent (a store only replaces an older entry, and a dropped entry
//! keeps that time as a tombstone, so that no replica can put the refused token or an older
//! one back) and the token's own fingerprint (so that a refused token is dropped by
//! comparing, without opening anything); an index from the token's fingerprint to its
//! entry (in the token's slot: written alongside the entry, at the same time, by an
//! operation of its own); the lease; and the day's fetches, for the budget gauge.
//!
//! # What Redis says is checked
//! The issue time and the token's fingerprint are plain text, for the scripts to compare,
//! so an entry carries their MAC under the cluster secret, and a tombstone the MAC that says
//! its token was refused; the sealed token holds its issue time too. A replica believes an
//! entry only if all of it checks ([`SharedTokens::check`]); one that does not is reported
//! as forged and treated as absent: the replica keeps its own token (it fetches no more
//! than it would without Redis) and stores it over the forged entry, so that nothing forged
//! blocks a store for long.
//!
//! When Redis fails, the operation gives nothing, the replica degrades (see
//! [`crate::cluster`]) and the cache goes on with its own copy: no request fails because of
//! Redis.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::entry::{from_micros, micros, Entry};
use super::fetch::{Coordinated, FetchMode, Fetched, Job};
use super::policy::{self, Need, Reconcile, RemoteView};
use super::{TokenCache, TokenKey};
use crate::cluster::scripts::{
    CountFetch, DropToken, FindToken, IndexToken, ReadToken, ReleaseLease, StoreReply, StoreToken,
    TakeLease, TokenFields, TokenRecord,
};
use crate::cluster::{owner_id, Cluster, RedisOp, Tag};

/// How often a replica waiting for another's fetch looks again.
pub(super) const LEASE_POLL: Duration = Duration::from_millis(20);

/// An entry outlives its token by this much, so that its tombstone (or its issue time)
/// keeps older tokens out while any of them could still work.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(60);

/// The token cache's side of the replicas' shared state.
pub struct SharedTokens {
    cluster: Arc<Cluster>,
    /// How long a lease lasts: longer than a fetch can take (its quota wait and retries).
    lease_ttl: Duration,
}

/// What Redis holds for a key, checked and opened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Remote {
    /// Nothing.
    Missing,
    /// A token WeChat refused, minted at `issued`: nothing as old may come back.
    Dropped {
        /// When the refused token's fetch was sent.
        issued: SystemTime,
    },
    /// A token.
    Present(Entry),
    /// An entry no replica wrote (its MACs or seal do not check): as good as absent, and to
    /// be replaced.
    Forged {
        /// Its issue time as stored, which the store that replaces it names.
        issued: String,
    },
}

/// What storing an entry came to.
#[derive(Debug)]
enum Stored {
    /// Redis holds it now.
    Yes,
    /// Redis holds an entry as new or newer: this.
    Kept(Remote),
}

/// The outcome of trying to take a key's lease.
#[derive(Debug)]
struct Lease {
    /// This replica holds the lease now (and must give it back).
    taken: bool,
    /// What Redis held when the lease was tried.
    remote: Remote,
}

impl SharedTokens {
    /// The shared tokens of `cluster`, leases lasting `lease_ttl`.
    pub fn new(cluster: Arc<Cluster>, lease_ttl: Duration) -> SharedTokens {
        SharedTokens { cluster, lease_ttl }
    }

    /// Whether to ask Redis at all: not while degraded (the probe finds Redis again; no
    /// request waits on a Redis that just failed).
    fn available(&self) -> bool {
        self.cluster.reachable()
    }

    /// The fingerprint that names `key`'s entry, lease and counter.
    fn fingerprint(&self, key: &TokenKey) -> String {
        let api = key.kind.api().label().as_bytes();
        self.cluster
            .sealing()
            .fingerprint("token", &[api, key.appid.as_bytes()])
    }

    /// The slot of `key`'s entry, lease and counter: its appid's.
    fn tag(&self, key: &TokenKey) -> Tag {
        self.cluster.appid_tag(key.appid.as_bytes())
    }

    /// The fingerprint of a token itself.
    fn token_fingerprint(&self, token: &str) -> String {
        self.cluster
            .sealing()
            .fingerprint("token-value", &[token.as_bytes()])
    }

    /// What Redis holds for `key`; `None` when Redis failed.
    async fn read(&self, key: &TokenKey) -> Option<Remote> {
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let read = ReadToken {
            tag: &tag,
            fingerprint: &fingerprint,
        };
        let record = self.cluster.eval(&read).await?;
        Some(self.open(&fingerprint, record, RedisOp::TokenRead))
    }

    /// Tries to take `key`'s lease for `owner`; `None` when Redis failed.
    async fn lease(&self, key: &TokenKey, owner: &str) -> Option<Lease> {
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let lease = TakeLease {
            tag: &tag,
            fingerprint: &fingerprint,
            owner,
            ttl: self.lease_ttl,
        };
        let reply = self.cluster.eval(&lease).await?;
        Some(Lease {
            taken: reply.taken,
            remote: self.open(&fingerprint, reply.record, RedisOp::TokenLease),
        })
    }

    /// Gives `key`'s lease back, if `owner` still holds it.
    async fn release(&self, key: &TokenKey, owner: &str) {
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let release = ReleaseLease {
            tag: &tag,
            fingerprint: &fingerprint,
            owner,
        };
        let _ = self.cluster.eval(&release).await;
    }

    /// Stores `entry` unless Redis holds a newer one (by its issue time): `None` when Redis
    /// failed. `replacing`: the issue time of a forged entry this replica read, which the
    /// store replaces. A forged entry found in the way is replaced the same way.
    async fn store(
        &self,
        key: &TokenKey,
        entry: &Entry,
        replacing: Option<&str>,
    ) -> Option<Stored> {
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let token_fingerprint = self.token_fingerprint(&entry.token);
        let sealing = self.cluster.sealing();
        let sealed = sealing.seal(&fingerprint, &entry.to_record());
        let issued_micros = micros(entry.held.issued);
        let issued = issued_micros.to_string();
        let mac = sealing.mac(
            ENTRY_MAC,
            &[
                fingerprint.as_bytes(),
                issued.as_bytes(),
                token_fingerprint.as_bytes(),
            ],
        );
        let left = entry
            .held
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let keep = left + KEEP_AFTER_EXPIRY;
        let mut store = StoreToken {
            tag: &tag,
            fingerprint: &fingerprint,
            token_fingerprint: &token_fingerprint,
            issued_micros,
            sealed: &sealed,
            mac: &mac,
            keep,
            replacing,
        };
        let index = IndexToken {
            token_fingerprint: &token_fingerprint,
            tag: &tag,
            fingerprint: &fingerprint,
            keep,
        };
        // The index lives in the token's slot, the entry in the appid's: two operations, sent
        // at once. An index written for an entry that kept another token only makes a drop
        // compare and find nothing.
        let (stored, _) = tokio::join!(self.cluster.eval(&store), self.cluster.eval(&index));
        let kept = match stored? {
            StoreReply::Stored => return Some(Stored::Yes),
            StoreReply::Kept(record) => self.open(&fingerprint, record, RedisOp::TokenStore),
        };
        let Remote::Forged { issued } = &kept else {
            return Some(Stored::Kept(kept));
        };
        if replacing.is_some() {
            // Forged again since: the next request tries again.
            return Some(Stored::Kept(kept));
        }
        store.replacing = Some(issued);
        match self.cluster.eval(&store).await? {
            StoreReply::Stored => Some(Stored::Yes),
            StoreReply::Kept(record) => Some(Stored::Kept(self.open(
                &fingerprint,
                record,
                RedisOp::TokenStore,
            ))),
        }
    }

    /// Drops `token` (refused by WeChat) wherever Redis holds it: under `key` when the
    /// replica knows it, else where the token index says. `Some(true)` if dropped.
    async fn drop_token(&self, key: Option<&TokenKey>, token: &str) -> Option<bool> {
        let token_fingerprint = self.token_fingerprint(token);
        let (tag, fingerprint) = match key {
            Some(key) => (self.tag(key), self.fingerprint(key)),
            None => {
                let find = FindToken {
                    token_fingerprint: &token_fingerprint,
                };
                self.cluster.eval(&find).await??
            }
        };
        let mac = self.cluster.sealing().mac(
            DROPPED_MAC,
            &[fingerprint.as_bytes(), token_fingerprint.as_bytes()],
        );
        let drop = DropToken {
            tag: &tag,
            fingerprint: &fingerprint,
            token_fingerprint: &token_fingerprint,
            mac: &mac,
        };
        self.cluster.eval(&drop).await
    }

    /// Counts a fetch of `key` on `day`; the count of all replicas, `None` when Redis failed.
    async fn count_fetch(&self, key: &TokenKey, day: u64) -> Option<u64> {
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let count = CountFetch {
            tag: &tag,
            fingerprint: &fingerprint,
            day,
        };
        self.cluster.eval(&count).await
    }

    /// Checks and opens what Redis holds for the entry named by `fingerprint` (read by
    /// `op`); reports what does not check as forged.
    fn open(&self, fingerprint: &str, record: TokenRecord, op: RedisOp) -> Remote {
        let TokenRecord::Stored(fields) = record else {
            return Remote::Missing;
        };
        match self.check(fingerprint, &fields) {
            Some(remote) => remote,
            None => {
                self.cluster
                    .forged(op, "a token entry whose MAC or seal does not check");
                Remote::Forged {
                    issued: fields.issued,
                }
            }
        }
    }

    /// What an entry's fields prove, if they check: its MAC over (fingerprint, issue time,
    /// token fingerprint); then either the MAC of its refusal (a tombstone) or its sealed
    /// token, which opens under this fingerprint and holds that issue time.
    fn check(&self, fingerprint: &str, fields: &TokenFields) -> Option<Remote> {
        let sealing = self.cluster.sealing();
        let issued_micros: u64 = fields.issued.parse().ok()?;
        let token_fingerprint = fields.token_fingerprint.as_bytes();
        let stated = [
            fingerprint.as_bytes(),
            fields.issued.as_bytes(),
            token_fingerprint,
        ];
        if !sealing.verify(ENTRY_MAC, &stated, fields.mac.as_bytes()) {
            return None;
        }
        let issued = from_micros(issued_micros);
        if !fields.dropped.is_empty() {
            let refused = [fingerprint.as_bytes(), token_fingerprint];
            return sealing
                .verify(DROPPED_MAC, &refused, fields.dropped.as_bytes())
                .then_some(Remote::Dropped { issued });
        }
        // `m` binds the token's fingerprint to the issue time, and the seal the token to the
        // same issue time: one fetch, one token.
        let plain = sealing.open(fingerprint, &fields.sealed).ok()?;
        let entry = Entry::from_record(&plain)?;
        (entry.held.issued == issued).then_some(Remote::Present(entry))
    }
}

/// The MAC an entry carries: over (key fingerprint, issue time, token fingerprint).
const ENTRY_MAC: &str = "token-entry";

/// The MAC a tombstone carries: over (key fingerprint, token fingerprint).
const DROPPED_MAC: &str = "token-dropped";

impl TokenCache {
    /// Redis, when configured and not away.
    fn shared(&self) -> Option<&SharedTokens> {
        self.shared.as_ref().filter(|shared| shared.available())
    }

    /// Reads `key` from Redis and reconciles it with this replica's copy.
    pub(super) async fn sync(&self, key: &TokenKey) {
        let Some(shared) = self.shared() else {
            return;
        };
        let Some(remote) = shared.read(key).await else {
            return;
        };
        let forged = match &remote {
            Remote::Forged { issued } => Some(issued.clone()),
            _ => None,
        };
        if let Some(seed) = self.apply_remote(key, remote) {
            // Refused when another replica stored a newer one meanwhile: the next read
            // takes that one.
            let _ = shared.store(key, &seed, forged.as_deref()).await;
        }
    }

    /// Stores a token this replica fetched; when Redis holds a newer one, takes that.
    pub(super) async fn share(&self, key: &TokenKey, entry: &Entry) {
        let Some(shared) = self.shared() else {
            return;
        };
        if let Some(Stored::Kept(remote)) = shared.store(key, entry, None).await {
            // Redis holds a newer token, or a newer tombstone: it comes first. (Nothing to
            // seed: Redis holds nothing older.)
            let _ = self.apply_remote(key, remote);
        }
    }

    /// Brings what Redis holds into this replica's slot; the entry to store in Redis when
    /// this replica's is newer.
    fn apply_remote(&self, key: &TokenKey, remote: Remote) -> Option<Entry> {
        let now = SystemTime::now();
        let mut slots = self.slots.lock();
        let mut slot = slots.slot(key);
        let view = match &remote {
            Remote::Missing | Remote::Forged { .. } => RemoteView::Missing,
            Remote::Dropped { issued } => RemoteView::Dropped(*issued),
            Remote::Present(entry) => RemoteView::Present(entry.held.issued),
        };
        let local = slot.entry.as_ref().map(|entry| &entry.held);
        let dropped = slot.dropped.map(|held| held.issued);
        match policy::reconcile(local, dropped, view, now) {
            Reconcile::TakeRemote => {
                if let Remote::Present(entry) = remote {
                    slot.entry = Some(entry);
                }
                None
            }
            Reconcile::DropLocal => {
                slot.dropped = slot.entry.take().map(|entry| entry.held);
                None
            }
            Reconcile::Seed => slot.entry.clone(),
            Reconcile::Keep => None,
        }
    }

    /// Before a fetch: takes the key's lease, or waits for the replica that holds it.
    pub(super) async fn coordinate(&self, job: &Job) -> Coordinated {
        let need = match job.purpose().mode {
            FetchMode::Fetch { forced: true } => Need::Forced,
            FetchMode::Fetch { forced: false } => Need::Usable,
            FetchMode::Background => Need::Refresh,
            FetchMode::Own => return Coordinated::Fetch(None),
        };
        let Some(shared) = self.shared() else {
            return Coordinated::Fetch(None);
        };
        let owner = owner_id();
        let deadline = Instant::now() + shared.lease_ttl;
        loop {
            let Some(lease) = shared.lease(&job.key, &owner).await else {
                return Coordinated::Fetch(None);
            };
            // Nothing to seed here: the holder of the lease stores what it fetches.
            let _ = self.apply_remote(&job.key, lease.remote);
            if let Some(entry) = self.served_elsewhere(job, need) {
                if lease.taken {
                    shared.release(&job.key, &owner).await;
                }
                let fetched_here = false;
                return Coordinated::Done(Fetched::Token {
                    entry,
                    fetched_here,
                });
            }
            if lease.taken {
                return Coordinated::Fetch(Some(owner));
            }
            if job.purpose().mode == FetchMode::Background {
                return Coordinated::Done(Fetched::DecideAgain);
            }
            if Instant::now() >= deadline {
                // The holder outlived its lease (or died): fetch, as a single process would.
                return Coordinated::Fetch(None);
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Gives the lease back after a fetch.
    pub(super) async fn release(&self, key: &TokenKey, owner: Option<String>) {
        if let (Some(shared), Some(owner)) = (self.shared(), owner) {
            shared.release(key, &owner).await;
        }
    }

    /// The cached token, if it makes `job` unnecessary (another replica fetched it).
    fn served_elsewhere(&self, job: &Job, need: Need) -> Option<Entry> {
        let slots = self.slots.lock();
        let entry = slots.get(&job.key)?.entry.as_ref()?;
        let same = entry.credential.same_as(&job.purpose().credential);
        let needed = self.settings.load().policy.fetch_needed(
            Some(&entry.held),
            same,
            need,
            SystemTime::now(),
        );
        (!needed).then(|| entry.clone())
    }

    /// Drops a refused token in Redis: under the keys this replica dropped it from, else
    /// wherever the token index says.
    pub(super) async fn drop_shared(&self, keys: &[TokenKey], token: &str) {
        let Some(shared) = self.shared() else {
            return;
        };
        if keys.is_empty() {
            let _ = shared.drop_token(None, token).await;
        }
        for key in keys {
            let _ = shared.drop_token(Some(key), token).await;
        }
    }

    /// Counts a fetch in Redis; the count of all replicas today.
    pub(super) async fn count_shared(&self, key: &TokenKey, day: u64) -> Option<u64> {
        self.shared()?.count_fetch(key, day).await
    }
}
