//! wxgate: a reverse proxy in front of `api.weixin.qq.com`.
//!
//! A backend that logs WeChat mini-program users in changes one setting, its WeChat base URL,
//! and gets from wxgate what WeChat does not give it: minute quotas that are never exceeded,
//! single-use login codes that are safe to send twice, a central access-token server, and
//! Prometheus metrics. With `[cluster]`, replicas share all of it through Redis.
//!
//! # Layout
//! The modules are layers: each uses only the ones below it (`.ci/module_cycles.py` fails
//! CI on an import cycle). They are private; the crate root re-exports what the binary, the
//! tests, the benches and the examples use. From the top down:
//!
//! - `cli/`: the commands ([`Cli`], read by clap in `main.rs`): serve, check-config,
//!   reload (`POST /-/reload` with hyper's client), and demo (feature `demo`, on by
//!   default: the launcher through which the `wxgate-demo` crate starts this wxgate).
//! - `server/`: [`run`] owns the proxy and admin [`Listeners`]: the accept loops and each
//!   connection's task (`serving`), the deadlines and the cap of connections
//!   (`connections`), `server.allow` and the reloadable deadlines (`policy`), HTTPS on the
//!   proxy port (`tls`), the open-files limit (`open_files`), `/metrics`, `/healthz`,
//!   `/readyz` and `POST /-/reload` (`admin`), the configuration read again on `SIGHUP`
//!   (`reload`), housekeeping, the cluster's heartbeat and the drain on shutdown.
//! - `proxy/`: the request pipeline ([`Proxy`]) in named phases over a small per-request
//!   context: target → body → token fetch, code exchange or forward → respond → log;
//!   `target` the target phase and the headers that go upstream, `reply` what goes back.
//! - The features, each with its state, local and shared (`shared.rs` with `[cluster]`):
//!   - `code_cache/`: code exchanges coalesced and their answers remembered (`request`,
//!     `key`, `leader`, `slots`, `shared`);
//!   - `token_cache/`: wxgate as the central access-token server (`policy` decides, `fetch`
//!     fetches, `shared` meets the other replicas);
//!   - `quota/`: per-(appid, API) minute quotas ([`QuotaGate`]): turns, lanes, the 45011
//!     pause, each key's limit and its source (`key`, `paths`, `limits`, `buckets`,
//!     `figures`, `shared`);
//!   - `discovery/`: the limits WeChat states, asked with quota/get for the keys with
//!     traffic, and the access tokens whose appid wxgate knows (`tokens`, `answer`). It
//!     sends its queries through `dispatch`, so it sits above it.
//! - `dispatch/`: one logical upstream call under quota and retry policy: acquire a turn →
//!   send → record → decide; `retry`: the decision after each attempt, a pure function.
//! - `flight`: the single-flight both caches use.
//! - `cluster/`: the Redis layer: the connection in each Redis form (one endpoint,
//!   Sentinel, Redis Cluster) and the replica's mode, heartbeat and epochs, the key layout
//!   (tags), sealing and MACs, pub/sub notices, why Redis cannot be used (`cause`), and every
//!   Lua script with its reply type (`scripts`). Everything it reads back is checked or
//!   bounded (the threat model in `docs/replicas.md`). It knows no feature.
//! - `answer/`: the vocabulary of answers (`Answer` and its kinds).
//! - `upstream/`: the pooled HTTP client towards WeChat.
//! - `metrics/`: the registry components register their own metrics with, and how a family
//!   is built; `config/`: `config.toml` → raw serde structs → one validation pass → typed
//!   [`Config`]. Neither knows a feature.
//! - `wechat/`: WeChat's API and formats: the APIs by path ([`Api`]), errcodes, query
//!   parameters, plausible appids and codes. The ground floor.
//!
//! The workspace's other crates are not product: `contract/` (`wxgate-contract`, the names
//! wxgate promises the outside world: its cache header and its values, metric label values,
//! own errcodes), `stand-in/` (`wxgate-stand-in`, the stand-in for `api.weixin.qq.com` that
//! the tests, the benches and the demo run against, with its own request parsing) and
//! `demo/` (`wxgate-demo`, the demo's load and report, which treats wxgate as a black box).
//! Without the `demo` feature (`--no-default-features`) neither the stand-in nor the demo is
//! linked, nor is reqwest.
//!
//! # Glossary
//! - **key**: what state is kept under. A quota's is one API of one appid (`QuotaKey`), a
//!   code exchange's a keyed hash of API, appid, credential and code (`CodeKey`), a token's
//!   its API and appid (`TokenKey`). In Redis each is a keyed *fingerprint* instead, after
//!   a *tag*.
//! - **tag**: the Redis Cluster hash tag in a key's name, which alone chooses the key's slot:
//!   everything of one appid has the appid's tag, so every script's keys share one slot
//!   (`cluster::Tag`, `Cluster::key`).
//! - **window**: the span a quota counts in, WeChat's minute by default (`quota.window_secs`),
//!   or the window WeChat states for a key; aligned to the epoch as WeChat's calendar minutes
//!   are (`QuotaConfig::window`).
//! - **arrival margin**: how much later one call may reach WeChat than another
//!   (`quota.arrival_margin_ms`); calls the bound separates by a window leave a window plus
//!   the margin apart, so that the bound holds where WeChat counts.
//! - **source**: where the limit in force for a key comes from, in this order: `config`,
//!   `wechat`, `learned`, `default` (`LimitSource`).
//! - **figure**: a limit of one key from outside the configuration, with its own window:
//!   stated by WeChat (quota/get, asked by `discovery`) or learned from its 45011
//!   (`quota::Figure`).
//! - **turn**: leave for one attempt of a call to go upstream under its key's quota;
//!   [`QuotaGate::acquire`] waits for one. With `[cluster]` a turn is counted in Redis
//!   (`TurnReply`), and a code exchange's first turn may ride on its claim (`Turn`,
//!   `FirstTurn`).
//! - **lane**: the first-come-first-served queue of the calls of one key waiting for a turn;
//!   only its head sleeps until the next turn, and a 45011 pauses it (`quota::Lane`).
//! - **claim**: with `[cluster]`, a replica's mark in Redis that it is calling WeChat for a
//!   code exchange, so that no other replica spends the code (`ClaimCode`, `ClaimReply`).
//! - **lease**: a hold in Redis that ends by itself unless renewed, so that a replica that
//!   dies releases what it held: a claim's, and the one replica's that fetches a token
//!   (`TakeLease`).
//! - **flight**: one call in flight and the callers waiting for its result
//!   (`flight::Flight`): the code cache's first caller leads it (`CodeFlight`), the token
//!   cache runs it in a task (`TokenFlight`).
//! - **remembered answer**: an entry of the code cache: a definitive answer to a code
//!   exchange, replayed byte for byte to the same exchange sent again, in memory and with
//!   `[cluster]` in Redis (`RememberedAnswer`).
//! - **degraded**: a replica whose Redis failed or lost its data: it limits on its own with
//!   its share of each quota until the replicas resume sharing at a window boundary
//!   (`ReplicaMode::Degraded`).
//!
//! # What is kept on purpose
//! - The metrics contract: each component's struct of handles against a registry passed in
//!   (several proxies in one test process do not collide), bounded label values from enums,
//!   every series created at start.
//! - Configuration errors: every problem of a file at once, with its key path and never its
//!   value, exit 64 before anything is bound.
//! - The quota bound, stated with its maths in `quota` (the arrival margin included) and
//!   proved on a fake clock; the same algorithm counts in Redis for replicas.
//! - The cancellation rules of a code exchange (`code_cache`, `leader`): a leader whose
//!   caller leaves still finishes; a call abandoned by everyone before it is sent spends
//!   nothing.
//! - Benches against named baselines; logs that never carry a path, a query or a secret.
#![forbid(unsafe_code)]

mod answer;
mod cli;
mod cluster;
mod code_cache;
mod config;
mod discovery;
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

pub use cli::{usage_error, Cli};
pub use config::{CheckedConfig, Config, EXIT_INVALID_CONFIG};
pub use metrics::Metrics;
pub use proxy::{Proxy, CACHE_HEADER};
pub use quota::{QuotaGate, QuotaKey};
pub use server::{run, run_reloadable, Listeners};
pub use wechat::Api;

#[cfg(feature = "demo")]
pub use cli::demo::{launcher, run_demo, DemoError, DemoOptions, DemoReport};
