//! [`run`]: the demo from start to end. Binds the ports, starts the stand-in and wxgate,
//! drives the load with a progress line, reads the three counts, prints the table, and with
//! `--keep-running` serves until the shutdown signal.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use wxgate_stand_in::{
    ApiLimits, RateLimit, StandIn, StandInConfig, CHECKED_API_PATH, DEFAULT_APPID,
    DEFAULT_APP_SECRET, JSCODE2SESSION_PATH, TOKEN_PATH,
};

use crate::launch::{wait_until_ready, Launch, LaunchError, Serving};
use crate::load::{random_code, script, virtual_user, Load};
use crate::metrics::MetricsCounts;
use crate::plan::{
    DemoOptions, Plan, MAX_WAIT, TOKEN_LIFETIME, TOKEN_OVERLAP, UPSTREAM_LATENCY, USERS,
};
use crate::progress::spawn_progress;
use crate::report::{DemoReport, LimitShown};
use crate::tokens::{token_backend, TOKEN_BACKENDS};

/// Runs the demo: starts the stand-in and wxgate (through `launch`, see [`Launch`]), drives the load for `options.duration`
/// (less if `shutdown` completes first) with a progress line, prints the table, and returns
/// what it counted. With `keep_running`, it then prints curl examples and serves until
/// `shutdown` completes. Prints on stdout.
pub async fn run(
    options: DemoOptions,
    launch: Launch,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    let plan = Plan::new(options.window_secs);
    if options.listen == options.admin_listen && options.listen.port() != 0 {
        return Err(DemoError::SamePort(options.listen));
    }
    let (proxy_listener, proxy_addr) = bind("--listen", options.listen).await?;
    let (admin_listener, admin_addr) = bind("--admin-listen", options.admin_listen).await?;

    let window = Duration::from_secs(plan.window_secs);
    let upstream = StandIn::start(StandInConfig {
        quota_per_window: Some(plan.upstream_quota),
        window,
        // The API the token backends call: a limit quota/get states.
        api_limits: vec![ApiLimits::new(CHECKED_API_PATH)
            .with_rate_limit(RateLimit::new(plan.api_quota, window))],
        latency: UPSTREAM_LATENCY,
        token_lifetime: TOKEN_LIFETIME,
        token_overlap: TOKEN_OVERLAP,
        ..StandInConfig::default()
    })
    .await
    .map(Arc::new)
    .map_err(DemoError::StandIn)?;
    let config_toml = plan.config_text(proxy_addr, admin_addr, &upstream.base_url());
    let mut wxgate = Serving::start(launch, config_toml, proxy_listener, admin_listener);

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
         invalid codes, one wrong secret, injected -1 and resets; {TOKEN_BACKENDS} backends \
         calling APIs with access tokens that live {} s",
        options.duration.as_secs_f64(),
        plan.burst_size,
        TOKEN_LIFETIME.as_secs()
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
    for backend in 0..TOKEN_BACKENDS {
        tasks.spawn(token_backend(load.clone(), backend));
    }
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
    let limits = limits_in_force(&client, admin_addr).await;
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
        tokens: load.tokens.counts(),
        token_fetches_upstream: upstream.token_fetches(TOKEN_PATH, DEFAULT_APPID),
        metrics: MetricsCounts::from_text(&metrics_text),
        upstream_calls: upstream.total_calls(),
        metrics_text,
        limits,
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
    /// wxgate refused the demo's configuration, could not run, or stopped with an error.
    #[error(transparent)]
    Wxgate(#[from] LaunchError),
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

/// Waits for every task of `tasks`; a task that panicked is logged, not propagated.
pub(crate) async fn drain(mut tasks: JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result {
            tracing::warn!(%error, "a demo task failed");
        }
    }
}

/// wxgate's `/metrics` text.
pub(crate) async fn scrape(
    client: &reqwest::Client,
    admin: SocketAddr,
) -> Result<String, reqwest::Error> {
    client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

/// The limits in force, from wxgate's `GET /quota` (none if it cannot be read).
async fn limits_in_force(client: &reqwest::Client, admin: SocketAddr) -> Vec<LimitShown> {
    let table: Option<serde_json::Value> = async {
        let answer = client
            .get(format!("http://{admin}/quota"))
            .send()
            .await
            .ok()?;
        serde_json::from_slice(&answer.bytes().await.ok()?).ok()
    }
    .await;
    let Some(keys) = table.as_ref().and_then(|table| table["keys"].as_array()) else {
        return Vec::new();
    };
    keys.iter()
        .filter(|row| row["on_behalf"] == false)
        .filter_map(|row| {
            Some(LimitShown {
                api: row["api"].as_str()?.to_owned(),
                limit: u32::try_from(row["limit"].as_u64()?).ok()?,
                window_secs: row["window_secs"].as_f64()?,
                source: row["source"].as_str()?.to_owned(),
            })
        })
        .collect()
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
    println!("  # every key's limit and where it comes from (or: wxgate quota --config FILE)");
    println!("  curl -s http://{admin}/quota");
}
