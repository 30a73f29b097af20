//! wxgate: a reverse proxy in front of `api.weixin.qq.com`.
//!
//! A backend that logs WeChat mini-program users in changes one setting, its WeChat base URL,
//! and gets from wxgate what WeChat does not give it: minute quotas that are never exceeded,
//! single-use login codes that are safe to send twice, and Prometheus metrics.
//!
//! # Layout
//! The modules are private; the crate root re-exports what the binary, the tests, the benches
//! and the examples use. A request's path through them, in the order a reader meets it:
//! - `server`: [`run`] owns the proxy and admin [`Listeners`], a task per connection,
//!   housekeeping, the cluster's heartbeat, reloads and the drain on shutdown;
//!   `server/connections` the deadlines of connections without a request, the cap on open
//!   connections and the cut-off of requests past the shutdown grace; `server/open_files` the
//!   open-files limit the cap must fit; `server/policy` what a reload changes in a listener
//!   (`server.allow`, checked at accept, and the deadlines); `server/tls` HTTPS on the proxy
//!   port (`[server.tls]`) with a certificate a reload replaces; `server/serving` one
//!   listener's accept loop, a connection's task and its watchdog, and the drain.
//! - `reload`: the configuration read again on `SIGHUP` or `POST /-/reload`.
//! - `proxy`: the request pipeline ([`Proxy`]) in named phases over a small per-request
//!   context: target → body → token fetch, code exchange or forward → respond → log;
//!   `proxy/target` the target phase and the headers that go upstream, `proxy/reply` what
//!   goes back to the client.
//! - `api`: the WeChat APIs wxgate knows ([`Api`]), how a path is classified as one (variants
//!   normalised, look-alikes refused), where each names the appid whose quota it spends.
//! - `code_exchange/`: identical `js_code` exchanges coalesced and their answers remembered:
//!   `request` (checked parameters), `key` (the keyed hash), `flight` (the call in flight, its
//!   leader and waiters), `store` (slots, compact answers, expiry), `shared` (with
//!   `[cluster]`: the exchange claimed and remembered in Redis).
//! - `token_cache/`: wxgate as the central access-token server: token fetches answered from
//!   one cached token per appid, refreshed ahead of expiry, dropped when WeChat refuses it;
//!   decisions in `policy`, fetches in `fetch`, shared with replicas in `cluster/tokens`.
//! - `dispatch`: one logical upstream call: acquire a quota turn → send → record → decide.
//! - `retry`: the decision after each attempt, a pure function (`RetryPolicy`).
//! - `quota`: per-(appid, API) token buckets ([`QuotaGate`]) behind a first-come-first-served
//!   wait queue, and the 45011 pause; `quota/key` the (appid, API) key, `quota/limits` the
//!   limiters of one configuration and how a reload carries their buckets over.
//! - `cluster/`: with `[cluster]`, the state replicas share through Redis: the connection and
//!   the replica's mode (shared / degraded / resuming), `quota` (the shared GCRA), `codes`
//!   (claims, waits, remembered answers), `tokens` (shared access tokens), `sealing` (keyed
//!   fingerprints, sealed values), `notices` (pub/sub), `scripts` (the Lua scripts).
//! - `upstream`: the pooled HTTP client towards WeChat and the headers it must not forward.
//! - `local_answer`: every answer wxgate gives itself (status, errcode, errmsg) in one enum.
//! - `wechat/`: WeChat's formats: errcodes read from bodies (`errcode`), query parameters read
//!   as bytes (`query`), plausible appids and codes.
//! - `config/`: `config.toml` → raw serde structs → one validation pass → typed [`Config`].
//! - `metrics`: the Prometheus [`Metrics`], registered against a registry passed in;
//!   `metrics/cluster` the `[cluster]` metrics, `metrics/tokens` the token cache's.
//! - `admin`: `/metrics`, `/healthz`, `/readyz` on their own listener.
//! - `demo` (feature `demo`, on by default): the launcher through which the `wxgate-demo`
//!   crate starts this wxgate for `wxgate demo`.
//!
//! The workspace's other crates are not product: `contract/` (`wxgate-contract`, the names
//! wxgate promises the outside world: its cache header, metric label values, own errcodes),
//! `stand-in/` (`wxgate-stand-in`, the stand-in for `api.weixin.qq.com` that the tests, the
//! benches and the demo run against, with its own request parsing) and `demo/`
//! (`wxgate-demo`, the demo's load and report, which treats wxgate as a black box). Without
//! the `demo` feature (`--no-default-features`) neither the stand-in nor the demo is linked,
//! nor is reqwest.
//!
//! # What is kept on purpose
//! - The metrics contract: one struct of handles against a registry passed in (several
//!   proxies in one test process do not collide), bounded label values from enums,
//!   every series created at start.
//! - Configuration errors: every problem of a file at once, with its key path and never its
//!   value, exit 64 before anything is bound.
//! - The quota bound, stated with its maths in `quota` and proved on a fake clock; the same
//!   algorithm counts in Redis for replicas.
//! - The cancellation rules of a code exchange (`code_exchange`, `flight`): a leader whose
//!   caller leaves still finishes; a call abandoned by everyone before it is sent spends
//!   nothing.
//! - Benches against named baselines; logs that never carry a path, a query or a secret.
#![forbid(unsafe_code)]

mod answer;
mod cluster;
mod code_cache;
mod config;
#[cfg(feature = "demo")]
mod demo;
mod dispatch;
mod flight;
mod metrics;
mod proxy;
mod quota;
mod retry;
mod server;
mod token_cache;
mod upstream;
mod wechat;

pub use config::{CheckedConfig, Config, EXIT_INVALID_CONFIG};
pub use metrics::Metrics;
pub use proxy::{Proxy, CACHE_HEADER};
pub use quota::{QuotaGate, QuotaKey};
pub use server::{run, run_reloadable, Listeners};
pub use wechat::Api;

#[cfg(feature = "demo")]
pub use demo::{launcher, run_demo, DemoError, DemoOptions, DemoReport};
