//! Redis pub/sub messages, routed to the tasks waiting for them.
//!
//! The replica's Redis connection speaks RESP3, so subscriptions share it with ordinary
//! commands, and published messages arrive as *push* messages on a channel that redis-rs
//! feeds. On Redis Cluster the channels are sharded (`SSUBSCRIBE`): a channel is in the slot
//! of its code exchange's keys, and only that shard carries its messages. [`Notices`] keeps, per Redis channel, the waiters of this replica; one task reads
//! the pushes and hands each message to the waiters of its channel. A replica subscribes to
//! a channel only while one of its requests waits on it (another replica's code exchange),
//! so idle replicas receive nothing.

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Cluster, KeyKind, RedisOp, Tag};

/// The waiters of this replica, by Redis channel.
#[derive(Default)]
pub struct Notices {
    waiting: Mutex<HashMap<Vec<u8>, Vec<Waiter>>>,
}

/// Where one waiter gets the next message of its channel.
type Waiter = oneshot::Sender<Vec<u8>>;

impl Notices {
    /// Registers a waiter for the next message on `channel`.
    pub fn register(&self, channel: &str) -> oneshot::Receiver<Vec<u8>> {
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .entry(channel.as_bytes().to_vec())
            .or_default()
            .push(sender);
        receiver
    }

    /// Whether anybody on this replica still waits on `channel` (if not, it can be
    /// unsubscribed). Forgets the waiters that went away.
    pub fn still_waited(&self, channel: &str) -> bool {
        let mut waiting = self.waiting.lock();
        let Some(senders) = waiting.get_mut(channel.as_bytes()) else {
            return false;
        };
        senders.retain(|sender| !sender.is_closed());
        if senders.is_empty() {
            waiting.remove(channel.as_bytes());
            return false;
        }
        true
    }

    /// The channels somebody on this replica waits on.
    fn channels(&self) -> Vec<String> {
        self.waiting
            .lock()
            .keys()
            .map(|channel| String::from_utf8_lossy(channel).into_owned())
            .collect()
    }

    /// Subscribes again to every channel waited on (on a new connection: another primary).
    pub async fn resubscribe(&self, cluster: &Cluster) {
        for channel in self.channels() {
            let _ = tokio::time::timeout(cluster.timeout, cluster.redis.subscribe(&channel)).await;
        }
    }

    /// Hands every message pushed by Redis to the waiters of its channel, until the
    /// connection's push channel closes.
    pub async fn route(&self, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
        while let Some(push) = pushes.recv().await {
            if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
                continue;
            }
            let [Value::BulkString(channel), Value::BulkString(payload), ..] = push.data.as_slice()
            else {
                continue;
            };
            let senders = self.waiting.lock().remove(channel.as_slice());
            for sender in senders.into_iter().flatten() {
                let _ = sender.send(payload.clone());
            }
        }
    }
}

impl Cluster {
    /// Waits for messages published on the channel of the code exchange `fingerprint`
    /// ([`KeyKind::CodeChannel`], in the slot of `tag`); `None` if Redis did not take the
    /// subscription.
    pub async fn listen(&self, tag: &Tag, fingerprint: &str) -> Option<Listener<'_>> {
        let channel = self.key(KeyKind::CodeChannel, tag, fingerprint);
        let next = self.notices.register(&channel);
        let subscribed = self.run_op(RedisOp::Subscribe, self.redis.subscribe(&channel));
        subscribed.await?;
        Some(Listener {
            cluster: self,
            channel,
            next,
        })
    }

    /// Unsubscribes from `channel` (a failure only leaves a subscription nobody reads).
    async fn unsubscribe(&self, channel: &str) {
        let _ = tokio::time::timeout(self.timeout, self.redis.unsubscribe(channel)).await;
    }
}

/// Messages published on one channel, for a task waiting on it (see [`Cluster::listen`]).
pub struct Listener<'a> {
    cluster: &'a Cluster,
    channel: String,
    next: tokio::sync::oneshot::Receiver<Vec<u8>>,
}

impl Listener<'_> {
    /// The next message on the channel; `None` if none can come any more (the router of
    /// messages stopped). Cancel-safe: a message that arrives meanwhile is kept for the next
    /// call.
    pub async fn message(&mut self) -> Option<Vec<u8>> {
        let message = (&mut self.next).await.ok();
        self.next = self.cluster.notices.register(&self.channel);
        message
    }

    /// Stops listening; the channel is unsubscribed once no task of this replica waits on
    /// it.
    pub async fn close(self) {
        let Listener {
            cluster,
            channel,
            next,
        } = self;
        drop(next);
        if !cluster.notices.still_waited(&channel) {
            cluster.unsubscribe(&channel).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_reach_the_waiters_of_their_channel_only() {
        let notices = std::sync::Arc::new(Notices::default());
        let (pushes, receiver) = mpsc::unbounded_channel();
        let router = tokio::spawn({
            let notices = notices.clone();
            async move { notices.route(receiver).await }
        });
        let a = notices.register("a");
        let b = notices.register("b");
        assert!(notices.still_waited("a"));
        let message = |channel: &str, payload: &str| PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::BulkString(payload.as_bytes().to_vec()),
            ],
        };
        pushes.send(message("a", "answer")).unwrap();
        assert_eq!(a.await.unwrap(), b"answer");
        assert!(!notices.still_waited("a"));
        drop(b);
        assert!(
            !notices.still_waited("b"),
            "a waiter that left is forgotten"
        );
        drop(pushes);
        router.await.unwrap();
    }
}
