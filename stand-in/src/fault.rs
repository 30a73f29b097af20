//! The failures a test can inject ([`Fault`]) and the queue they wait in until the next calls
//! take them, one each, in arrival order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::lock;

/// A failure to inject into the next call, whatever its path (see [`StandIn::push_faults`](crate::StandIn::push_faults)).
///
/// Unless said otherwise, a faulted call is *not executed*: no code is spent and no quota is
/// counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 200 `{"errcode":-1,"errmsg":"system error, rid: …"}`.
    Busy,
    /// HTTP 200 with 45011 `api minute-quota reach limit, must slower, retry next minute`.
    MinuteQuota,
    /// HTTP 200 with 45009 `reach max api daily quota limit`.
    DailyQuota,
    /// HTTP 502 with a small `text/html` body, as a load balancer in front of WeChat sends.
    BadGateway,
    /// The connection is closed without any answer.
    Reset,
    /// Never answers: the client hears nothing until it gives up. The pending call is
    /// released at the latest when the stand-in is dropped.
    Hang,
    /// Answers normally after this extra delay (on top of the latency). The call is executed
    /// when it arrives, so a client that times out meanwhile has still spent its code.
    Delay(Duration),
    /// The call *is executed* (a code is spent, quota counted), then the connection is closed
    /// without an answer: the answer was lost on the way back. Retrying a code exchange after
    /// this gets 40163.
    LostAnswer,
}

/// Faults waiting for the next calls.
#[derive(Default)]
pub(crate) struct FaultQueue {
    /// Mirrors `queue.len()` so calls can skip the mutex when nothing is queued, which is
    /// nearly always.
    pending: AtomicUsize,
    queue: Mutex<VecDeque<Fault>>,
}

impl FaultQueue {
    pub(crate) fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        // Collected first so the caller's iterator does not run under the lock.
        let faults: Vec<Fault> = faults.into_iter().collect();
        let mut queue = lock(&self.queue);
        queue.extend(faults);
        self.pending.store(queue.len(), Ordering::Release);
    }

    pub(crate) fn pop(&self) -> Option<Fault> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = lock(&self.queue);
        let fault = queue.pop_front();
        self.pending.store(queue.len(), Ordering::Release);
        fault
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}
