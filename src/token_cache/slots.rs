//! What the token cache keeps per key ([`TokenSlot`]) and the map that holds the slots
//! ([`TokenSlots`]), bounded by `token_cache.max_entries`, with the two views a slot-by-slot
//! scan would otherwise give: which key holds a token (so that a token WeChat refused is found
//! in one lookup, whatever the number of keys), and which token was stored first (so that
//! the oldest goes first when the cache is full, as `code_cache.max_entries` does it).
//!
//! # How the views stay true
//! A slot is changed through a [`SlotMut`], which notes the slot's token when it is taken and
//! brings the views up to date when it is dropped: a new token is indexed and stamped (its
//! place in the store order), the token it replaced is unindexed, a slot left with nothing
//! is removed, and the oldest slots are evicted while more than `max_entries` hold
//! something. So whatever a caller does to a slot (store, drop, take another replica's
//! token), the views follow, and no caller has to remember them.
//!
//! A slot *holds* something while it has a token or a tombstone (a refused token remembered
//! until it expires); those are the entries `max_entries` bounds and
//! `wxgate_token_cache_entries` counts. A slot with only fetches in flight is not an entry:
//! those are bounded by the requests that wait for them.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;

use super::entry::Entry;
use super::fetch::TokenFlight;
use super::policy::{self, Held};
use super::request::TokenKey;

/// What the cache knows of one key.
#[derive(Default)]
pub(super) struct TokenSlot {
    /// The token handed out.
    pub(super) entry: Option<Entry>,
    /// The newest token dropped after WeChat refused it: nothing as old may come back.
    pub(super) dropped: Option<Held>,
    /// Fetches in flight, one per credential.
    pub(super) flights: Vec<Arc<TokenFlight>>,
    /// When the last refresh ahead of expiry failed (the next waits a little).
    pub(super) refresh_failed_at: Option<SystemTime>,
    /// When its token was stored, in [`TokenSlots`]' store order (0: never).
    stamp: u64,
}

impl TokenSlot {
    /// When the newest token this slot knows of (cached or dropped) was issued.
    pub(super) fn newest_issued(&self) -> Option<SystemTime> {
        let cached = self.entry.as_ref().map(|entry| entry.held.issued);
        cached.max(self.dropped.map(|held| held.issued))
    }

    /// A token or a tombstone: what makes the slot an entry.
    fn holds(&self) -> bool {
        self.entry.is_some() || self.dropped.is_some()
    }

    /// Nothing at all: the slot can go.
    fn is_empty(&self) -> bool {
        !self.holds() && self.flights.is_empty()
    }

    fn token(&self) -> Option<&Arc<str>> {
        self.entry.as_ref().map(|entry| &entry.token)
    }
}

/// The token cache's slots, at most `max_entries` of them holding something.
pub(super) struct TokenSlots {
    slots: HashMap<TokenKey, TokenSlot>,
    /// The key of each cached token (a token is one key's: WeChat mints each once).
    by_token: HashMap<Arc<str>, TokenKey>,
    /// (stamp, key) of each stored token, oldest first. A pair whose slot has stored another
    /// token since (another stamp), holds nothing any more or is gone is stale: skipped when
    /// met, and all dropped whenever they outnumber the slots that hold something.
    stored: VecDeque<(u64, TokenKey)>,
    /// The stamp of the last stored token.
    last_stamp: u64,
    /// Slots holding a token or a tombstone.
    entries: usize,
    /// `token_cache.max_entries`.
    max_entries: usize,
    /// `wxgate_token_cache_entries`: `entries`.
    gauge: IntGauge,
}

/// A slot being changed; the views of [`TokenSlots`] follow when it is dropped.
pub(super) struct SlotMut<'a> {
    slots: &'a mut TokenSlots,
    key: TokenKey,
    /// The slot's token when it was taken.
    token: Option<Arc<str>>,
    /// Whether it held something then.
    held: bool,
}

impl TokenSlots {
    /// An empty map of at most `max_entries` entries, counted in `gauge`.
    pub(super) fn new(max_entries: usize, gauge: IntGauge) -> TokenSlots {
        gauge.set(0);
        TokenSlots {
            slots: HashMap::new(),
            by_token: HashMap::new(),
            stored: VecDeque::new(),
            last_stamp: 0,
            entries: 0,
            max_entries,
            gauge,
        }
    }

    /// `key`'s slot, made if there is none.
    pub(super) fn slot(&mut self, key: &TokenKey) -> SlotMut<'_> {
        let slot = self.slots.entry(key.clone()).or_default();
        let (token, held) = (slot.token().cloned(), slot.holds());
        SlotMut {
            slots: self,
            key: key.clone(),
            token,
            held,
        }
    }

    /// `key`'s slot, if there is one.
    pub(super) fn slot_if_present(&mut self, key: &TokenKey) -> Option<SlotMut<'_>> {
        self.slots.contains_key(key).then(|| self.slot(key))
    }

    /// `key`'s slot to read.
    pub(super) fn get(&self, key: &TokenKey) -> Option<&TokenSlot> {
        self.slots.get(key)
    }

    /// The key whose cached token is `token`, if any (one lookup; the caller compares the
    /// token itself before acting on it).
    pub(super) fn key_of(&self, token: &str) -> Option<TokenKey> {
        self.by_token.get(token).cloned()
    }

    /// Applies a reloaded `max_entries`: a lower bound evicts the oldest at once.
    pub(super) fn set_max_entries(&mut self, max_entries: usize) {
        self.max_entries = max_entries;
        self.evict();
        self.gauge.set(self.entries as i64);
    }

    /// Forgets the tokens and tombstones that have expired at `now`, and the slots left
    /// with nothing; the lowest lifetime left of any cached token.
    pub(super) fn expire(&mut self, now: SystemTime) -> Option<Duration> {
        let mut lowest: Option<Duration> = None;
        let by_token = &mut self.by_token;
        self.slots.retain(|key, slot| {
            let expired = |held: &Held| policy::remaining(held, now).is_zero();
            if slot
                .entry
                .as_ref()
                .is_some_and(|entry| expired(&entry.held))
            {
                if let Some(entry) = slot.entry.take() {
                    unindex(by_token, &entry.token, key);
                }
            }
            if slot.dropped.as_ref().is_some_and(expired) {
                slot.dropped = None;
            }
            if let Some(entry) = &slot.entry {
                let left = policy::remaining(&entry.held, now);
                lowest = Some(lowest.map_or(left, |lowest| lowest.min(left)));
            }
            !slot.is_empty()
        });
        self.entries = self.slots.values().filter(|slot| slot.holds()).count();
        self.compact();
        self.gauge.set(self.entries as i64);
        lowest
    }

    /// Brings the views up to date after `key`'s slot changed from holding `token` (and
    /// something at all, `held`).
    fn changed(&mut self, key: &TokenKey, token: Option<Arc<str>>, held: bool) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let now = slot.token().cloned();
        let same = match (&token, &now) {
            (Some(before), Some(now)) => Arc::ptr_eq(before, now),
            (before, now) => before.is_none() && now.is_none(),
        };
        if !same {
            if let Some(before) = &token {
                unindex(&mut self.by_token, before, key);
            }
            if let Some(now) = now {
                self.by_token.insert(now, key.clone());
                self.last_stamp += 1;
                slot.stamp = self.last_stamp;
                self.stored.push_back((self.last_stamp, key.clone()));
            }
        }
        match (held, slot.holds()) {
            (false, true) => self.entries += 1,
            (true, false) => self.entries -= 1,
            _ => {}
        }
        if slot.is_empty() {
            self.slots.remove(key);
        }
        self.evict();
        self.compact();
        self.gauge.set(self.entries as i64);
    }

    /// Evicts the oldest entries while there are more than `max_entries`: their token and
    /// tombstone go (a fetch in flight for the key stays, and stores its token later).
    fn evict(&mut self) {
        while self.entries > self.max_entries {
            let Some((stamp, key)) = self.stored.pop_front() else {
                return;
            };
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            if slot.stamp != stamp || !slot.holds() {
                continue;
            }
            if let Some(entry) = slot.entry.take() {
                unindex(&mut self.by_token, &entry.token, &key);
            }
            slot.dropped = None;
            self.entries -= 1;
            if slot.is_empty() {
                self.slots.remove(&key);
            }
        }
    }

    /// Drops the stale pairs of the store order once they outnumber the live ones, so that
    /// it stays within twice the entries (each pair is looked at once per doubling: O(1) a
    /// store, amortised).
    fn compact(&mut self) {
        if self.stored.len() <= 2 * self.entries + 64 {
            return;
        }
        let slots = &self.slots;
        self.stored.retain(|(stamp, key)| {
            slots
                .get(key)
                .is_some_and(|slot| slot.stamp == *stamp && slot.holds())
        });
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize, usize, usize) {
        (
            self.slots.len(),
            self.by_token.len(),
            self.stored.len(),
            self.entries,
        )
    }
}

/// Removes `token` from the index if it names `key` there.
fn unindex(by_token: &mut HashMap<Arc<str>, TokenKey>, token: &Arc<str>, key: &TokenKey) {
    if by_token.get(&**token) == Some(key) {
        by_token.remove(&**token);
    }
}

impl Deref for SlotMut<'_> {
    type Target = TokenSlot;

    fn deref(&self) -> &TokenSlot {
        self.slots
            .slots
            .get(&self.key)
            .expect("a slot taken stays until its SlotMut is dropped")
    }
}

impl DerefMut for SlotMut<'_> {
    fn deref_mut(&mut self) -> &mut TokenSlot {
        self.slots
            .slots
            .get_mut(&self.key)
            .expect("a slot taken stays until its SlotMut is dropped")
    }
}

impl Drop for SlotMut<'_> {
    fn drop(&mut self) {
        let (key, token) = (self.key.clone(), self.token.take());
        self.slots.changed(&key, token, self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_cache::entry::TokenCredentialKey;
    use crate::token_cache::request::{TokenKind, TokenRequest};
    use crate::wechat::Api;
    use http::Method;

    fn key(i: usize) -> TokenKey {
        TokenKey {
            kind: TokenKind::Token,
            appid: format!("wx{i:016x}").into(),
        }
    }

    /// An entry with `token`, issued `now`, living 7200 s.
    fn entry(token: &str, now: SystemTime) -> Entry {
        thread_local! {
            static TEMPLATE: Entry = {
                let query = "grant_type=client_credential&appid=wx00000000000000a1&secret=s";
                let request = TokenRequest::read(Api::Token, &Method::GET, query, b"").unwrap();
                let credential = TokenCredentialKey::random().credential(&request);
                let body = r#"{"access_token":"T","expires_in":7200}"#.as_bytes();
                Entry::from_answer(TokenKind::Token, body, SystemTime::UNIX_EPOCH, credential, None)
                    .unwrap()
            };
        }
        TEMPLATE.with(|template| {
            let mut entry = template.clone();
            entry.token = token.into();
            entry.held.issued = now;
            entry.held.expires_at = now + Duration::from_secs(7200);
            entry
        })
    }

    fn slots(max_entries: usize) -> TokenSlots {
        let gauge = IntGauge::new("entries", "entries").unwrap();
        TokenSlots::new(max_entries, gauge)
    }

    #[test]
    fn the_oldest_token_goes_first_and_a_refused_token_is_found_by_its_value() {
        let now = SystemTime::now();
        let mut slots = slots(3);
        for i in 0..5 {
            slots.slot(&key(i)).entry = Some(entry(&format!("T{i}"), now));
        }
        assert_eq!(slots.gauge.get(), 3);
        assert!(slots.get(&key(1)).is_none());
        assert!(slots.key_of("T0").is_none());
        assert_eq!(slots.key_of("T4"), Some(key(4)));
        // A new token for key 2 makes it the newest: key 3 goes next.
        slots.slot(&key(2)).entry = Some(entry("T2b", now));
        assert!(slots.key_of("T2").is_none());
        slots.slot(&key(5)).entry = Some(entry("T5", now));
        assert!(slots.get(&key(3)).is_none());
        assert_eq!(slots.key_of("T2b"), Some(key(2)));
        // Dropped, the token leaves the index; its tombstone is still an entry.
        {
            let mut slot = slots.slot(&key(4));
            slot.dropped = slot.entry.take().map(|entry| entry.held);
        }
        assert!(slots.key_of("T4").is_none());
        assert_eq!(slots.gauge.get(), 3);
        // A slot that never held anything (a fetch that minted nothing) leaves nothing.
        drop(slots.slot(&key(99)));
        assert!(slots.get(&key(99)).is_none());
        assert_eq!(slots.sizes().0, 3);
        // A lower bound evicts at once.
        slots.set_max_entries(1);
        assert_eq!(slots.gauge.get(), 1);
        assert_eq!(slots.key_of("T5"), Some(key(5)));
    }

    /// 200,000 keys each storing a token, each token then replaced, many refused tokens
    /// looked up: every map stays within `max_entries` (the store order within twice that),
    /// and a lookup finds a token among them without a scan.
    #[test]
    fn two_hundred_thousand_keys_stay_within_max_entries() {
        let now = SystemTime::now();
        let max = 10_000;
        let mut slots = slots(max);
        for round in 0..2 {
            for i in 0..200_000 {
                slots.slot(&key(i)).entry = Some(entry(&format!("T{round}-{i}"), now));
                let (map, index, stored, entries) = slots.sizes();
                assert!(map <= max && index <= max && entries <= max);
                assert!(stored <= 2 * max + 65, "{stored}");
            }
        }
        assert_eq!(slots.sizes().3, max);
        assert_eq!(slots.key_of("T1-199999"), Some(key(199_999)));
        assert!(slots.key_of("T1-0").is_none());
        assert!(slots.key_of("garbage").is_none());
        // Everything expires: nothing is left.
        assert_eq!(
            slots.expire(now + Duration::from_secs(7200)),
            None,
            "no token left"
        );
        assert_eq!(slots.sizes(), (0, 0, 0, 0));
        assert_eq!(slots.gauge.get(), 0);
    }
}
