//! Token fetches as the appids multiply: whether a fetch, and a call refused for its token,
//! cost the same with a thousand appids behind them as with two hundred thousand.
//!
//! wxgate (started with [`wxgate::run`] as the tests start it) in front of the in-process
//! WeChat stand-in, which knows [`APPS`] mini programs. Three loads, each measured at every
//! step of [`STEPS`] while the appids it has seen grow:
//!
//! - `minted`: `/cgi-bin/token` for appids the stand-in knows, each one new: every fetch
//!   goes upstream and mints a token, which the cache keeps (and the day's budget counts);
//! - `unknown`: `/cgi-bin/token` for appids the stand-in does not know (40013), each one
//!   new: every fetch goes upstream and mints nothing;
//! - `refused`: calls carrying a token the stand-in never minted (40001), with every
//!   `minted` token still cached: each asks the cache to drop a token it does not hold.
//!
//! Each step prints requests per second over [`MEASURED`] requests, [`CONCURRENCY`] at a
//! time, after the appids grew to the step. The number to read is the ratio of the last step
//! to the first: 1 when the cost does not grow with the appids.
//!
//! Not criterion: each measured request adds an appid, so criterion's repetitions would move
//! the very number measured. Run: `cargo bench --bench token_fetches` (`STEPS=1000,10000`
//! for a shorter run).

use std::cell::Cell;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use tokio::sync::oneshot;
use wxgate::{Config, Listeners};
use wxgate_stand_in::{StandIn, StandInApp, StandInConfig, CHECKED_API_PATH, TOKEN_PATH};

/// Requests in flight at once.
const CONCURRENCY: usize = 32;

/// Requests measured at each step.
const MEASURED: usize = 5_000;

/// Appids seen before each measurement, by default.
const STEPS: [usize; 4] = [1_000, 10_000, 100_000, 200_000];

/// Mini programs the stand-in knows: enough for every step and its measured fetches.
const APPS: usize = 210_000;

fn main() {
    let steps: Vec<usize> = std::env::var("STEPS").map_or_else(
        |_| STEPS.to_vec(),
        |steps| {
            steps
                .split(',')
                .map(|s| s.trim().parse().unwrap())
                .collect()
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let bench = Bench::start().await;
        println!("requests/s, {CONCURRENCY} at a time, {MEASURED} per step");
        println!(
            "{:>9} {:>10} {:>10} {:>10}",
            "appids", "minted", "unknown", "refused"
        );
        let mut first: Option<[f64; 3]> = None;
        let mut last = [0.0; 3];
        for step in steps {
            bench.grow(step).await;
            let rates = [
                bench.measure(Load::Minted, step).await,
                bench.measure(Load::Unknown, step).await,
                bench.measure(Load::Refused, step).await,
            ];
            println!(
                "{step:>9} {:>10.0} {:>10.0} {:>10.0}",
                rates[0], rates[1], rates[2]
            );
            first.get_or_insert(rates);
            last = rates;
        }
        if let Some(first) = first {
            println!(
                "{:>9} {:>10.2} {:>10.2} {:>10.2}",
                "last/1st",
                last[0] / first[0],
                last[1] / first[1],
                last[2] / first[2]
            );
        }
        bench.stop();
    });
}

/// What a measured request is.
#[derive(Clone, Copy)]
enum Load {
    Minted,
    Unknown,
    Refused,
}

struct Bench {
    _upstream: StandIn,
    proxy: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    client: reqwest::Client,
    /// How many known and unknown appids have been fetched for so far.
    seen: Cell<(usize, usize)>,
}

impl Bench {
    async fn start() -> Bench {
        let apps = (0..APPS)
            .map(|i| StandInApp {
                appid: known_appid(i),
                secret: format!("secret-{i}"),
                unionid: false,
            })
            .collect();
        let upstream = StandIn::start(StandInConfig {
            apps,
            record_calls: false,
            ..StandInConfig::default()
        })
        .await
        .expect("stand-in starts");
        let config = Config::from_toml_str(&format!(
            "[upstream]\nbase_url = \"{}\"\n[quota]\nper_window = 100000000\n",
            upstream.base_url()
        ))
        .unwrap_or_else(|errors| panic!("{errors}"));
        let listeners = Listeners::bind_local().await.expect("bind loopback");
        let proxy = listeners.proxy_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            wxgate::run(listeners, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("wxgate runs");
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(CONCURRENCY * 2)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Bench {
            _upstream: upstream,
            proxy,
            stop,
            client,
            seen: Cell::new((0, 0)),
        }
    }

    /// Fetches tokens for known and unknown appids until `count` of each have been seen
    /// (the measured requests of earlier steps included), not measured.
    async fn grow(&self, count: usize) {
        let (known, unknown) = self.seen.get();
        self.run(Load::Minted, known..count.max(known)).await;
        self.run(Load::Unknown, unknown..count.max(unknown)).await;
    }

    /// Requests per second of `MEASURED` requests of `load` after the appids grew to `step`.
    async fn measure(&self, load: Load, step: usize) -> f64 {
        let (known, unknown) = self.seen.get();
        let from = match load {
            Load::Minted => known.max(step),
            Load::Unknown => unknown.max(step),
            Load::Refused => 0,
        };
        let started = Instant::now();
        self.run(load, from..from + MEASURED).await;
        MEASURED as f64 / started.elapsed().as_secs_f64()
    }

    /// Sends requests `range` of `load`, `CONCURRENCY` at a time, each checked.
    async fn run(&self, load: Load, range: std::ops::Range<usize>) {
        let end = range.end;
        stream::iter(range)
            .for_each_concurrent(CONCURRENCY, |i| self.send(load, i))
            .await;
        let (known, unknown) = self.seen.get();
        self.seen.set(match load {
            Load::Minted => (known.max(end), unknown),
            Load::Unknown => (known, unknown.max(end)),
            Load::Refused => (known, unknown),
        });
    }

    async fn send(&self, load: Load, i: usize) {
        let proxy = self.proxy;
        let (url, errcode) = match load {
            Load::Minted => (
                format!(
                    "http://{proxy}{TOKEN_PATH}?grant_type=client_credential&appid={}&secret=secret-{i}",
                    known_appid(i)
                ),
                None,
            ),
            Load::Unknown => (
                format!(
                    "http://{proxy}{TOKEN_PATH}?grant_type=client_credential&appid=wx{i:015x}u&secret=s"
                ),
                Some(40013),
            ),
            Load::Refused => (
                format!("http://{proxy}{CHECKED_API_PATH}?access_token=never-minted-{i}"),
                Some(40001),
            ),
        };
        let body: serde_json::Value = self
            .client
            .get(url)
            .send()
            .await
            .expect("an answer")
            .json()
            .await
            .expect("JSON");
        match errcode {
            None => assert!(body.get("access_token").is_some(), "{body}"),
            Some(errcode) => assert_eq!(body["errcode"], errcode, "{body}"),
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// The `i`th appid the stand-in knows (`k` at the end: never its default app's).
fn known_appid(i: usize) -> String {
    format!("wx{i:015x}k")
}
