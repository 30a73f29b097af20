//! An in-process stand-in for `api.weixin.qq.com`.
//!
//! wxgate's integration tests, its benchmarks and the `wxgate demo` command need an upstream
//! that behaves like WeChat where wxgate cares (single-use login codes, per-minute and daily
//! quotas, errors answered as HTTP 200 with `{"errcode","errmsg"}`) and that can be made to
//! fail on demand. This crate owns that upstream: [`StandIn`] serves HTTP/1.1 and HTTP/2
//! (over TLS with a certificate the caller gives, [`StandInConfig::tls`]) on a loopback
//! listener, answers the endpoints listed below the way WeChat documents them, echoes every
//! other request back so pass-through can be checked, and counts what it received.
//!
//! | path | answers |
//! |---|---|
//! | `/sns/jscode2session` | `{"session_key","openid"[,"unionid"]}` or an error |
//! | `/sns/component/jscode2session` | the same, for a third-party platform (on the account's behalf) |
//! | `/cgi-bin/token` | `{"access_token","expires_in"}` (a new token each time) or an error |
//! | `/cgi-bin/stable_token` (POST, JSON) | the same, with WeChat's stable-token semantics |
//! | `/cgi-bin/component/api_component_token` (POST, JSON) | `{"component_access_token","expires_in"}` |
//! | `/cgi-bin/component/api_authorizer_token?component_access_token=` (POST, JSON) | `{"authorizer_access_token","expires_in","authorizer_refresh_token"}`: a platform's token for an account that authorized it |
//! | `/cgi-bin/get_api_domain_ip?access_token=` | `{"ip_list":[…]}`, or 40001 / 42001 for a replaced, unknown or expired token |
//! | `/cgi-bin/openapi/quota/get?access_token=` (POST, `{"cgi_path"}`) | `{"errcode":0,"errmsg":"ok","quota":{"daily_limit","used","remain"},"rate_limit":{"call_count","refresh_second"},"component_rate_limit":{…}}`; 76022 for every `/sns/` path, 76021 for a path it does not know, 76003 for one without its leading `/`, 47001 for a bad body |
//! | `/cgi-bin/clear_quota?access_token=` (POST, `{"appid"}`) | `{"errcode":0,"errmsg":"ok"}`: the account's daily counts start over; 48006 past 10 a month |
//! | `/cgi-bin/clear_quota/v2` (POST, `{"appid","appsecret"}`) | the same, with the secret (40013 / 40125 for bad credentials) |
//! | `/cgi-bin/component/clear_quota?component_access_token=` (POST, `{"component_appid"}`) | the same, for the platform's own APIs |
//! | `/__stand_in/stats` ([`STATS_PATH`]) | the stand-in's own counters and limits as JSON (below); not a WeChat call, not counted |
//! | a path named by [`StandInConfig::api_limits`] | checks its `access_token` (or `component_access_token`), counts the call under the token's appid, then echoes it (see [`StandIn`]) |
//! | anything else | an echo of the request (see [`StandIn`]) |
//!
//! Tokens live [`StandInConfig::token_lifetime`] (WeChat: 7200 s) and the previous one works
//! [`StandInConfig::token_overlap`] (WeChat: 300 s) after a fetch mints the next (see
//! `tokens.rs`); [`StandIn::token_fetches`] counts successful fetches per appid.
//!
//! # Limits
//! WeChat limits each (appid, API) per minute (45011) and per day (45009), and each user's
//! code exchanges per minute (45011 as well). The stand-in does too, each figure configured
//! at start and changeable while it runs (`limits.rs` says exactly what is counted when):
//!
//! - **Rate limits**, `call_count` per aligned window ([`RateLimit`]):
//!   [`StandInConfig::quota_per_window`] over [`StandInConfig::window`] is the default of the
//!   code exchanges and token fetches ([`StandIn::set_quota`]); [`ApiLimits::rate_limit`]
//!   sets any API's, for every appid or one, with its own window
//!   ([`StandIn::set_rate_limit`]).
//! - **Calls on an account's behalf** count against [`ApiLimits::component_rate_limit`]
//!   (inheriting the rate limit), apart from the account's own calls: calls with an
//!   `authorizer_access_token`, and the platform's code exchange
//!   ([`StandIn::set_component_rate_limit`]).
//! - **Daily limits** ([`ApiLimits::daily_limit`], [`StandIn::set_daily_limit`]) over days of
//!   [`StandInConfig::day`] ending at midnight UTC+8; past one, 45009 until the next day or
//!   a `clear_quota` ([`StandInConfig::clear_quota_per_month`] a month, 48006 past them).
//!   [`StandIn::daily_used`] is quota/get's `used`; [`StandIn::quota_queries`] counts the
//!   quota/get calls about each (API, appid).
//! - **The per-user limit** of the code exchanges ([`StandInConfig::user_rate_limit`],
//!   WeChat's 100 a minute by default): a code shaped `u<user>_<anything>` (see
//!   [`StandIn::issue_code`]) belongs to `user`, and its openid is the user's in that app
//!   ([`StandIn::openid_of`]); any other code is its own user's only code.
//! - A call refused by a limit is not executed (no code spent, no token minted) and not
//!   counted. The log records every arrival, and [`StandIn::max_calls_in_any_span`] reads it
//!   the way a test of "never more than N calls within one window, wherever the window
//!   starts" needs.
//!
//! Failures are injected with [`StandIn::push_faults`]: each call takes the next queued
//! [`Fault`], whatever its path. A call that finds none queued draws one from
//! [`StandInConfig::random_faults`] (a [`FaultMix`], empty by default), so that a long run
//! meets faults throughout.
//!
//! Every call is *executed when it arrives* (quota counted, code spent) and answered after the
//! configured latency plus any [`Fault::Delay`]. So a client that gives up while waiting has
//! still spent its code, as it would against WeChat.
//!
//! # Example
//! ```no_run
//! use wxgate_stand_in::{Fault, StandIn, StandInConfig};
//!
//! # async fn example() -> std::io::Result<()> {
//! let upstream = StandIn::start(StandInConfig::default()).await?;
//! upstream.push_faults([Fault::Busy]);
//! // ... point the proxy at upstream.base_url() and drive it ...
//! assert_eq!(upstream.answers(-1), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # The stats page
//! `GET /__stand_in/stats` answers what the stand-in received, so that a script can check a
//! quota from outside (wxgate's `deploy/cluster-demo.sh` does):
//!
//! ```text
//! {"now_unix_ms":1764470402113,"window_ms":2000,"quota_per_window":40,
//!  "api_limits":[{"path":"/wxa/business/getuserphonenumber","appid":null,
//!                 "rate_limit":{"call_count":20,"refresh_second":3},
//!                 "component_rate_limit":null,"daily_limit":1000}],
//!  "user_rate_limit":{"call_count":100,"refresh_second":60},
//!  "day_ms":86400000,"day_offset_ms":28800000,
//!  "daily_used":[{"appid":"wx00000000000000a1","path":"/sns/jscode2session","used":80,
//!                 "daily_limit":null}],
//!  "total_calls":80,"answers":{"-1":2,"0":78},"faults":{"busy":2},"record_calls":true,
//!  "windows":[{"start_unix_ms":1764470400000,"appid":"wx00000000000000a1",
//!              "path":"/sns/jscode2session","calls":40,"answered_45011":0}, ...]}
//! ```
//!
//! `windows` has one entry per aligned window and (appid, path) that received calls (the
//! window holding `now_unix_ms` is still filling), from the call log: empty when
//! [`StandInConfig::record_calls`] is off. `quota_per_window` is `null` when unlimited;
//! `api_limits` lists the configured figures (`null`: inherited); `daily_used` the calls
//! executed today per (appid, API) where a limit applies; `answers` counts answers by
//! errcode, 0 for success bodies; `faults` counts the faults injected (queued or drawn) by
//! [`Fault::name`]. [`StandIn::calls_per_window`] gives the same windows in process.
//!
//! # The binary
//! `wxgate-stand-in` serves the stand-in as a process of its own, for scripts that run wxgate
//! as a binary (`cargo run --release -p wxgate-stand-in -- --help`):
//!
//! ```text
//! wxgate-stand-in [--listen 127.0.0.1:0] [--quota-per-window N] [--window-secs S]
//!                 [--rate-limit KEY=N/S]... [--component-rate-limit KEY=N/S]...
//!                 [--daily-limit KEY=N]... [--user-rate-limit N/S|off] [--day-secs S]
//!                 [--latency-ms MS] [--faults MIX] [--no-call-log]
//! ```
//!
//! `KEY` is an API path, or `PATH@APPID` for one appid; `N/S` is a [`RateLimit`] (`20/3`: 20
//! calls per 3 s). `--faults` takes a [`FaultMix`], e.g.
//! `busy=0.02,reset=0.005,delay:1500=0.003`.
//!
//! It prints `listening on ADDR` once bound and serves until it is killed.
//!
//! # The relay
//! [`DelayRelay`] is not WeChat: it puts a peer at a distance. Each direction of each
//! connection holds every chunk for a [`Delay`] drawn for it (`base ± jitter`), keeping the
//! stream's order, and the delays can be changed while it runs. wxgate's tests make a slow
//! Redis with it; `deploy/datacentre.sh` puts Redis a millisecond and WeChat tens of
//! milliseconds away from the replicas, and `benches/load/compare.sh` measures a Redis at a
//! distance through it. `wxgate-relay` runs it as a process:
//!
//! ```text
//! wxgate-relay --listen ADDR --to ADDR [--delay-ms MS] [--jitter-ms MS]
//!              [--reverse-delay-ms MS] [--reverse-jitter-ms MS]
//! ```
//!
//! The delays are what the client's bytes get on their way to `--to`; the reverse ones
//! (default: the same) what the answers get. It prints `relaying ADDR -> ADDR` once bound.
//!
//! It does not depend on wxgate: it reads queries with `form_urlencoded` and JSON bodies with
//! `serde_json` on its own (see `request.rs`), so a parsing bug in wxgate cannot hide behind
//! the same bug in its test double.
//!
//! # Layout
//! - `stand_in.rs`: [`StandIn`], the running server and its handle: start, inject, count;
//!   the accept loop and the per-request flow (arrival, fault, execution, latency, answer).
//! - `config.rs`: [`StandInConfig`], [`StandInApp`], [`StandInComponent`]: who may call;
//!   [`RateLimit`], [`ApiLimits`]: the limits it starts with.
//! - `upstream.rs`: the state every connection shares and what WeChat does with a call:
//!   parameter checks, limits, single-use codes, tokens.
//! - `limits.rs`: the limits in force and the counts behind them: windows, days, users,
//!   monthly clears.
//! - `calendar.rs`: the calendar month of a day.
//! - `openapi.rs`: quota/get and the `clear_quota` calls.
//! - `request.rs`: which behaviour a path gets, and the parameters read from a call.
//! - `answer.rs`: what the stand-in answers: WeChat JSON, the echo, a 502, a closed connection.
//! - `tls.rs`: HTTPS with the certificate of [`StandInTls`].
//! - `fault.rs`: [`Fault`], the queue of faults waiting for the next calls, and [`FaultMix`].
//! - `record.rs`: [`CallRecord`], the counters behind [`StandIn::calls`] and the like, and
//!   [`WindowCalls`] with the stats page's body.
//! - `tokens.rs`: access tokens: lifetimes, the overlap, stable and component tokens.
//! - `relay.rs`: [`DelayRelay`], a TCP relay that delays each direction by a [`Delay`]
//!   (base ± jitter per chunk, order kept): a Redis or a WeChat at a distance.
//! - `bin/wxgate-stand-in.rs`: the binary (command line, then [`StandIn::start_on`]).
//! - `bin/wxgate-relay.rs`: [`DelayRelay`] as a process of its own.
//! - `ids.rs`: session keys, openids, tokens and request ids shaped like WeChat's; the codes
//!   that name their user.
#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

mod answer;
mod calendar;
mod config;
mod fault;
mod ids;
mod limits;
mod openapi;
mod record;
mod relay;
mod request;
mod stand_in;
mod tls;
mod tokens;
mod upstream;

#[cfg(test)]
mod tests;

pub use config::{ApiLimits, RateLimit, StandInApp, StandInComponent, StandInConfig, StandInTls};
pub use fault::{Fault, FaultMix};
pub use limits::UNLIMITED_FIGURE;
pub use record::{CallRecord, WindowCalls};
pub use relay::{Delay, DelayRelay};
pub use stand_in::StandIn;

/// The mini program registered by [`StandInConfig::default`].
pub const DEFAULT_APPID: &str = "wx00000000000000a1";
/// The app secret of [`DEFAULT_APPID`].
pub const DEFAULT_APP_SECRET: &str = "stand-in-secret-a1";
/// The third-party platform registered by [`StandInConfig::default`]; [`DEFAULT_APPID`] is
/// authorized to it.
pub const DEFAULT_COMPONENT_APPID: &str = "wx00000000000000c1";
/// The `component_appsecret` of [`DEFAULT_COMPONENT_APPID`].
pub const DEFAULT_COMPONENT_APPSECRET: &str = "stand-in-component-secret-c1";
/// A `component_access_token` of [`DEFAULT_COMPONENT_APPID`] that never expires.
pub const DEFAULT_COMPONENT_ACCESS_TOKEN: &str = "stand-in-component-token-c1";

/// Path of the mini program's own code exchange (`auth.code2Session`).
pub const JSCODE2SESSION_PATH: &str = "/sns/jscode2session";
/// Path of the third-party platform's code exchange.
pub const COMPONENT_JSCODE2SESSION_PATH: &str = "/sns/component/jscode2session";
/// Path of the access-token fetch.
pub const TOKEN_PATH: &str = "/cgi-bin/token";
/// Path of the stable access-token fetch (POST, JSON body).
pub const STABLE_TOKEN_PATH: &str = "/cgi-bin/stable_token";
/// Path of a third-party platform's token fetch (POST, JSON body).
pub const COMPONENT_TOKEN_PATH: &str = "/cgi-bin/component/api_component_token";
/// Path of a third-party platform's token for one account (POST, JSON body
/// `{component_appid, authorizer_appid, authorizer_refresh_token}`, query
/// `component_access_token`): answers `{"authorizer_access_token","expires_in",
/// "authorizer_refresh_token"}`. Calls made with that token are made on the account's behalf
/// (its APIs' `component_rate_limit`).
pub const AUTHORIZER_TOKEN_PATH: &str = "/cgi-bin/component/api_authorizer_token";
/// Path of quota/get (POST, JSON body `{cgi_path}`, query `access_token`): an API's limits
/// and today's use.
pub const QUOTA_GET_PATH: &str = "/cgi-bin/openapi/quota/get";
/// Path of `clear_quota` (POST, JSON body `{appid}`, query `access_token`).
pub const CLEAR_QUOTA_PATH: &str = "/cgi-bin/clear_quota";
/// Path of `clear_quota/v2` (POST, JSON body `{appid, appsecret}`).
pub const CLEAR_QUOTA_V2_PATH: &str = "/cgi-bin/clear_quota/v2";
/// Path of a platform's `clear_quota` (POST, JSON body `{component_appid}`, query
/// `component_access_token`).
pub const COMPONENT_CLEAR_QUOTA_PATH: &str = "/cgi-bin/component/clear_quota";
/// The API call whose `access_token` the stand-in checks (WeChat's "get API server IPs",
/// which takes nothing else): 40001 for an unknown or replaced token, 42001 for an expired
/// one. Every other API path is echoed, token or not, unless
/// [`StandInConfig::api_limits`] names it.
pub const CHECKED_API_PATH: &str = "/cgi-bin/get_api_domain_ip";

/// The stand-in's own page: its counters and the calls it received per aligned quota window,
/// as JSON (see the crate documentation). Not a WeChat path; requests to it are not counted.
pub const STATS_PATH: &str = "/__stand_in/stats";

/// Content-Type of every JSON answer, byte for byte what WeChat sends.
pub const JSON_CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// Locks a mutex even if a panicking thread poisoned it: the data (a log, a queue) stays
/// usable, and a test double must not turn one failure into many.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A duration in nanoseconds, for an atomic; saturated at about 584 years.
pub(crate) fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
