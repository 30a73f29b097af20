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
//! and then with an invalid code; backends calling APIs with access tokens they fetch through
//! wxgate (tokens that live seconds, so that wxgate refreshes them during the run); and a
//! script of one-off events: one wrong app secret, one request with an empty code, a burst well above the quota,
//! `-1 system busy` answers and connection resets injected into the stand-in.
//!
//! The table at the end is built from three independent counts: what the clients saw (by the
//! `X-Wxgate-Cache` header and the answer), wxgate's own `/metrics`, and the calls the stand-in
//! received. Its check line is the identity
//!
//! ```text
//! upstream calls − retries − token refreshes + saved (coalesced + cache hits)
//!     + answered by wxgate itself = client requests
//! ```
//!
//! which holds because every request that reached WeChat made one call plus its retries,
//! every other request made none (`wxgate_retries_total` counts retries when they are sent),
//! and each refresh ahead of expiry is one call that no request made
//! (`wxgate_token_requests_total{outcome="refreshed"}` counts the hits that started one).
//! Resets are only injected while no double
//! submit is in flight, so a failed call never has followers (a follower of a failed call
//! would be a request that neither reached WeChat nor was saved).
//!
//! wxgate is a black box here: the demo starts it through the [`Launch`] its caller passes
//! (wxgate's binary passes one that calls its own `run`; this crate does not depend on wxgate,
//! which would be a cycle), then only speaks HTTP to it, reads the `X-Wxgate-Cache` header and
//! parses the `/metrics` text, with the names of `wxgate-contract`, the crate that spells
//! wxgate's outside names once for wxgate and for the demo.
//!
//! # Layout
//! - `run.rs`: [`run()`], from binding the ports to the table; [`DemoError`].
//! - `launch.rs`: [`Launch`], [`ProxyStart`], [`LaunchError`]: how wxgate is started, and
//!   waited for until ready.
//! - `plan.rs`: [`DemoOptions`], and the quotas and wxgate configuration derived from them.
//! - `load.rs`: the virtual users and the script of one-off events.
//! - `tokens.rs`: the backends calling APIs with access tokens; [`TokenCounts`].
//! - `client.rs`: each answer classified as the client saw it; [`ClientCounts`].
//! - `metrics.rs`: a Prometheus text reader; [`MetricsCounts`].
//! - `report.rs`: [`DemoReport`]: the checks and the table.
//! - `progress.rs`: the progress line.
#![forbid(unsafe_code)]

mod client;
mod launch;
mod load;
mod metrics;
mod plan;
mod progress;
mod report;
mod run;
mod tokens;

pub use client::ClientCounts;
pub use launch::{Launch, LaunchError, ProxyStart, Serve, Shutdown};
pub use metrics::MetricsCounts;
pub use plan::DemoOptions;
pub use report::{DemoReport, LimitShown};
pub use run::{run, DemoError};
pub use tokens::TokenCounts;
pub use wxgate_contract::{Outcome, RetryReason, TokenOutcome};
