//! `wxgate demo`: the WeChat stand-in, wxgate in front of it, and a realistic load, in one
//! process, with no credentials and no internet.
//!
//! The stand-in gets a small quota over a short window so that limits bite within seconds,
//! and wxgate is configured to allow a little *more* than that on `/sns/jscode2session`, as an
//! operator who guessed the quota too high would: WeChat's own 45011 answers then happen, and
//! wxgate holds those calls to WeChat's next window instead of passing the error on.
//!
//! The load is a handful of virtual users, each logging in again and again (a fresh `js_code`
//! exchanged by their backend), sometimes submitting twice at once (coalesced), sometimes
//! sending the same code again a moment later as an SDK retry does (answered from memory), now
//! and then with an invalid code; a backend fetching access tokens; and a script of one-off
//! events: one wrong app secret, one request with an empty code, a burst well above the quota,
//! `-1 system busy` answers and connection resets injected into the stand-in.
//!
//! The table at the end is built from three independent counts: what the clients saw (by the
//! `X-Wxgate-Cache` header and the answer), wxgate's own `/metrics`, and the calls the stand-in
//! received. Its check line is the identity
//!
//! ```text
//! upstream calls − retries + saved (coalesced + cache hits) + answered by wxgate itself
//!     = client requests
//! ```
//!
//! which holds because every request that reached WeChat made one call plus its retries, and
//! every other request made none (`wxgate_retries_total` counts retries when they are sent).
//! Resets are only injected while no double
//! submit is in flight, so a failed call never has followers (a follower of a failed call
//! would be a request that neither reached WeChat nor was saved).

use std::fmt;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{Config, ConfigErrors};
use crate::metrics::{Outcome, RetryReason};
use crate::proxy::CACHE_HEADER;
use crate::server::{Listeners, RunError};
use wxgate_stand_in::{
    Fault, StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET, JSCODE2SESSION_PATH,
    TOKEN_PATH,
};

/// Calls a second the stand-in admits for each (appid, API): its quota is this times the
/// window. Small enough that six users go over it.
const UPSTREAM_CALLS_PER_SECOND: u32 = 8;

/// Virtual users logging in concurrently. Each offers about two fresh codes a second, so
/// together they ask for more than the quota and calls wait for their turn.
const USERS: usize = 6;

/// How long a request may wait for its quota turn before wxgate answers 45011 itself. Short
/// (the default is 3 s), so that about half of the burst gets a local 45011.
const MAX_WAIT: Duration = Duration::from_millis(2500);

/// WeChat's stand-in answers after this long, about what a nearby WeChat takes. It also keeps
/// an exchange in flight long enough for a double submit to join it.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(40);

/// How often the progress line is redrawn on a terminal, and printed otherwise.
const PROGRESS_TTY: Duration = Duration::from_millis(250);
const PROGRESS_LOG: Duration = Duration::from_secs(5);

/// What `wxgate demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the load runs (`--seconds`). Requests still held for WeChat's next window
    /// when it ends are waited for.
    pub duration: Duration,
    /// Leave wxgate and the stand-in running after the table (`--keep-running`), until the
    /// shutdown signal.
    pub keep_running: bool,
    /// wxgate's proxy port (`--listen`); port 0 picks a free one.
    pub listen: SocketAddr,
    /// wxgate's admin port, `/metrics` (`--admin-listen`); port 0 picks a free one.
    pub admin_listen: SocketAddr,
    /// The quota window of the stand-in and of wxgate, in seconds; quotas scale with it.
    /// Five seconds makes limits bite within a 20-second run; tests shorten it.
    pub window_secs: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: Duration::from_secs(20),
            keep_running: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            window_secs: 5,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({flag}): {source}; choose another with {flag} ADDR (port 0 picks a free one)")]
    Bind {
        /// The command-line flag that names the address.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `--listen` and `--admin-listen` name the same address.
    #[error(
        "--listen and --admin-listen must differ (both {0}): metrics never share the proxy port"
    )]
    SamePort(SocketAddr),
    /// The stand-in could not start.
    #[error("cannot start the WeChat stand-in: {0}")]
    StandIn(std::io::Error),
    /// The configuration built for the demo was refused (a bug, or impossible options).
    #[error("{0}")]
    Config(ConfigErrors),
    /// wxgate could not run, or stopped with an error.
    #[error("wxgate stopped: {0}")]
    Run(#[from] RunError),
    /// wxgate's task ended abnormally.
    #[error("wxgate's task failed: {0}")]
    Task(String),
    /// The load's HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
    /// wxgate's `/metrics` could not be read.
    #[error("cannot read wxgate's metrics at {0}")]
    Metrics(String),
}

/// The quotas and sizes derived from the window.
#[derive(Debug, Clone, Copy)]
struct Plan {
    window_secs: u64,
    /// Executed calls per window and (appid, API) at the stand-in.
    upstream_quota: u32,
    /// wxgate's per_window for `/sns/jscode2session`: a quarter above the stand-in's, so that
    /// WeChat answers 45011 whenever the load fills a window.
    exchange_per_window: u32,
    /// wxgate's burst, for every API.
    burst: u32,
    /// How long a call may be held across 45011s: its first wait, three windows, and another
    /// wait in the queue of the window it is held to, so that a held call always gets there.
    max_hold: Duration,
    /// Requests of the burst, all at once: one and a half quotas, and at least twice what
    /// wxgate lets through within `MAX_WAIT`, so that some get a local 45011 however short
    /// the window.
    burst_size: usize,
}

impl Plan {
    fn new(window_secs: u64) -> Plan {
        let window_secs = window_secs.clamp(1, 3600);
        let upstream_quota =
            UPSTREAM_CALLS_PER_SECOND.saturating_mul(u32::try_from(window_secs).unwrap_or(3600));
        Plan {
            window_secs,
            upstream_quota,
            exchange_per_window: upstream_quota + upstream_quota / 4,
            burst: (upstream_quota / 5).max(1),
            max_hold: Duration::from_secs(window_secs * 3) + MAX_WAIT * 2,
            burst_size: (upstream_quota as usize * 3 / 2).max(40),
        }
    }

    fn config_text(&self, listen: SocketAddr, admin: SocketAddr, upstream: &str) -> String {
        format!(
            r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
shutdown_grace_ms = 2000

[upstream]
base_url = "{upstream}"
connect_timeout_ms = 1000
timeout_ms = 5000

[quota]
window_secs = {window}
# Every API: exactly the stand-in's quota.
per_window = {quota}
burst = {burst}
max_wait_ms = {max_wait}

# The code exchange: a little above what the stand-in admits, so WeChat's 45011 happens.
[quota.apis."{exchange}"]
per_window = {exchange_quota}
burst = {burst}

[retry]
max_hold_ms = {max_hold}
busy_attempts = 2
"#,
            window = self.window_secs,
            quota = self.upstream_quota,
            burst = self.burst,
            max_wait = MAX_WAIT.as_millis(),
            exchange = JSCODE2SESSION_PATH,
            exchange_quota = self.exchange_per_window,
            max_hold = self.max_hold.as_millis(),
        )
    }
}

/// Runs the demo: starts the stand-in and wxgate, drives the load for `options.duration`
/// (less if `shutdown` completes first) with a progress line, prints the table, and returns
/// what it counted. With `keep_running`, it then prints curl examples and serves until
/// `shutdown` completes. Prints on stdout.
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    let plan = Plan::new(options.window_secs);
    if options.listen == options.admin_listen && options.listen.port() != 0 {
        return Err(DemoError::SamePort(options.listen));
    }
    let (proxy_listener, proxy_addr) = bind("--listen", options.listen).await?;
    let (admin_listener, admin_addr) = bind("--admin-listen", options.admin_listen).await?;

    let upstream = StandIn::start(StandInConfig {
        quota_per_window: Some(plan.upstream_quota),
        window: Duration::from_secs(plan.window_secs),
        latency: UPSTREAM_LATENCY,
        ..StandInConfig::default()
    })
    .await
    .map(Arc::new)
    .map_err(DemoError::StandIn)?;
    let config =
        Config::from_toml_str(&plan.config_text(proxy_addr, admin_addr, &upstream.base_url()))
            .map_err(DemoError::Config)?;

    let listeners = Listeners {
        proxy: proxy_listener,
        admin: admin_listener,
    };
    let mut wxgate = Serving::start(listeners, config);

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()
        .map_err(DemoError::Client)?;
    wait_until_ready(&client, admin_addr, &mut wxgate).await?;

    println!(
        "wxgate demo: a WeChat stand-in at {} (quota: {} calls per {} s window for each appid and API)",
        upstream.base_url(),
        plan.upstream_quota,
        plan.window_secs
    );
    println!("  wxgate proxy    http://{proxy_addr}   (in front of the stand-in)");
    println!("  wxgate metrics  http://{admin_addr}/metrics");
    println!(
        "  {} s of load: {USERS} users logging in, double submits, SDK retries, a burst of {}, \
         invalid codes, one wrong secret, injected -1 and resets",
        options.duration.as_secs_f64(),
        plan.burst_size
    );

    tokio::pin!(shutdown);

    let load = Arc::new(Load::new(
        client.clone(),
        proxy_addr,
        options.duration,
        plan.max_hold,
    ));
    let progress = spawn_progress(load.clone(), client.clone(), admin_addr, upstream.clone());
    let mut tasks = JoinSet::new();
    for user in 0..USERS {
        tasks.spawn(virtual_user(load.clone(), user));
    }
    tasks.spawn(token_fetcher(load.clone()));
    tasks.spawn(script(load.clone(), upstream.clone(), plan));
    let drained = drain(tasks);
    tokio::pin!(drained);
    let mut signalled = false;
    tokio::select! {
        () = &mut drained => {}
        () = &mut shutdown => {
            signalled = true;
            load.stop();
            drained.await;
        }
    }
    let load_time = load.started.elapsed();
    progress.finish().await;

    let metrics_text = scrape(&client, admin_addr)
        .await
        .map_err(|error| DemoError::Metrics(format!("http://{admin_addr}/metrics: {error}")))?;
    let report = DemoReport {
        requested: options.duration,
        load_time,
        interrupted: signalled,
        window: Duration::from_secs(plan.window_secs),
        upstream_quota: plan.upstream_quota,
        exchange_per_window: plan.exchange_per_window,
        max_wait: MAX_WAIT,
        proxy: proxy_addr,
        admin: admin_addr,
        client: load.tally.counts(),
        metrics: MetricsCounts::from_text(&metrics_text),
        upstream_calls: upstream.total_calls(),
        metrics_text,
    };
    println!();
    print!("{report}");

    if options.keep_running && !signalled {
        print_keep_running(proxy_addr, admin_addr, &upstream);
        shutdown.await;
        println!("wxgate demo: stopping");
    }
    drop(client);
    wxgate.stop().await?;
    // The last handle: the stand-in stops here (every task holding one has ended).
    drop(upstream);
    Ok(report)
}

/// Binds `addr`; returns the listener and the address a local client reaches it at (the
/// real port when `addr` asked for port 0).
async fn bind(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), DemoError> {
    let error = |source| DemoError::Bind { flag, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, reachable(local)))
}

/// wxgate running in a task of its own. Aborted if dropped before [`Serving::stop`] (an
/// error path), so that it never outlives the demo.
struct Serving {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl Serving {
    fn start(listeners: Listeners, config: Config) -> Serving {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::server::run(listeners, config, async {
            let _ = stopped.await;
        }));
        Serving {
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting, drains, and returns how wxgate ended.
    async fn stop(mut self) -> Result<(), DemoError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.ended().await
    }

    async fn ended(&mut self) -> Result<(), DemoError> {
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(error) => Err(DemoError::Task(error.to_string())),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address a local client can connect to: an unspecified IP (`0.0.0.0`, `::`) becomes
/// loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Waits until wxgate's `/readyz` answers 200, or fails if wxgate stopped.
async fn wait_until_ready(
    client: &reqwest::Client,
    admin: SocketAddr,
    wxgate: &mut Serving,
) -> Result<(), DemoError> {
    let url = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if wxgate.task.is_finished() {
            wxgate.ended().await?;
            return Err(DemoError::Task("wxgate stopped at once".into()));
        }
        let ready = client
            .get(&url)
            .send()
            .await
            .is_ok_and(|answer| answer.status() == StatusCode::OK);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Metrics(format!("{url} never answered 200")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drain(mut tasks: JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result {
            tracing::warn!(%error, "a demo task failed");
        }
    }
}

async fn scrape(client: &reqwest::Client, admin: SocketAddr) -> Result<String, reqwest::Error> {
    client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

fn print_keep_running(proxy: SocketAddr, admin: SocketAddr, upstream: &StandIn) {
    let exchange = |code: &str| {
        format!(
            "http://{proxy}{JSCODE2SESSION_PATH}?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={code}&grant_type=authorization_code"
        )
    };
    let code = format!("try-{}", random_code(12));
    println!();
    println!("wxgate and the stand-in keep running; Ctrl-C (or SIGTERM) stops both.");
    println!(
        "  proxy    http://{proxy}   (upstream: the stand-in at {})",
        upstream.base_url()
    );
    println!("  metrics  http://{admin}/metrics");
    println!("The stand-in's app (fake credentials):");
    println!("  appid={DEFAULT_APPID}  secret={DEFAULT_APP_SECRET}");
    println!("Try:");
    println!("  # exchange a code (any new one works once), then again: X-Wxgate-Cache: hit");
    println!("  curl -si '{}'", exchange(&code));
    println!("  curl -si '{}'", exchange(&code));
    println!("  # a code WeChat refuses (40029), an access token");
    println!("  curl -s '{}'", exchange("invalid-code"));
    println!(
        "  curl -s 'http://{proxy}{TOKEN_PATH}?grant_type=client_credential&appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}'"
    );
    println!("  curl -s http://{admin}/metrics | grep '^wxgate_requests_total'");
}

// ---------------------------------------------------------------------------------------------
// The load

/// Shared by every task of the load.
struct Load {
    client: reqwest::Client,
    base: String,
    started: Instant,
    deadline: Instant,
    stop: watch::Sender<bool>,
    tally: Tally,
    doubles: DoubleSubmits,
    /// How long a double submit may stay in flight (held across 45011s at most this long).
    max_hold: Duration,
}

impl Load {
    fn new(
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
            doubles: DoubleSubmits::default(),
            max_hold,
        }
    }

    /// Whether new work may start.
    fn running(&self) -> bool {
        !*self.stop.borrow() && Instant::now() < self.deadline
    }

    /// Stops the load early (Ctrl-C): requests in flight are still answered.
    fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Sleeps until `at`; false, as soon as it is known, if the load ends first (its
    /// deadline, or a stop).
    async fn sleep_until(&self, at: Instant) -> bool {
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
        let url = format!("{}{path_and_query}", self.base);
        let seen = match self.client.get(url).send().await {
            Ok(answer) => {
                let status = answer.status();
                let cache = answer
                    .headers()
                    .get(CACHE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match answer.bytes().await {
                    Ok(body) => Seen::classify(status, cache.as_deref(), &body),
                    Err(_) => Seen::NoAnswer,
                }
            }
            Err(_) => Seen::NoAnswer,
        };
        self.tally.add(&seen);
        seen
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

    async fn token(&self) -> Seen {
        self.get(&format!(
            "{TOKEN_PATH}?grant_type=client_credential&appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}"
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

fn random_code(len: usize) -> String {
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
async fn virtual_user(load: Arc<Load>, user: usize) {
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

/// A backend fetching access tokens now and then.
async fn token_fetcher(load: Arc<Load>) {
    while load.running() {
        load.token().await;
        let next = Instant::now() + jitter(1000, 2000);
        if !load.sleep_until(next).await {
            return;
        }
    }
}

/// The one-off events, at fixed points of the run.
async fn script(load: Arc<Load>, faults: Arc<StandIn>, plan: Plan) {
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

/// A connection reset by the stand-in. wxgate does not retry it (the call may have been
/// executed), so one client gets a 502. The fault goes to whichever call arrives next, so
/// double submits are paused first: the call that fails then has no follower.
async fn inject_reset(load: &Load, faults: &StandIn) {
    let drained = load
        .doubles
        .close(load.max_hold + Duration::from_secs(1))
        .await;
    if drained {
        faults.push_faults([Fault::Reset]);
        // Something must arrive to take it: a token fetch, if no user is faster.
        load.token().await;
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

// ---------------------------------------------------------------------------------------------
// What the clients saw

/// One answer as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// An answer: how wxgate must have answered it, and what it says.
    Answer {
        outcome: Outcome,
        status: StatusCode,
        errcode: Option<i64>,
    },
    /// No answer from wxgate at all.
    NoAnswer,
}

impl Seen {
    /// wxgate's own answers say `wxgate` in their errmsg; WeChat's never do. Among wxgate's
    /// own, 45011 is a local quota refusal and -1 an upstream failure; the rest are refusals
    /// of the request. WeChat's answers are hits, followers or forwarded by the cache header.
    fn classify(status: StatusCode, cache: Option<&str>, body: &[u8]) -> Seen {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let errcode = json
            .as_ref()
            .and_then(|v| v.get("errcode"))
            .and_then(|v| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok()));
        let own = json
            .as_ref()
            .and_then(|v| v.get("errmsg"))
            .and_then(|v| v.as_str())
            .is_some_and(|errmsg| errmsg.contains("wxgate"));
        let outcome = if own {
            match errcode {
                Some(crate::wechat::MINUTE_QUOTA) => Outcome::LocalLimit,
                Some(crate::wechat::SYSTEM_BUSY) => Outcome::UpstreamError,
                _ => Outcome::Rejected,
            }
        } else {
            match cache {
                Some("hit") => Outcome::CacheHit,
                Some("coalesced") => Outcome::Coalesced,
                _ => Outcome::Forwarded,
            }
        };
        Seen::Answer {
            outcome,
            status,
            errcode,
        }
    }

    /// Which error a client saw, if any.
    fn error(&self) -> Option<ClientError> {
        let Seen::Answer {
            outcome,
            status,
            errcode,
        } = *self
        else {
            return Some(ClientError::NoAnswer);
        };
        Some(match outcome {
            Outcome::LocalLimit => ClientError::LocalQuota,
            Outcome::UpstreamError => ClientError::UpstreamFailed,
            Outcome::Rejected => ClientError::Refused,
            _ => match errcode {
                None | Some(0) if status == StatusCode::OK => return None,
                Some(crate::wechat::MINUTE_QUOTA) => ClientError::WechatQuota,
                Some(40029) => ClientError::InvalidCode,
                Some(40125) => ClientError::WrongSecret,
                Some(40163) => ClientError::CodeUsed,
                Some(crate::wechat::SYSTEM_BUSY) => ClientError::Busy,
                _ => ClientError::Other,
            },
        })
    }
}

/// The errors clients were given, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientError {
    LocalQuota,
    UpstreamFailed,
    Refused,
    WechatQuota,
    InvalidCode,
    WrongSecret,
    CodeUsed,
    Busy,
    Other,
    NoAnswer,
}

impl ClientError {
    const ALL: [ClientError; 10] = [
        ClientError::LocalQuota,
        ClientError::UpstreamFailed,
        ClientError::Refused,
        ClientError::WechatQuota,
        ClientError::InvalidCode,
        ClientError::WrongSecret,
        ClientError::CodeUsed,
        ClientError::Busy,
        ClientError::Other,
        ClientError::NoAnswer,
    ];
}

/// The client-side counts, updated by every task of the load.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    errors: [AtomicU64; ClientError::ALL.len()],
    wechat_45011_forwarded: AtomicU64,
}

impl Tally {
    fn add(&self, seen: &Seen) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Seen::Answer { outcome, .. } = seen {
            self.outcomes[outcome_index(*outcome)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(error) = seen.error() {
            if let (ClientError::WechatQuota, Seen::Answer { outcome, .. }) = (error, seen) {
                if *outcome == Outcome::Forwarded {
                    self.wechat_45011_forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            let index = ClientError::ALL
                .iter()
                .position(|e| *e == error)
                .unwrap_or(ClientError::ALL.len() - 1);
            self.errors[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome_index(outcome)].load(Ordering::Relaxed)
    }

    fn error(&self, error: ClientError) -> u64 {
        let index = ClientError::ALL
            .iter()
            .position(|e| *e == error)
            .unwrap_or(ClientError::ALL.len() - 1);
        self.errors[index].load(Ordering::Relaxed)
    }

    fn counts(&self) -> ClientCounts {
        ClientCounts {
            requests: self.requests.load(Ordering::Relaxed),
            forwarded: self.outcome(Outcome::Forwarded),
            cache_hit: self.outcome(Outcome::CacheHit),
            coalesced: self.outcome(Outcome::Coalesced),
            local_limit: self.outcome(Outcome::LocalLimit),
            rejected: self.outcome(Outcome::Rejected),
            upstream_error: self.outcome(Outcome::UpstreamError),
            no_answer: self.error(ClientError::NoAnswer),
            wechat_45011: self.error(ClientError::WechatQuota),
            wechat_45011_forwarded: self.wechat_45011_forwarded.load(Ordering::Relaxed),
            invalid_code: self.error(ClientError::InvalidCode),
            wrong_secret: self.error(ClientError::WrongSecret),
            code_used: self.error(ClientError::CodeUsed),
            busy: self.error(ClientError::Busy),
            other_errors: self.error(ClientError::Other),
        }
    }
}

fn outcome_index(outcome: Outcome) -> usize {
    Outcome::ALL
        .iter()
        .position(|o| *o == outcome)
        .unwrap_or_default()
}

/// What the clients of the load counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// Requests sent to wxgate.
    pub requests: u64,
    /// Answered by WeChat through wxgate (`X-Wxgate-Cache: miss`, or no header).
    pub forwarded: u64,
    /// `X-Wxgate-Cache: hit`.
    pub cache_hit: u64,
    /// `X-Wxgate-Cache: coalesced`, with WeChat's answer.
    pub coalesced: u64,
    /// wxgate's own 45011.
    pub local_limit: u64,
    /// wxgate's own refusal of the request.
    pub rejected: u64,
    /// wxgate's 502/504: WeChat gave no answer.
    pub upstream_error: u64,
    /// No answer from wxgate at all (should be 0).
    pub no_answer: u64,
    /// WeChat's 45011 passed on (held as long as allowed).
    pub wechat_45011: u64,
    /// Of those, answers to the request that made the call (not to followers).
    pub wechat_45011_forwarded: u64,
    /// 40029 invalid code, first answers and replays.
    pub invalid_code: u64,
    /// 40125 invalid app secret.
    pub wrong_secret: u64,
    /// 40163 code been used: a code burnt by a repeat (wxgate should prevent every one).
    pub code_used: u64,
    /// -1 passed on after wxgate's retries.
    pub busy: u64,
    /// Any other error answer.
    pub other_errors: u64,
}

impl ClientCounts {
    fn outcome(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Forwarded => self.forwarded,
            Outcome::CacheHit => self.cache_hit,
            Outcome::Coalesced => self.coalesced,
            Outcome::LocalLimit => self.local_limit,
            Outcome::Rejected => self.rejected,
            Outcome::UpstreamError => self.upstream_error,
        }
    }

    /// Every error answer (and missing answer) clients got.
    pub fn errors(&self) -> u64 {
        self.local_limit
            + self.rejected
            + self.upstream_error
            + self.no_answer
            + self.wechat_45011
            + self.invalid_code
            + self.wrong_secret
            + self.code_used
            + self.busy
            + self.other_errors
    }
}

// ---------------------------------------------------------------------------------------------
// What wxgate's /metrics say

/// The sums of wxgate's `/metrics` the table needs, over every API.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsCounts {
    /// `wxgate_requests_total` by outcome, in [`Outcome::ALL`] order.
    pub requests: [u64; Outcome::ALL.len()],
    /// `wxgate_upstream_requests_total`: calls WeChat answered.
    pub upstream_answers: u64,
    /// `wxgate_upstream_transport_errors_total`: calls without an answer.
    pub transport_errors: u64,
    /// Of those, `reason="connect"`: never reached WeChat.
    pub connect_errors: u64,
    /// `wxgate_upstream_quota_exceeded_total`: WeChat's 45011 answers.
    pub upstream_45011: u64,
    /// `wxgate_retries_total` by reason, in [`RetryReason::ALL`] order.
    pub retries: [u64; RetryReason::ALL.len()],
    /// `wxgate_quota_wait_seconds_count`: calls that waited for a quota turn.
    pub quota_waits: u64,
    /// `wxgate_quota_wait_seconds_sum`.
    pub quota_wait_seconds: f64,
    /// The smallest histogram bucket holding every wait, if any waited.
    pub quota_wait_within: Option<f64>,
}

impl MetricsCounts {
    /// Reads Prometheus text.
    pub fn from_text(text: &str) -> MetricsCounts {
        let samples = parse_samples(text);
        let sum = |name: &str, labels: &[(&str, &str)]| -> u64 {
            sum_samples(&samples, name, labels).round() as u64
        };
        let mut requests = [0; Outcome::ALL.len()];
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            requests[i] = sum("wxgate_requests_total", &[("outcome", outcome.label())]);
        }
        let mut retries = [0; RetryReason::ALL.len()];
        for (i, reason) in RetryReason::ALL.iter().enumerate() {
            retries[i] = sum("wxgate_retries_total", &[("reason", reason.label())]);
        }
        let quota_waits = sum("wxgate_quota_wait_seconds_count", &[]);
        MetricsCounts {
            requests,
            upstream_answers: sum("wxgate_upstream_requests_total", &[]),
            transport_errors: sum("wxgate_upstream_transport_errors_total", &[]),
            connect_errors: sum(
                "wxgate_upstream_transport_errors_total",
                &[("reason", "connect")],
            ),
            upstream_45011: sum("wxgate_upstream_quota_exceeded_total", &[]),
            retries,
            quota_waits,
            quota_wait_seconds: sum_samples(&samples, "wxgate_quota_wait_seconds_sum", &[]),
            quota_wait_within: (quota_waits > 0)
                .then(|| {
                    bucket_holding_all(&samples, "wxgate_quota_wait_seconds_bucket", quota_waits)
                })
                .flatten(),
        }
    }

    /// `wxgate_requests_total{outcome}` over every API.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.requests[outcome_index(outcome)]
    }

    /// `wxgate_retries_total{reason}` over every API.
    pub fn retries(&self, reason: RetryReason) -> u64 {
        RetryReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.retries[i])
    }

    /// Every client request wxgate answered.
    pub fn client_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Every retry.
    pub fn all_retries(&self) -> u64 {
        self.retries.iter().sum()
    }

    /// Calls that reached WeChat, by wxgate's count: answered, or sent and not answered.
    pub fn upstream_calls(&self) -> u64 {
        self.upstream_answers + self.transport_errors
            - self.connect_errors.min(self.transport_errors)
    }
}

/// One series of Prometheus text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the text exposition format (what wxgate's `/metrics` writes); lines it cannot read
/// are skipped.
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(line.get(open + 1..close)?)?,
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(char::is_whitespace)?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// `a="x",b="y\"z"` → pairs, with `\\`, `\"` and `\n` unescaped.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(labels)
}

fn sum_samples(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// The smallest finite `le` whose cumulative count (over every API) is the whole count.
fn bucket_holding_all(samples: &[Sample], name: &str, count: u64) -> Option<f64> {
    let mut bounds: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == "le"))
        .filter_map(|(_, le)| parse_value(le))
        .filter(|le| le.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds.into_iter().find(|&le| {
        let cumulative: f64 = samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| k == "le" && parse_value(v) == Some(le))
            })
            .map(|s| s.value)
            .sum();
        cumulative.round() as u64 >= count
    })
}

// ---------------------------------------------------------------------------------------------
// The progress line

struct Progress {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Progress {
    /// Stops the ticker after drawing the last state.
    async fn finish(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

fn spawn_progress(
    load: Arc<Load>,
    client: reqwest::Client,
    admin: SocketAddr,
    upstream: Arc<StandIn>,
) -> Progress {
    let (stop, mut stopped) = watch::channel(false);
    let tty = std::io::stdout().is_terminal();
    let task = tokio::spawn(async move {
        let period = if tty { PROGRESS_TTY } else { PROGRESS_LOG };
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = ticks.tick() => false,
                _ = stopped.wait_for(|s| *s) => true,
            };
            let metrics = scrape(&client, admin)
                .await
                .map(|text| MetricsCounts::from_text(&text))
                .unwrap_or_default();
            let line = progress_line(&load, &metrics, upstream.total_calls());
            if tty {
                print!("\r{line}\x1b[K");
                if last {
                    println!();
                }
                let _ = std::io::stdout().flush();
            } else {
                println!("{line}");
            }
            if last {
                return;
            }
        }
    });
    Progress { stop, task }
}

fn progress_line(load: &Load, metrics: &MetricsCounts, upstream_calls: u64) -> String {
    let elapsed = load.started.elapsed();
    let tally = load.tally.counts();
    let finishing = if Instant::now() > load.deadline {
        "  (answering held requests)"
    } else {
        ""
    };
    format!(
        "  {:5.1} s  requests {}  upstream calls {}  hits {}  coalesced {}  quota waits {}  45011 absorbed {}{finishing}",
        elapsed.as_secs_f64(),
        tally.requests,
        upstream_calls,
        tally.cache_hit,
        tally.coalesced,
        metrics.quota_waits,
        metrics.retries(RetryReason::MinuteQuota),
    )
}

// ---------------------------------------------------------------------------------------------
// The report

/// What the demo counted, from the clients, from wxgate's `/metrics` and from the stand-in.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// `--seconds`.
    pub requested: Duration,
    /// From the first request to the last answer (held requests answered after the load).
    pub load_time: Duration,
    /// The load was stopped early by a signal.
    pub interrupted: bool,
    /// The quota window.
    pub window: Duration,
    /// The stand-in's quota per window and (appid, API).
    pub upstream_quota: u32,
    /// wxgate's per_window for `/sns/jscode2session`.
    pub exchange_per_window: u32,
    /// wxgate's `max_wait_ms`.
    pub max_wait: Duration,
    /// wxgate's proxy address.
    pub proxy: SocketAddr,
    /// wxgate's admin address.
    pub admin: SocketAddr,
    /// What the clients counted.
    pub client: ClientCounts,
    /// wxgate's `/metrics` after the load.
    pub metrics: MetricsCounts,
    /// That `/metrics` text, as scraped.
    pub metrics_text: String,
    /// Calls the stand-in received.
    pub upstream_calls: u64,
}

impl DemoReport {
    /// Requests answered without an upstream call of their own: cache hits and followers.
    pub fn saved(&self) -> u64 {
        self.metrics.outcome(Outcome::CacheHit) + self.metrics.outcome(Outcome::Coalesced)
    }

    /// Requests wxgate answered itself: local 45011s and refusals.
    pub fn answered_locally(&self) -> u64 {
        self.metrics.outcome(Outcome::LocalLimit) + self.metrics.outcome(Outcome::Rejected)
    }

    /// Requests whose call reached WeChat: forwarded answers and upstream failures.
    pub fn reached_upstream(&self) -> u64 {
        self.metrics.outcome(Outcome::Forwarded) + self.metrics.outcome(Outcome::UpstreamError)
    }

    /// Retries that reached WeChat.
    pub fn retries_sent(&self) -> u64 {
        self.metrics.all_retries()
    }

    /// WeChat's 45011 answers that no client saw: held, and sent again in a later window.
    pub fn absorbed_45011(&self) -> u64 {
        self.metrics.retries(RetryReason::MinuteQuota)
    }

    /// The left side of the identity: upstream calls − retries + saved + answered locally.
    pub fn accounted(&self) -> i128 {
        i128::from(self.upstream_calls) - i128::from(self.retries_sent())
            + i128::from(self.saved())
            + i128::from(self.answered_locally())
    }

    /// Whether upstream calls − retries + saved + answered by wxgate = client requests.
    pub fn adds_up(&self) -> bool {
        self.accounted() == i128::from(self.client.requests)
    }

    /// Where the clients' counts, the stand-in's and wxgate's `/metrics` differ; empty when
    /// they agree.
    pub fn disagreements(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.client.requests != self.metrics.client_requests() {
            problems.push(format!(
                "client requests: clients counted {}, /metrics {}",
                self.client.requests,
                self.metrics.client_requests()
            ));
        }
        for outcome in Outcome::ALL {
            let (seen, counted) = (self.client.outcome(outcome), self.metrics.outcome(outcome));
            if seen != counted {
                problems.push(format!(
                    "outcome {}: clients saw {seen}, /metrics {counted}",
                    outcome.label()
                ));
            }
        }
        if self.upstream_calls != self.metrics.upstream_calls() {
            problems.push(format!(
                "upstream calls: the stand-in received {}, /metrics {}",
                self.upstream_calls,
                self.metrics.upstream_calls()
            ));
        }
        if self.client.no_answer > 0 {
            problems.push(format!(
                "{} requests got no answer from wxgate",
                self.client.no_answer
            ));
        }
        problems
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.metrics;
        let c = &self.client;
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        let ended = if self.interrupted {
            format!("stopped early after {}", secs(self.load_time))
        } else if self.load_time > self.requested + Duration::from_millis(100) {
            format!(
                "{} of load (the last held requests answered at {})",
                secs(self.requested),
                secs(self.load_time)
            )
        } else {
            format!("{} of load", secs(self.load_time))
        };
        writeln!(f, "wxgate demo: {ended}")?;
        writeln!(
            f,
            "WeChat's quota (the stand-in): {} calls per {} window; wxgate allows {} on {JSCODE2SESSION_PATH}",
            self.upstream_quota,
            secs(self.window),
            self.exchange_per_window,
        )?;
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: u64, note: &str| {
            writeln!(f, "  {name:<32}{value:>7}  {note}")
        };
        row(
            f,
            "client requests",
            c.requests,
            &format!("/metrics: {}", m.client_requests()),
        )?;
        row(
            f,
            "  reached WeChat",
            self.reached_upstream(),
            "one upstream call each, plus any retries",
        )?;
        row(
            f,
            "  saved by coalescing",
            m.outcome(Outcome::Coalesced),
            "joined an identical exchange in flight (double submits)",
        )?;
        row(
            f,
            "  saved by the cache",
            m.outcome(Outcome::CacheHit),
            "a repeated code got its remembered answer (SDK retries)",
        )?;
        row(
            f,
            "  answered by wxgate itself",
            self.answered_locally(),
            &format!(
                "{} local 45011 (no quota turn within {}), {} refused (bad parameters)",
                m.outcome(Outcome::LocalLimit),
                secs(self.max_wait),
                m.outcome(Outcome::Rejected)
            ),
        )?;
        row(
            f,
            "upstream calls",
            self.upstream_calls,
            &format!(
                "received by the stand-in; /metrics: {} answered + {} without answer",
                m.upstream_answers,
                m.transport_errors - m.connect_errors.min(m.transport_errors)
            ),
        )?;
        row(
            f,
            "  retries",
            self.retries_sent(),
            &format!(
                "{} after WeChat's 45011, {} after -1 system busy, {} after a failed connect",
                self.absorbed_45011(),
                m.retries(RetryReason::SystemBusy),
                m.retries(RetryReason::Transport)
            ),
        )?;
        let within = m
            .quota_wait_within
            .map_or(String::new(), |le| format!(", each within {le} s"));
        let mean_ms = if m.quota_waits > 0 {
            m.quota_wait_seconds * 1000.0 / m.quota_waits as f64
        } else {
            0.0
        };
        row(
            f,
            "waited for a quota turn",
            m.quota_waits,
            &format!(
                "calls, {:.1} s in all, {mean_ms:.0} ms on average{within}",
                m.quota_wait_seconds
            ),
        )?;
        row(
            f,
            "WeChat 45011 absorbed",
            self.absorbed_45011(),
            &format!(
                "held to WeChat's next window and sent again ({} received, {} passed on)",
                m.upstream_45011, c.wechat_45011
            ),
        )?;
        let mut kinds = Vec::new();
        for (count, what) in [
            (c.local_limit, "local 45011"),
            (c.wechat_45011, "WeChat 45011"),
            (c.invalid_code, "invalid code (40029)"),
            (c.wrong_secret, "wrong secret (40125)"),
            (c.code_used, "code used (40163)"),
            (c.busy, "system busy (-1)"),
            (c.upstream_error, "no answer from WeChat (502)"),
            (c.rejected, "refused by wxgate"),
            (c.other_errors, "other"),
            (c.no_answer, "no answer from wxgate"),
        ] {
            if count > 0 {
                kinds.push(format!("{count} {what}"));
            }
        }
        row(
            f,
            "errors surfaced to clients",
            c.errors(),
            &kinds.join(", "),
        )?;
        row(
            f,
            "codes burnt by a repeat (40163)",
            c.code_used,
            "every repeat of a code got the first answer instead",
        )?;
        writeln!(f)?;

        // The identity, each number under its name.
        let terms: [(&str, &str, i128); 6] = [
            ("", "upstream calls", i128::from(self.upstream_calls)),
            (" − ", "retries", i128::from(self.retries_sent())),
            (
                " + ",
                "coalesced",
                i128::from(m.outcome(Outcome::Coalesced)),
            ),
            (
                " + ",
                "cache hits",
                i128::from(m.outcome(Outcome::CacheHit)),
            ),
            (
                " + ",
                "answered by wxgate",
                i128::from(self.answered_locally()),
            ),
            (" = ", "client requests", i128::from(c.requests)),
        ];
        let (mut names, mut numbers) = (String::from("  "), String::from("  "));
        for (op, name, value) in terms {
            names.push_str(&format!("{op}{name}"));
            numbers.push_str(&format!("{op}{value:>width$}", width = name.len()));
        }
        writeln!(f, "{names}")?;
        if self.adds_up() {
            writeln!(f, "{numbers}   ✓ the numbers add up")?;
        } else {
            writeln!(
                f,
                "{numbers}   ✗ the numbers do NOT add up: the left side makes {}",
                self.accounted()
            )?;
        }
        let disagreements = self.disagreements();
        if disagreements.is_empty() {
            writeln!(
                f,
                "  ✓ the clients' counts, the stand-in's and wxgate's /metrics agree on every outcome"
            )?;
        } else {
            writeln!(f, "  ✗ the counts disagree:")?;
            for problem in disagreements {
                writeln!(f, "    - {problem}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_with_labels_escapes_and_buckets() {
        let text = r#"
# HELP wxgate_requests_total Client requests.
# TYPE wxgate_requests_total counter
wxgate_requests_total{api="/sns/jscode2session",outcome="cache_hit"} 3
wxgate_requests_total{api="/cgi-bin/token",outcome="cache_hit"} 2
wxgate_requests_total{api="other",outcome="forwarded"} 7
odd_metric{note="a \"quoted\", comma\\"} 1.5 1700000000
wxgate_quota_wait_seconds_bucket{api="a",le="0.5"} 1
wxgate_quota_wait_seconds_bucket{api="b",le="0.5"} 0
wxgate_quota_wait_seconds_bucket{api="a",le="1"} 2
wxgate_quota_wait_seconds_bucket{api="b",le="1"} 2
wxgate_quota_wait_seconds_bucket{api="a",le="+Inf"} 2
wxgate_quota_wait_seconds_bucket{api="b",le="+Inf"} 2
wxgate_quota_wait_seconds_count{api="a"} 2
wxgate_quota_wait_seconds_count{api="b"} 2
wxgate_quota_wait_seconds_sum{api="a"} 1.25
unlabelled 4
"#;
        let samples = parse_samples(text);
        assert_eq!(
            sum_samples(
                &samples,
                "wxgate_requests_total",
                &[("outcome", "cache_hit")]
            ),
            5.0
        );
        assert_eq!(sum_samples(&samples, "wxgate_requests_total", &[]), 12.0);
        assert_eq!(sum_samples(&samples, "unlabelled", &[]), 4.0);
        let odd = samples.iter().find(|s| s.name == "odd_metric").unwrap();
        assert_eq!(
            odd.labels,
            vec![("note".into(), "a \"quoted\", comma\\".into())]
        );
        assert_eq!(odd.value, 1.5);
        assert_eq!(
            bucket_holding_all(&samples, "wxgate_quota_wait_seconds_bucket", 4),
            Some(1.0)
        );
        let counts = MetricsCounts::from_text(text);
        assert_eq!(counts.outcome(Outcome::CacheHit), 5);
        assert_eq!(counts.outcome(Outcome::Forwarded), 7);
        assert_eq!(counts.quota_waits, 4);
        assert_eq!(counts.quota_wait_within, Some(1.0));
    }

    #[test]
    fn answers_are_classified_as_wxgate_counts_them() {
        let ok = StatusCode::OK;
        let session = br#"{"session_key":"k","openid":"o"}"#;
        let seen = |status, cache, body: &[u8]| match Seen::classify(status, cache, body) {
            Seen::Answer { outcome, .. } => Some(outcome),
            Seen::NoAnswer => None,
        };
        assert_eq!(seen(ok, Some("miss"), session), Some(Outcome::Forwarded));
        assert_eq!(seen(ok, None, session), Some(Outcome::Forwarded));
        assert_eq!(seen(ok, Some("hit"), session), Some(Outcome::CacheHit));
        assert_eq!(
            seen(ok, Some("coalesced"), session),
            Some(Outcome::Coalesced)
        );
        let local_quota = crate::wechat::error_body(45011, crate::wechat::LOCAL_QUOTA_ERRMSG);
        assert_eq!(
            seen(ok, Some("coalesced"), &local_quota),
            Some(Outcome::LocalLimit)
        );
        let failed = crate::wechat::error_body(-1, "system error (wxgate: upstream timed out)");
        assert_eq!(
            seen(StatusCode::GATEWAY_TIMEOUT, Some("miss"), &failed),
            Some(Outcome::UpstreamError)
        );
        let refused = crate::wechat::error_body(41008, "missing code (wxgate)");
        assert_eq!(seen(ok, None, &refused), Some(Outcome::Rejected));
        let wechat_quota = br#"{"errcode":45011,"errmsg":"api minute-quota reach limit rid: x"}"#;
        let answer = Seen::classify(ok, Some("miss"), wechat_quota);
        assert_eq!(answer.error(), Some(ClientError::WechatQuota));
        assert_eq!(
            Seen::classify(
                ok,
                Some("hit"),
                br#"{"errcode":"40029","errmsg":"invalid code"}"#
            )
            .error(),
            Some(ClientError::InvalidCode)
        );
        assert_eq!(Seen::classify(ok, Some("miss"), session).error(), None);
        assert_eq!(Seen::NoAnswer.error(), Some(ClientError::NoAnswer));
    }

    fn report(upstream_calls: u64, client: ClientCounts, metrics: MetricsCounts) -> DemoReport {
        DemoReport {
            requested: Duration::from_secs(1),
            load_time: Duration::from_secs(1),
            interrupted: false,
            window: Duration::from_secs(5),
            upstream_quota: 40,
            exchange_per_window: 50,
            max_wait: MAX_WAIT,
            proxy: SocketAddr::from(([127, 0, 0, 1], 1)),
            admin: SocketAddr::from(([127, 0, 0, 1], 2)),
            client,
            metrics,
            metrics_text: String::new(),
            upstream_calls,
        }
    }

    /// Three requests reach WeChat: one is answered at once; one gets 45011, is held and
    /// sent again; one gets 45011, is held, and its hold runs out (no retry sent: WeChat's
    /// 45011 is passed on). One more is a cache hit.
    #[test]
    fn a_hold_that_ran_out_sends_no_retry_and_the_numbers_add_up() {
        let mut requests = [0; Outcome::ALL.len()];
        requests[outcome_index(Outcome::Forwarded)] = 3;
        requests[outcome_index(Outcome::CacheHit)] = 1;
        let mut retries = [0; RetryReason::ALL.len()];
        retries[0] = 1; // minute_quota: the one sent
        let metrics = MetricsCounts {
            requests,
            upstream_answers: 4,
            upstream_45011: 2,
            retries,
            ..MetricsCounts::default()
        };
        let client = ClientCounts {
            requests: 4,
            forwarded: 3,
            cache_hit: 1,
            wechat_45011: 1,
            wechat_45011_forwarded: 1,
            ..ClientCounts::default()
        };
        // Calls: 1 + (1 + 1) + 1 = 4 at the stand-in.
        let report = report(4, client, metrics);
        assert_eq!(report.retries_sent(), 1);
        assert_eq!(report.absorbed_45011(), 1);
        assert!(report.adds_up(), "{report}");
        assert!(report.disagreements().is_empty(), "{report}");
        let table = report.to_string();
        assert!(table.contains("the numbers add up"), "{table}");

        // The same, with one call the stand-in never counted: the check says so.
        let short = self::report(3, client, metrics);
        assert!(!short.adds_up());
        assert!(short.to_string().contains("do NOT add up"), "{short}");
        assert!(!short.disagreements().is_empty());
    }
}
