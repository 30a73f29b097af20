//! The request pipeline: route → read the body → validate → code exchange or quota →
//! upstream → respond, and for every request one log line and its metrics.
//!
//! Only the path and query of a request are used: an absolute-form URI or a `Host` header
//! names no destination, the configured upstream is the only one. The log line names the
//! API (a bounded label), never the path or query, so no credential reaches a log.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::time::Instant;

use crate::api::Api;
use crate::code_exchange::{
    CacheStatus, CodeExchange, CodeKey, Credential, ExchangeAnswer, Lookup,
};
use crate::config::Config;
use crate::dispatch::{Call, CallOutcome, Dispatcher};
use crate::metrics::{Metrics, Outcome};
use crate::quota::{QuotaGate, QuotaKey};
use crate::upstream::{
    strip_hop_by_hop, InvalidBaseUrl, UpstreamClient, UpstreamRequest, UpstreamResponse,
};
use crate::wechat::{
    self, error_response, is_plausible_appid, is_plausible_js_code, Errcode, WechatParams,
    LOCAL_QUOTA_ERRMSG, MINUTE_QUOTA,
};

/// Request header with which a client shortens its own quota wait (milliseconds); consumed
/// by wxgate, never forwarded.
pub const MAX_WAIT_HEADER: HeaderName = HeaderName::from_static("x-wxgate-max-wait-ms");

/// Response header of code exchanges: `miss`, `coalesced` or `hit`.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-wxgate-cache");

/// The proxy: everything a request needs, shared by all connections.
pub struct Proxy {
    dispatcher: Arc<Dispatcher>,
    codes: Arc<CodeExchange>,
    metrics: Metrics,
    max_body_bytes: usize,
    max_wait: Duration,
}

/// How a request was answered, for the response, the log line and the metrics.
#[derive(Debug)]
struct Answer {
    response: Response<Full<Bytes>>,
    outcome: Outcome,
    errcode: Option<Errcode>,
}

impl Answer {
    fn local(status: StatusCode, errcode: i64, errmsg: &str, outcome: Outcome) -> Answer {
        Answer {
            response: error_response(status, errcode, errmsg),
            outcome,
            errcode: None,
        }
    }

    fn rejected(status: StatusCode, errcode: i64, errmsg: &str) -> Answer {
        Answer::local(status, errcode, errmsg, Outcome::Rejected)
    }
}

impl Proxy {
    /// Builds the proxy and its upstream client from the configuration.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Proxy, InvalidBaseUrl> {
        let upstream = UpstreamClient::new(&config.upstream)?;
        let quota = QuotaGate::new(&config.quota);
        let dispatcher = Arc::new(Dispatcher::new(
            upstream,
            quota,
            config.retry.clone(),
            metrics.clone(),
        ));
        let codes = Arc::new(CodeExchange::new(&config.code_cache, metrics.clone()));
        Ok(Proxy {
            dispatcher,
            codes,
            metrics,
            max_body_bytes: config.server.max_body_bytes,
            max_wait: config.quota.max_wait,
        })
    }

    /// Periodic housekeeping: expire remembered answers, drop idle quota keys, update gauges.
    pub fn housekeeping(&self) {
        self.codes.expire();
        self.dispatcher.quota().retain_recent();
        self.dispatcher.upstream().close_idle();
        self.metrics
            .quota_keys
            .set(self.dispatcher.quota().len() as i64);
    }

    /// Answers one client request. Never fails: every problem becomes a response.
    pub async fn handle<B>(
        self: Arc<Self>,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        self.metrics.inflight.inc();
        let _inflight = InflightGuard(&self.metrics);
        let method = request.method().clone();
        let (api, answer) = self.answer(request).await;
        let elapsed = started.elapsed();
        self.metrics
            .request(api, answer.outcome, elapsed.as_secs_f64());
        let status = answer.response.status().as_u16();
        tracing::info!(
            target: "wxgate::access",
            method = %method,
            api = %api.label(),
            status,
            errcode = %answer.errcode.map_or("-", Errcode::label),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            outcome = %answer.outcome.label(),
        );
        Ok(answer.response)
    }

    async fn answer<B>(&self, request: Request<B>) -> (Api, Answer)
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let Some(path_and_query) = parts.uri.path_and_query().cloned() else {
            return (Api::Other, bad_target());
        };
        let path = path_and_query.path();
        if parts.method == Method::CONNECT || !path.starts_with('/') || has_dot_segment(path) {
            return (Api::Other, bad_target());
        }
        let api = Api::from_path(path);

        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes as u64) {
            return (api, self.too_large());
        }
        // A GET without a body (every code exchange) skips the collecting machinery.
        let body = if body.is_end_stream() {
            Bytes::new()
        } else {
            match Limited::new(body, self.max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                    return (api, self.too_large())
                }
                Err(_) => {
                    return (
                        api,
                        Answer::rejected(
                            StatusCode::BAD_REQUEST,
                            wechat::DATA_FORMAT_ERROR,
                            "data format error (wxgate: the request body could not be read)",
                        ),
                    )
                }
            }
        };
        let query = path_and_query.query().unwrap_or("");
        let exchange = if api.is_code_exchange() && parts.method == Method::GET {
            let exchange = match self.validate_exchange(api, query) {
                Ok(exchange) => exchange,
                Err(answer) => return (api, *answer),
            };
            // Replays and followers: nothing below (headers, the upstream request) is needed.
            match self.codes.lookup(exchange.key) {
                Lookup::Remembered(remembered) => {
                    let answer = ExchangeAnswer::Remembered(remembered);
                    return (api, exchange_answer(answer, CacheStatus::Hit));
                }
                Lookup::InFlight(waiter) => {
                    let answer = waiter.answer().await;
                    return (api, exchange_answer(answer, CacheStatus::Coalesced));
                }
                Lookup::Absent => Some(exchange),
            }
        } else {
            None
        };

        let max_wait = parts
            .headers
            .get(MAX_WAIT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(self.max_wait, |ms| {
                self.max_wait.min(Duration::from_millis(ms))
            });
        let mut headers = parts.headers;
        prepare_upstream_headers(&mut headers);
        let request = UpstreamRequest {
            method: parts.method,
            path_and_query: path_and_query.clone(),
            headers,
            body,
        };

        if let Some(exchange) = exchange {
            let call = Call {
                api,
                quota_key: Some(exchange.quota_key),
                request,
                max_wait,
            };
            let (answer, status) = self
                .codes
                .exchange(exchange.key, call, &self.dispatcher)
                .await;
            return (api, exchange_answer(answer, status));
        }

        let quota_key = (api != Api::Other)
            .then(|| wechat::first_param(query, "appid"))
            .flatten()
            .filter(|appid| is_plausible_appid(appid))
            .and_then(|appid| QuotaKey::new(api, &appid));
        let call = Call {
            api,
            quota_key,
            request,
            max_wait,
        };
        let outcome = self.dispatcher.call(&call, std::future::pending).await;
        (api, call_answer(outcome))
    }

    fn too_large(&self) -> Answer {
        Answer::rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            wechat::DATA_FORMAT_ERROR,
            &format!(
                "data format error (wxgate: request body larger than {} bytes)",
                self.max_body_bytes
            ),
        )
    }

    /// Checks a code exchange's parameters as WeChat would, so that a request that cannot
    /// succeed spends neither quota nor a call.
    fn validate_exchange(&self, api: Api, query: &str) -> Result<ValidExchange, Box<Answer>> {
        // A parameter given twice is refused: WeChat and wxgate could read different copies.
        // Others (wechatpy adds `access_token`) are not read here and are forwarded as they are.
        let params = WechatParams::parse(query);
        if let Some(name) = params.repeated {
            return Err(Box::new(Answer::rejected(
                StatusCode::OK,
                wechat::INVALID_ARGS,
                &format!("invalid args (wxgate: parameter {name} given twice)"),
            )));
        }
        let refuse = |errcode: i64, errmsg: &str| {
            Err(Box::new(Answer::rejected(StatusCode::OK, errcode, errmsg)))
        };
        let component = api == Api::ComponentJsCode2Session;
        if component && params.component_access_token.is_none() {
            return refuse(41021, "missing component_access_token (wxgate)");
        }
        let Some(appid) = params.appid.as_deref() else {
            return refuse(41002, "appid missing (wxgate)");
        };
        if !component && params.secret.is_none() {
            return refuse(41004, "appsecret missing (wxgate)");
        }
        if component && params.component_appid.is_none() {
            return refuse(41002, "component_appid missing (wxgate)");
        }
        let Some(js_code) = params.js_code.as_deref() else {
            return refuse(41008, "missing code (wxgate)");
        };
        if params.grant_type.as_deref() != Some("authorization_code") {
            return refuse(
                40002,
                "invalid grant_type (wxgate: must be authorization_code)",
            );
        }
        let quota_key = match QuotaKey::new(api, appid) {
            Some(key) if is_plausible_appid(appid) => key,
            _ => return refuse(40013, "invalid appid (wxgate: not an appid WeChat issues)"),
        };
        if !is_plausible_js_code(js_code) {
            return refuse(40029, "invalid code (wxgate: not a code WeChat issues)");
        }
        let credential = match (
            &params.secret,
            &params.component_appid,
            &params.component_access_token,
        ) {
            (_, Some(component_appid), Some(token)) if component => Credential::Component {
                appid: component_appid,
                access_token: token,
            },
            (Some(secret), _, _) => Credential::Secret(secret),
            _ => return refuse(41004, "appsecret missing (wxgate)"),
        };
        Ok(ValidExchange {
            key: self.codes.key(api, appid, credential, js_code),
            quota_key,
        })
    }
}

struct ValidExchange {
    key: CodeKey,
    quota_key: QuotaKey,
}

/// What goes upstream: the client's headers minus those describing the client's connection,
/// `Host` (the upstream's is set from the base URL), `Content-Length` (recomputed from the
/// body), `Accept-Encoding` (wxgate must read each answer's errcode, so it asks for the
/// identity encoding) and wxgate's own.
fn prepare_upstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(
        headers,
        &[
            header::HOST,
            header::CONTENT_LENGTH,
            header::ACCEPT_ENCODING,
            MAX_WAIT_HEADER,
        ],
    );
}

/// Whether a path has `.` or `..` segments, which an HTTP client would resolve and so send
/// somewhere other than the path the request named.
fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither '.' nor '%': one scan, no allocation.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|segment| {
        segment.len() <= 6
            && [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."]
                .iter()
                .any(|dots| segment.eq_ignore_ascii_case(dots))
    })
}

fn bad_target() -> Answer {
    Answer::rejected(
        StatusCode::BAD_REQUEST,
        wechat::INVALID_ARGS,
        "invalid args (wxgate: the request target must be a plain path; wxgate forwards only to its configured upstream)",
    )
}

fn upstream_response(response: UpstreamResponse) -> Response<Full<Bytes>> {
    let mut out = Response::new(Full::new(response.body));
    *out.status_mut() = response.status;
    *out.headers_mut() = response.headers;
    out
}

fn call_answer(outcome: CallOutcome) -> Answer {
    match outcome {
        CallOutcome::Answered(response, errcode) => Answer {
            response: upstream_response(response),
            outcome: Outcome::Forwarded,
            errcode: Some(errcode),
        },
        CallOutcome::LocalLimit { retry_after } => {
            let mut answer = Answer::local(
                StatusCode::OK,
                MINUTE_QUOTA,
                LOCAL_QUOTA_ERRMSG,
                Outcome::LocalLimit,
            );
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            answer
                .response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            answer
        }
        CallOutcome::Failed(error) => Answer::local(
            error.status(),
            wechat::SYSTEM_BUSY,
            &format!("system error (wxgate: {error})"),
            Outcome::UpstreamError,
        ),
        CallOutcome::Abandoned => Answer::local(
            StatusCode::BAD_GATEWAY,
            wechat::SYSTEM_BUSY,
            "system error (wxgate: the upstream call ended without an answer)",
            Outcome::UpstreamError,
        ),
    }
}

fn exchange_answer(answer: ExchangeAnswer, status: CacheStatus) -> Answer {
    let mut answer = match answer {
        ExchangeAnswer::Upstream(response, errcode) => Answer {
            // The leader alone usually holds the answer: no copy then.
            response: upstream_response(Arc::unwrap_or_clone(response)),
            outcome: Outcome::Forwarded,
            errcode: Some(errcode),
        },
        ExchangeAnswer::Remembered(remembered) => {
            let mut response = Response::new(Full::new(remembered.body()));
            *response.status_mut() = remembered.status();
            if let Some(content_type) = remembered.content_type() {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            Answer {
                response,
                outcome: Outcome::CacheHit,
                errcode: None,
            }
        }
        ExchangeAnswer::NoAnswer(outcome) => call_answer(outcome),
    };
    if status == CacheStatus::Coalesced && answer.outcome == Outcome::Forwarded {
        answer.outcome = Outcome::Coalesced;
    }
    answer
        .response
        .headers_mut()
        .insert(CACHE_HEADER, status.header_value());
    answer
}

struct InflightGuard<'a>(&'a Metrics);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found() {
        assert!(has_dot_segment("/sns/../cgi-bin/token"));
        assert!(has_dot_segment("/sns/%2E%2e/x"));
        assert!(has_dot_segment("/."));
        assert!(!has_dot_segment("/sns/jscode2session"));
        assert!(!has_dot_segment("/a.b/..c"));
    }

    #[test]
    fn hop_by_hop_and_wxgate_headers_stay_local() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "wxgate".parse().unwrap());
        headers.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        headers.insert(MAX_WAIT_HEADER, "10".parse().unwrap());
        headers.insert("x-custom", "kept".parse().unwrap());
        prepare_upstream_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-custom"], "kept");
    }
}
