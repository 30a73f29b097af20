//! The failures a test can inject ([`Fault`]), the queue they wait in until the next calls
//! take them, one each, in arrival order, and the [`FaultMix`] that calls finding the queue
//! empty draw a fault from at random (for long runs, where faults come throughout).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
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

impl Fault {
    /// The fault's name, as [`FaultMix`] spells it and the stats page counts it (`delay`
    /// without its length).
    pub fn name(self) -> &'static str {
        match self {
            Fault::Busy => "busy",
            Fault::MinuteQuota => "minute-quota",
            Fault::DailyQuota => "daily-quota",
            Fault::BadGateway => "bad-gateway",
            Fault::Reset => "reset",
            Fault::Hang => "hang",
            Fault::Delay(_) => "delay",
            Fault::LostAnswer => "lost-answer",
        }
    }
}

/// Faults drawn at random, for calls that find no queued fault: each such call suffers the
/// `i`-th fault with its probability `p_i`, and is answered normally with the probability
/// left, `1 - sum(p_i)`. Empty by default: no call is faulted unless a test queues one.
///
/// Written as the `wxgate-stand-in --faults` flag reads it ([`FromStr`]): comma-separated
/// `NAME=FRACTION`, `NAME` one of `busy`, `minute-quota`, `daily-quota`, `bad-gateway`,
/// `reset`, `hang`, `lost-answer` or `delay:MS`, e.g.
/// `busy=0.02,reset=0.005,delay:1500=0.003`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultMix {
    /// Each fault with its probability; the sum is at most 1.
    faults: Vec<(Fault, f64)>,
}

impl FaultMix {
    /// A mix of these faults and probabilities.
    ///
    /// # Errors
    /// When a probability is not a number from 0 to 1, or they add up to more than 1.
    pub fn new(faults: impl IntoIterator<Item = (Fault, f64)>) -> Result<FaultMix, String> {
        let faults: Vec<(Fault, f64)> = faults.into_iter().collect();
        for (fault, probability) in &faults {
            if !(0.0..=1.0).contains(probability) {
                return Err(format!(
                    "{}: {probability} is not a fraction from 0 to 1",
                    fault.name()
                ));
            }
        }
        let total: f64 = faults.iter().map(|(_, probability)| probability).sum();
        // A little slack for fractions that add up to 1 only up to rounding.
        if total > 1.0 + 1e-9 {
            return Err(format!(
                "the fractions add up to {total}, more than 1 (every call)"
            ));
        }
        Ok(FaultMix { faults })
    }

    /// Whether no call is ever faulted by this mix.
    pub fn is_empty(&self) -> bool {
        self.faults
            .iter()
            .all(|(_, probability)| *probability == 0.0)
    }

    /// The fault one call suffers, if any.
    pub(crate) fn draw(&self) -> Option<Fault> {
        if self.faults.is_empty() {
            return None;
        }
        let mut roll = fastrand::f64();
        for (fault, probability) in &self.faults {
            if roll < *probability {
                return Some(*fault);
            }
            roll -= probability;
        }
        None
    }
}

impl FromStr for FaultMix {
    type Err = String;

    fn from_str(text: &str) -> Result<FaultMix, String> {
        let mut faults = Vec::new();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let Some((name, fraction)) = item.split_once('=') else {
                return Err(format!("{item:?} is not NAME=FRACTION"));
            };
            let fault = match name.trim() {
                "busy" => Fault::Busy,
                "minute-quota" => Fault::MinuteQuota,
                "daily-quota" => Fault::DailyQuota,
                "bad-gateway" => Fault::BadGateway,
                "reset" => Fault::Reset,
                "hang" => Fault::Hang,
                "lost-answer" => Fault::LostAnswer,
                other => match other.strip_prefix("delay:").map(str::parse::<u64>) {
                    Some(Ok(millis)) => Fault::Delay(Duration::from_millis(millis)),
                    Some(Err(_)) => {
                        return Err(format!(
                            "{other:?}: the delay is not a whole number of milliseconds"
                        ))
                    }
                    None => {
                        return Err(format!(
                        "{other:?} is not a fault (busy, minute-quota, daily-quota, bad-gateway, \
                             reset, hang, lost-answer, delay:MS)"
                    ))
                    }
                },
            };
            let probability = fraction
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{name}: {fraction:?} is not a fraction from 0 to 1"))?;
            faults.push((fault, probability));
        }
        FaultMix::new(faults)
    }
}

impl fmt::Display for FaultMix {
    /// The form [`FromStr`] reads; `none` for an empty mix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.faults.is_empty() {
            return f.write_str("none");
        }
        for (index, (fault, probability)) in self.faults.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            match fault {
                Fault::Delay(delay) => write!(f, "delay:{}", delay.as_millis())?,
                other => f.write_str(other.name())?,
            }
            write!(f, "={probability}")?;
        }
        Ok(())
    }
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
