//! What the demo is asked to do ([`DemoOptions`]) and what it derives from that: the
//! stand-in's quota, and wxgate's configuration, sized so that every limit bites within a
//! short run.

use std::net::SocketAddr;
use std::time::Duration;

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

/// Calls a second the stand-in admits for each (appid, API): its quota is this times the
/// window. Small enough that six users go over it.
pub(crate) const UPSTREAM_CALLS_PER_SECOND: u32 = 8;

/// Virtual users logging in concurrently. Each offers about two fresh codes a second, so
/// together they ask for more than the quota and calls wait for their turn.
pub(crate) const USERS: usize = 6;

/// How long a request may wait for its quota turn before wxgate answers 45011 itself. Short
/// (the default is 3 s), so that about half of the burst gets a local 45011.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(2500);

/// How long the stand-in's access tokens live (WeChat: 7200 s), so that wxgate refreshes
/// them a few times in a run: every lifetime less its two-second refresh window.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(8);

/// How long the previous token still works after a new one is minted (WeChat: 300 s); longer
/// than wxgate's refresh window, as WeChat's five minutes are.
pub(crate) const TOKEN_OVERLAP: Duration = Duration::from_secs(4);

/// WeChat's stand-in answers after this long, about what a nearby WeChat takes. It also keeps
/// an exchange in flight long enough for a double submit to join it.
pub(crate) const UPSTREAM_LATENCY: Duration = Duration::from_millis(40);

/// The quotas and sizes derived from the window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) window_secs: u64,
    /// Executed calls per window and (appid, API) at the stand-in.
    pub(crate) upstream_quota: u32,
    /// wxgate's per_window (every API): a quarter above the stand-in's, so that WeChat
    /// answers 45011 once the load fills a window, and wxgate learns the real figure for the
    /// code exchange (WeChat states none for it).
    pub(crate) exchange_per_window: u32,
    /// The stand-in's limit of the API the token backends call, which quota/get reports: wxgate
    /// discovers it and uses it instead of its own per_window.
    pub(crate) api_quota: u32,
    /// wxgate's burst, for every API.
    pub(crate) burst: u32,
    /// How long a call may be held across 45011s: its first wait, three windows, and another
    /// wait in the queue of the window it is held to, so that a held call always gets there.
    pub(crate) max_hold: Duration,
    /// Requests of the burst, all at once: one and a half quotas, and at least twice what
    /// wxgate lets through within `MAX_WAIT`, so that some get a local 45011 however short
    /// the window.
    pub(crate) burst_size: usize,
}

impl Plan {
    pub(crate) fn new(window_secs: u64) -> Plan {
        let window_secs = window_secs.clamp(1, 3600);
        let upstream_quota =
            UPSTREAM_CALLS_PER_SECOND.saturating_mul(u32::try_from(window_secs).unwrap_or(3600));
        Plan {
            window_secs,
            upstream_quota,
            exchange_per_window: upstream_quota + upstream_quota / 4,
            api_quota: upstream_quota * 3,
            burst: (upstream_quota / 5).max(1),
            max_hold: Duration::from_secs(window_secs * 3) + MAX_WAIT * 2,
            burst_size: (upstream_quota as usize * 3 / 2).max(40),
        }
    }

    /// wxgate's `config.toml` for the demo: these quotas, the two addresses, the stand-in.
    pub(crate) fn config_text(
        &self,
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: &str,
    ) -> String {
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
# Every API: a little above what the stand-in admits. WeChat's 45011 happens on the code
# exchange, and wxgate learns its real figure from it; for the API the token backends call,
# wxgate asks WeChat (quota/get) and uses the figure it states.
per_window = {exchange_quota}
burst = {burst}
max_wait_ms = {max_wait}

[retry]
max_hold_ms = {max_hold}
busy_attempts = 2
"#,
            window = self.window_secs,
            burst = self.burst,
            max_wait = MAX_WAIT.as_millis(),
            exchange_quota = self.exchange_per_window,
            max_hold = self.max_hold.as_millis(),
        )
    }
}
