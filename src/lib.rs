//! wxgate: a reverse proxy in front of `api.weixin.qq.com`.
//!
//! A backend that logs WeChat mini-program users in changes one setting, its WeChat base URL,
//! and gets from wxgate what WeChat does not give it: minute quotas that are never exceeded,
//! single-use login codes that are safe to send twice, and Prometheus metrics.
//!
//! # Layout
//! The modules are private; the crate root re-exports what the binary, the tests, the benches
//! and the examples use.
//! - `config`: `config.toml` → validated, typed [`Config`]; every problem reported at once.
//! - `server`: [`run`] owns the proxy and admin [`Listeners`] and the graceful drain.
//! - `proxy`: the request pipeline ([`Proxy`]): route → read body → validate → code exchange or
//!   quota → upstream → respond, with one log line and the metrics of each request.
//! - `code_exchange`: coalescing of identical `js_code` exchanges and the answers remembered.
//! - `quota`: per-(appid, API) token buckets ([`QuotaGate`]) with a first-come-first-served
//!   wait queue.
//! - `token_cache`: wxgate as the central access-token server: token fetches answered from
//!   one cached token per appid, refreshed ahead of expiry, dropped when WeChat refuses it.
//! - `dispatch`: one logical upstream call: wait for quota, send, hold across 45011, retry -1.
//! - `upstream`: the pooled HTTP client towards WeChat and the headers it must not forward.
//! - `api`: the WeChat APIs wxgate knows by path ([`Api`]); the bounded `api` metric label.
//! - `wechat`: WeChat's answer format: reading `errcode`, writing wxgate's own answers.
//! - `metrics`: the Prometheus [`Metrics`], registered against a registry passed in.
//! - `admin`: `/metrics`, `/healthz`, `/readyz` on their own listener.
//! - `demo` (feature `demo`, on by default): the launcher through which the `wxgate-demo`
//!   crate starts this wxgate for `wxgate demo`.
//!
//! The workspace's other crates are not product: `stand-in/` (`wxgate-stand-in`, the
//! in-process stand-in for `api.weixin.qq.com` that the tests, the benches and the demo run
//! against, with its own request parsing) and `demo/` (`wxgate-demo`, the demo's load and
//! report, which treats wxgate as a black box). Without the `demo` feature
//! (`--no-default-features`) neither is linked, nor is reqwest.
#![forbid(unsafe_code)]

mod admin;
mod api;
mod cluster;
mod code_exchange;
mod config;
#[cfg(feature = "demo")]
mod demo;
mod dispatch;
mod local_answer;
mod metrics;
mod proxy;
mod quota;
mod retry;
mod server;
mod token_cache;
mod upstream;
mod wechat;

pub use api::Api;
pub use config::{CheckedConfig, Config, EXIT_INVALID_CONFIG};
pub use metrics::Metrics;
pub use proxy::{Proxy, CACHE_HEADER};
pub use quota::{QuotaGate, QuotaKey};
pub use server::{run, Listeners};

#[cfg(feature = "demo")]
pub use demo::{launcher, run_demo, DemoError, DemoOptions, DemoReport};
