//! The progress line while the load runs: requests, upstream calls, hits, followers, quota
//! waits, absorbed 45011s and token fetches (reaching WeChat / sent by the backends), redrawn on a terminal and printed every few seconds otherwise.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wxgate_stand_in::{StandIn, DEFAULT_APPID, TOKEN_PATH};

use crate::load::Load;
use crate::metrics::MetricsCounts;
use crate::run::scrape;
use wxgate_contract::RetryReason;

/// How often the progress line is redrawn on a terminal, and printed otherwise.
const PROGRESS_TTY: Duration = Duration::from_millis(250);
const PROGRESS_LOG: Duration = Duration::from_secs(5);

/// The progress line's ticker, stopped by [`Progress::finish`].
pub(crate) struct Progress {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Progress {
    /// Stops the ticker after drawing the last state.
    pub(crate) async fn finish(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Starts redrawing (on a terminal) or printing (otherwise) one line of counts.
pub(crate) fn spawn_progress(
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
            let line = progress_line(&load, &metrics, &upstream);
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

fn progress_line(load: &Load, metrics: &MetricsCounts, upstream: &StandIn) -> String {
    let elapsed = load.started.elapsed();
    let tally = load.tally.counts();
    let finishing = if Instant::now() > load.deadline {
        "  (answering held requests)"
    } else {
        ""
    };
    format!(
        "  {:5.1} s  requests {}  upstream calls {}  hits {}  coalesced {}  quota waits {}  45011 absorbed {}  token fetches {}/{}{finishing}",
        elapsed.as_secs_f64(),
        tally.requests,
        upstream.total_calls(),
        tally.cache_hit,
        tally.coalesced,
        metrics.quota_waits,
        metrics.retries(RetryReason::MinuteQuota),
        upstream.token_fetches(TOKEN_PATH, DEFAULT_APPID),
        load.tokens.counts().fetches,
    )
}
