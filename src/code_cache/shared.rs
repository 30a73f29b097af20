//! Code exchanges shared with the other replicas (`[cluster]`): the exchange looked up and
//! claimed in Redis, the wait for another replica's call, and what this replica's call
//! leaves for the others.

use std::sync::Arc;

use http::HeaderValue;
use tokio::time::Instant;
use wxgate_contract::CacheStatus;

use super::flight::{Flight, Led};
use super::metrics::Tier;
use super::store::{self, Stored};
use super::{is_definitive, CodeExchange, CodeKey, ExchangeResult, Remembered};
use crate::answer::LocalAnswer;
use crate::cluster::codes::{Claim, SharedAnswer, SharedCodes, Waited};
use crate::dispatch::{Call, Dispatcher, FirstTurn};
use crate::wechat::JSON_CONTENT_TYPE;

impl CodeExchange {
    /// With `[cluster]`: the exchange looked up and claimed in Redis under its `fingerprint`
    /// first; a remembered answer or another replica's call answers it without a call of
    /// this replica's own.
    pub(super) async fn lead_shared(
        &self,
        shared: &SharedCodes,
        fingerprint: String,
        key: CodeKey,
        flight: &Arc<Flight>,
        call: &Call,
        dispatcher: &Dispatcher,
    ) -> Led {
        // The first quota turn rides on the claim when it can (one round trip fewer).
        let quota = dispatcher.quota();
        let turn = call
            .quota_key
            .as_ref()
            .and_then(|key| quota.turn_to_claim(key));
        let claim = shared.claim(&fingerprint, turn.as_ref()).await;
        let found = match &claim {
            Claim::Remembered(_) => Some(CacheStatus::Hit),
            Claim::Held => Some(CacheStatus::Coalesced),
            Claim::Mine(..) => Some(CacheStatus::Miss),
            Claim::Unavailable => None,
        };
        if let Some(found) = found {
            self.metrics.lookup(Tier::Redis, found);
        }
        match claim {
            Claim::Remembered(answer) => (self.remember(key, answer), CacheStatus::Hit),
            Claim::Held => {
                self.forget_flight(key, flight);
                (
                    waited(shared.wait(&fingerprint).await),
                    CacheStatus::Coalesced,
                )
            }
            Claim::Mine(ticket, turn) => {
                let first_turn = match turn.and_then(|reply| quota.claimed_turn(reply)) {
                    Some(Ok(())) => FirstTurn::Taken,
                    Some(Err(wait)) => FirstTurn::NotBefore(Instant::now() + wait),
                    None => FirstTurn::Acquire,
                };
                let call = self.call(key, flight, call, dispatcher, first_turn);
                let result = shared.holding(&ticket, call).await;
                let (answer, definitive) = shared_answer(&result);
                shared.complete(ticket, &answer, definitive).await;
                (result, CacheStatus::Miss)
            }
            Claim::Unavailable => (
                self.call(key, flight, call, dispatcher, FirstTurn::Acquire)
                    .await,
                CacheStatus::Miss,
            ),
        }
    }

    /// Keeps an answer another replica remembered, so that the next replay here costs no
    /// Redis round trip.
    fn remember(&self, key: CodeKey, answer: SharedAnswer) -> ExchangeResult {
        let remembered = Remembered::new(answer.status, answer.content_type, answer.body);
        let now = self.seconds(Instant::now());
        let expires = now + self.ttl().as_secs() as u32 + 1;
        match Stored::from_remembered(&remembered, expires) {
            Some(stored) => self.keep(key, stored, now),
            None => {
                self.slots.remove(&key);
            }
        }
        self.update_gauge();
        ExchangeResult::Remembered(remembered)
    }
}

/// A waiting replica's result, as this one answers it.
fn waited(waited: Waited) -> ExchangeResult {
    match waited {
        Waited::Answer(answer) => ExchangeResult::Remembered(Remembered::new(
            answer.status,
            answer.content_type,
            answer.body,
        )),
        Waited::HolderGone => ExchangeResult::Local(LocalAnswer::ClaimHolderGone),
        Waited::Unavailable => ExchangeResult::Local(LocalAnswer::ClaimUnreachable),
    }
}

/// What the replicas waiting for this call get, and whether it is remembered for everyone:
/// WeChat's answer as it came, or the answer wxgate gave itself.
fn shared_answer(result: &ExchangeResult) -> (SharedAnswer, bool) {
    match result {
        ExchangeResult::Upstream(answer) => {
            let response = &answer.response;
            let definitive = is_definitive(response.status, answer.errcode)
                && response.body.len() <= store::MAX_REMEMBERED_BYTES;
            let shared = SharedAnswer {
                status: response.status,
                content_type: response.headers.get(http::header::CONTENT_TYPE).cloned(),
                body: response.body.clone(),
            };
            (shared, definitive)
        }
        ExchangeResult::Remembered(remembered) => (
            SharedAnswer {
                status: remembered.status(),
                content_type: remembered.content_type(),
                body: remembered.body(),
            },
            false,
        ),
        ExchangeResult::Local(local) => (
            SharedAnswer {
                status: local.status(),
                content_type: Some(HeaderValue::from_static(JSON_CONTENT_TYPE)),
                body: local.body(),
            },
            false,
        ),
    }
}
