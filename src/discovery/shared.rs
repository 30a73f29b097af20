//! Discovery with `[cluster]`: one quota/get per key per interval for all the replicas, and
//! its answer shared in Redis.
//!
//! A replica that finds a key due first reads Redis: an answer another replica stored (WeChat's
//! figures, or the error it answered) is used as its own. Otherwise the replica holding a token
//! of the appid takes the key's lease (`SET NX PX`, lasting the interval and never given back)
//! and asks; the others find the lease taken and look again a moment later. The answer is
//! stored for the interval, sealed like everything wxgate keeps in Redis (its key's
//! fingerprint as associated data: an answer moved to another key does not open), with the
//! time it was asked, so that every replica's interval ends together. With Redis gone, a
//! replica asks on its own, as a single wxgate does.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::answer::{Daily, Rate, Stated, Unstated};
use crate::cluster::scripts::{
    limit_record_key, LeaseLimit, LimitLeaseReply, LimitRecord, StoreLimit,
};
use crate::cluster::{owner_id, Cluster, RedisOp, Tag};
use crate::quota::unix_ms;

/// The shared side of discovery.
pub struct SharedDiscovery {
    cluster: Arc<Cluster>,
}

/// What Redis held for a key.
pub enum Found {
    /// An answer, asked this long ago.
    Answer(Result<Stated, Unstated>, Duration),
    /// This replica holds the lease: it asks.
    Ask,
    /// Another replica asks now (or none could, holding no token): look again later.
    Busy,
    /// Redis failed: the replica asks on its own, if it can.
    Alone,
}

/// An answer as stored: the figures in plain numbers, and when it was asked.
#[derive(Serialize, Deserialize)]
struct Record {
    asked_ms: u64,
    rate: Option<(u32, u64)>,
    component_rate: Option<(u32, u64)>,
    daily: Option<(u64, u64, u64)>,
    unstated: Option<String>,
}

impl SharedDiscovery {
    /// Discovery shared through `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> SharedDiscovery {
        SharedDiscovery { cluster }
    }

    /// Looks for an answer about the key named by `fingerprint`, taking the lease to ask
    /// when `can_ask` (this replica holds a token) and none is there.
    pub async fn find(
        &self,
        tag: &Tag,
        fingerprint: &str,
        can_ask: bool,
        interval: Duration,
    ) -> Found {
        if !self.cluster.counts_in_redis() {
            return Found::Alone;
        }
        let owner = owner_id();
        let lease = LeaseLimit {
            tag,
            fingerprint,
            owner: &owner,
            lease: interval,
            take: can_ask,
        };
        match self.cluster.eval(&lease).await {
            Some(LimitLeaseReply::Stated(sealed)) => match self.open(tag, fingerprint, &sealed) {
                Some(found) => found,
                // Unreadable (another secret, tampering): as if Redis had none until it
                // expires (within an interval: the lease script drops one kept longer).
                None => {
                    self.cluster
                        .forged(RedisOp::LimitLease, "a limit's answer that does not open");
                    Found::Busy
                }
            },
            Some(LimitLeaseReply::Taken) => Found::Ask,
            Some(LimitLeaseReply::Busy) => Found::Busy,
            None => Found::Alone,
        }
    }

    /// Stores the answer this replica got, for the interval.
    pub async fn store(
        &self,
        tag: &Tag,
        fingerprint: &str,
        answer: &Result<Stated, Unstated>,
        interval: Duration,
    ) {
        let record = Record {
            asked_ms: unix_ms(SystemTime::now()),
            rate: answer.ok().and_then(|s| s.rate).map(plain_rate),
            component_rate: answer.ok().and_then(|s| s.component_rate).map(plain_rate),
            daily: answer
                .ok()
                .and_then(|s| s.daily)
                .map(|d| (d.limit, d.used, d.remain)),
            unstated: answer.err().map(|u| u.label().to_owned()),
        };
        let Ok(plain) = serde_json::to_vec(&record) else {
            return;
        };
        let key = limit_record_key(&self.cluster, LimitRecord::Stated, tag, fingerprint);
        let sealed = self.cluster.sealing().seal(&key, &plain);
        let store = StoreLimit {
            record: LimitRecord::Stated,
            tag,
            fingerprint,
            sealed: &sealed,
            keep: interval,
        };
        let _ = self.cluster.eval(&store).await;
    }

    fn open(&self, tag: &Tag, fingerprint: &str, sealed: &[u8]) -> Option<Found> {
        let key = limit_record_key(&self.cluster, LimitRecord::Stated, tag, fingerprint);
        let plain = self.cluster.sealing().open(&key, sealed).ok()?;
        let record: Record = serde_json::from_slice(&plain).ok()?;
        let answer = match &record.unstated {
            Some(label) => Err(Unstated::ALL
                .into_iter()
                .find(|u| u.label() == label)
                .unwrap_or(Unstated::Other)),
            None => Ok(Stated {
                rate: record.rate.and_then(rate),
                component_rate: record.component_rate.and_then(rate),
                daily: record.daily.map(|(limit, used, remain)| Daily {
                    limit,
                    used,
                    remain,
                }),
            }),
        };
        let age = SystemTime::now()
            .duration_since(UNIX_EPOCH + Duration::from_millis(record.asked_ms))
            .unwrap_or_default();
        Some(Found::Answer(answer, age))
    }
}

fn plain_rate(rate: Rate) -> (u32, u64) {
    (rate.per_window, rate.window.as_secs())
}

fn rate((per_window, secs): (u32, u64)) -> Option<Rate> {
    (per_window > 0 && (1..=86_400).contains(&secs)).then(|| Rate {
        per_window,
        window: Duration::from_secs(secs),
    })
}
