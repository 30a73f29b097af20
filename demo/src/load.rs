//! The load: virtual users logging in (double submits, SDK retries, invalid codes), backends
//! calling APIs with access tokens (`tokens.rs`), and the script of one-off events (a wrong
//! secret, an empty code, a burst, injected `-1`s and resets), every answer tallied as the
//! client saw it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use wxgate_stand_in::{Fault, StandIn, DEFAULT_APPID, DEFAULT_APP_SECRET, JSCODE2SESSION_PATH};

use crate::client::{Seen, Tally};
use crate::plan::Plan;
use crate::run::drain;
use crate::tokens::TokenTally;
use wxgate_contract::CACHE_HEADER;

/// Shared by every task of the load.
pub(crate) struct Load {
    client: reqwest::Client,
    base: String,
    pub(crate) started: Instant,
    pub(crate) deadline: Instant,
    stop: watch::Sender<bool>,
    pub(crate) tally: Tally,
    /// What the token backends counted.
    pub(crate) tokens: TokenTally,
    doubles: DoubleSubmits,
    /// How long a double submit may stay in flight (held across 45011s at most this long).
    max_hold: Duration,
}

impl Load {
    pub(crate) fn new(
        client: reqwest::Client,
        proxy: SocketAddr,
        duration: Duration,
        max_hold: Duration,
    ) -> Load {
        let started = Instant::now();
        Load {
            client,
            base: format!("http://{proxy}"),
            started,
            deadline: started + duration,
            stop: watch::channel(false).0,
            tally: Tally::default(),
            tokens: TokenTally::default(),
            doubles: DoubleSubmits::default(),
            max_hold,
        }
    }

    /// Whether new work may start.
    pub(crate) fn running(&self) -> bool {
        !*self.stop.borrow() && Instant::now() < self.deadline
    }

    /// Stops the load early (Ctrl-C): requests in flight are still answered.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Sleeps until `at`; false, as soon as it is known, if the load ends first (its
    /// deadline, or a stop).
    pub(crate) async fn sleep_until(&self, at: Instant) -> bool {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            () = tokio::time::sleep_until(at.min(self.deadline)) => at < self.deadline && !*self.stop.borrow(),
            _ = stop.wait_for(|stopped| *stopped) => false,
        }
    }

    /// `start + fraction × duration`.
    fn at(&self, fraction: f64) -> Instant {
        self.started + (self.deadline - self.started).mul_f64(fraction)
    }

    /// One request through wxgate, tallied.
    async fn get(&self, path_and_query: &str) -> Seen {
        self.get_json(path_and_query).await.0
    }

    /// One request through wxgate, tallied; with its JSON body, if it has one.
    pub(crate) async fn get_json(&self, path_and_query: &str) -> (Seen, Option<serde_json::Value>) {
        let url = format!("{}{path_and_query}", self.base);
        let (seen, body) = match self.client.get(url).send().await {
            Ok(answer) => {
                let status = answer.status();
                let cache = answer
                    .headers()
                    .get(CACHE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match answer.bytes().await {
                    Ok(body) => (
                        Seen::classify(status, cache.as_deref(), &body),
                        serde_json::from_slice(&body).ok(),
                    ),
                    Err(_) => (Seen::NoAnswer, None),
                }
            }
            Err(_) => (Seen::NoAnswer, None),
        };
        self.tally.add(&seen);
        (seen, body)
    }

    async fn exchange(&self, js_code: &str) -> Seen {
        self.exchange_with(DEFAULT_APP_SECRET, js_code).await
    }

    async fn exchange_with(&self, secret: &str, js_code: &str) -> Seen {
        self.get(&format!(
            "{JSCODE2SESSION_PATH}?appid={DEFAULT_APPID}&secret={secret}&js_code={js_code}&grant_type=authorization_code"
        ))
        .await
    }

    /// Two identical exchanges at once, as a double tap or a page that submits twice does.
    async fn double_submit(&self, js_code: &str) {
        tokio::join!(self.exchange(js_code), self.exchange(js_code));
    }
}

/// A fresh code shaped like `wx.login()`'s: 32 URL-safe characters.
fn fresh_code() -> String {
    random_code(32)
}

pub(crate) fn random_code(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

fn jitter(from_ms: u64, to_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(from_ms..to_ms.max(from_ms + 1)))
}

/// One user, over and over: open the mini program, `wx.login()`, the backend exchanges the
/// code; sometimes twice at once, sometimes again a moment later (an SDK retry), now and then
/// with a code WeChat refuses; then a pause.
pub(crate) async fn virtual_user(load: Arc<Load>, user: usize) {
    // Users do not all start in the same millisecond.
    tokio::time::sleep(jitter(0, 50 * (user as u64 + 1))).await;
    while load.running() {
        let roll = fastrand::u32(0..100);
        let code = if roll < 2 {
            // An expired or forged code: WeChat answers 40029, wxgate remembers it.
            format!("invalid-{}", random_code(24))
        } else {
            fresh_code()
        };
        let doubled = (2..30).contains(&roll);
        match doubled.then(|| load.doubles.enter()).flatten() {
            Some(_in_flight) => load.double_submit(&code).await,
            None => {
                load.exchange(&code).await;
            }
        }
        if fastrand::u32(0..100) < 35 {
            // The SDK did not see the answer (a timeout, a -1) and sends the same code again.
            tokio::time::sleep(jitter(20, 200)).await;
            load.exchange(&code).await;
        }
        if !load.sleep_until(Instant::now() + jitter(100, 600)).await {
            return;
        }
    }
}

/// The one-off events, at fixed points of the run.
pub(crate) async fn script(load: Arc<Load>, faults: Arc<StandIn>, plan: Plan) {
    if !load.sleep_until(load.at(0.05)).await {
        return;
    }
    // One double submit and one replay for sure, however the dice fall for the users.
    let code = fresh_code();
    if let Some(_in_flight) = load.doubles.enter() {
        load.double_submit(&code).await;
    }
    load.exchange(&code).await;

    if !load.sleep_until(load.at(0.10)).await {
        return;
    }
    // A deployment with a wrong app secret (WeChat: 40125), a code WeChat refuses (40029), and
    // a client bug sending an empty code (wxgate refuses it: 41008, nothing sent).
    load.exchange_with("wrong-secret", &fresh_code()).await;
    load.exchange(&format!("invalid-{}", random_code(24))).await;
    load.exchange("").await;

    let events: [(f64, Event); 6] = [
        (0.25, Event::Busy),
        (0.35, Event::Reset),
        (0.50, Event::Burst),
        (0.60, Event::Busy),
        (0.75, Event::Reset),
        (0.85, Event::Busy),
    ];
    for (fraction, event) in events {
        if !load.sleep_until(load.at(fraction)).await {
            return;
        }
        match event {
            // Taken by whichever call reaches the stand-in next; wxgate retries it itself.
            Event::Busy => faults.push_faults([Fault::Busy]),
            Event::Reset => inject_reset(&load, &faults).await,
            Event::Burst => burst(&load, plan.burst_size).await,
        }
    }
}

#[derive(Clone, Copy)]
enum Event {
    Busy,
    Reset,
    Burst,
}

/// Many new users at once (a push notification went out): one and a half quotas of fresh
/// codes in the same instant. Some get their turn after a wait, the rest a local 45011.
async fn burst(load: &Arc<Load>, size: usize) {
    let mut tasks = JoinSet::new();
    for _ in 0..size {
        let load = load.clone();
        tasks.spawn(async move {
            load.exchange(&fresh_code()).await;
        });
    }
    drain(tasks).await;
}

/// A connection reset by the stand-in. On a connection kept alive from an earlier call, a GET
/// is sent once more on a new connection (the server may have been closing an idle
/// connection); otherwise wxgate does not retry it (the call may have been executed), and the
/// client gets a 502. The fault goes to whichever call arrives next, so double submits are
/// paused first: a call that fails then has no follower.
async fn inject_reset(load: &Load, faults: &StandIn) {
    let drained = load
        .doubles
        .close(load.max_hold + Duration::from_secs(1))
        .await;
    if drained {
        faults.push_faults([Fault::Reset]);
        // Something must arrive to take it: a call that wxgate forwards as it is (token
        // fetches are answered from wxgate's cache), if no user is faster.
        load.get("/wxa/demo/ping").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while faults.pending_faults() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    load.doubles.open();
}

/// Keeps double submits out while a reset is injected.
#[derive(Default)]
struct DoubleSubmits {
    in_flight: AtomicUsize,
    closed: AtomicBool,
}

/// A double submit in flight; leaves on drop.
struct InFlight<'a>(&'a DoubleSubmits);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DoubleSubmits {
    /// Enters unless closed. Counting before looking at `closed` (both SeqCst) means that
    /// either this call sees the gate closed or [`DoubleSubmits::close`] sees it in flight.
    fn enter(&self) -> Option<InFlight<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        (!self.closed.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Closes the gate and waits for the double submits in flight; false if they did not
    /// finish within `patience`.
    async fn close(&self, patience: Duration) -> bool {
        self.closed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + patience;
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}
