//! wxgate: a reverse proxy in front of `api.weixin.qq.com`.
//!
//! A backend that logs WeChat mini-program users in changes one setting, its WeChat base URL,
//! and gets from wxgate what WeChat does not give it: minute quotas that are never exceeded,
//! single-use login codes that are safe to send twice, and Prometheus metrics.
//!
//! # Layout
//! - [`config`]: `config.toml` → validated, typed [`Config`]; every problem reported at once.
//! - [`server`]: [`server::run`] owns the proxy and admin listeners and the graceful drain.
//! - [`proxy`]: the request pipeline: route → read body → validate → code exchange or quota →
//!   upstream → respond, with one log line and the metrics of each request.
//! - [`code_exchange`]: coalescing of identical `js_code` exchanges and the answers remembered.
//! - [`quota`]: per-(appid, API) token buckets with a first-come-first-served wait queue.
//! - [`dispatch`]: one logical upstream call: wait for quota, send, hold across 45011, retry -1.
//! - [`upstream`]: the pooled HTTP client towards WeChat and the headers it must not forward.
//! - [`api`]: the WeChat APIs wxgate knows by path; the bounded `api` metric label.
//! - [`wechat`]: WeChat's answer format: reading `errcode`, writing wxgate's own answers.
//! - [`metrics`]: the Prometheus metrics, registered against a registry passed in.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on their own listener.
//! - [`demo`]: `wxgate demo`, the stand-in plus wxgate under a realistic load.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod code_exchange;
pub mod config;
#[cfg(feature = "demo")]
mod demo;
pub mod dispatch;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod upstream;
pub mod wechat;

pub use config::Config;
pub use server::{run, Listeners};

#[cfg(feature = "demo")]
pub use demo::{launcher, run_demo, DemoError, DemoOptions, DemoReport};
