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
//! When Redis fails, the operation gives nothing, the replica degrades (see
//! [`crate::cluster`]) and the cache goes on with its own copy: no request fails because of
//! Redis.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::entry::Entry;
use super::fetch::{Job, Mode};
use super::flight::FlightResult;
use super::policy::{self, Need, Reconcile, RemoteView};
use super::{TokenCache, TokenKey};
use crate::cluster::tokens::{Remote, SharedTokens};

/// How often a replica waiting for another's fetch looks again.
pub(super) const LEASE_POLL: Duration = Duration::from_millis(20);

/// What a fetch does after asking the other replicas.
pub(super) enum Coordinated {
    /// Fetch; with the lease's owner id when this replica holds it.
    Fetch(Option<String>),
    /// Nothing to fetch: another replica's token serves (or, for a refresh ahead of expiry,
    /// another replica is making it).
    Done(FlightResult),
}

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
        if let Some(seed) = self.apply_remote(key, remote) {
            // Refused when another replica stored a newer one meanwhile: the next read
            // takes that one.
            let _ = shared.store(key, &seed).await;
        }
    }

    /// Stores a token this replica fetched; when Redis holds a newer one, takes that.
    pub(super) async fn share(&self, key: &TokenKey, entry: &Entry) {
        let Some(shared) = self.shared() else {
            return;
        };
        if shared.store(key, entry).await == Some(false) {
            self.sync(key).await;
        }
    }

    /// Brings what Redis holds into this replica's slot; the entry to store in Redis when
    /// this replica's is newer.
    fn apply_remote(&self, key: &TokenKey, remote: Remote) -> Option<Entry> {
        let now = SystemTime::now();
        let mut slots = self.slots.lock();
        let slot = slots.entry(key.clone()).or_default();
        let view = match &remote {
            Remote::Missing => RemoteView::Missing,
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
        let need = match job.mode {
            Mode::Fetch { forced: true } => Need::Forced,
            Mode::Fetch { forced: false } => Need::Usable,
            Mode::Background => Need::Refresh,
            Mode::Own => return Coordinated::Fetch(None),
        };
        let Some(shared) = self.shared() else {
            return Coordinated::Fetch(None);
        };
        let owner = SharedTokens::owner();
        let deadline = Instant::now() + shared.lease_ttl();
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
                return Coordinated::Done(FlightResult::Token {
                    entry,
                    fetched_here,
                });
            }
            if lease.taken {
                return Coordinated::Fetch(Some(owner));
            }
            if job.mode == Mode::Background {
                return Coordinated::Done(FlightResult::Again);
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
        let same = entry.credential.same_as(&job.credential);
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
