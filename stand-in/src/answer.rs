//! What the stand-in answers: WeChat's JSON bodies (with WeChat's errmsg texts and a fresh
//! `rid`), the echo of any other path, an nginx-style 502, or a connection closed without an
//! answer.

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::ids::request_id;
use crate::JSON_CONTENT_TYPE;

/// What the stand-in decided to answer.
pub(crate) enum Answer {
    /// HTTP 200 with a WeChat JSON body; `errcode` 0 for a success body.
    Wechat {
        errcode: i64,
        body: String,
    },
    /// A finished response without an errcode (echo, or a refusal of the echo's own input).
    Other(Response<Full<Bytes>>),
    BadGateway,
    Reset,
    Hang,
}

impl Answer {
    pub(crate) fn success(body: String) -> Answer {
        Answer::Wechat { errcode: 0, body }
    }

    /// `{"errcode":0,"errmsg":"ok"}`: what WeChat's management calls answer on success.
    pub(crate) fn ok() -> Answer {
        Answer::success(r#"{"errcode":0,"errmsg":"ok"}"#.to_owned())
    }

    pub(crate) fn error(errcode: i64) -> Answer {
        let body = format!(
            r#"{{"errcode":{errcode},"errmsg":"{}, rid: {}"}}"#,
            errmsg(errcode),
            request_id()
        );
        Answer::Wechat { errcode, body }
    }

    pub(crate) fn errcode(&self) -> Option<i64> {
        match self {
            Answer::Wechat { errcode, .. } => Some(*errcode),
            _ => None,
        }
    }

    /// The response to send, or the connection to close. [`Answer::Hang`] never completes:
    /// it is pending until the client gives up and the connection task is dropped, or until
    /// the stand-in is dropped.
    pub(crate) async fn into_response(self) -> Result<Response<Full<Bytes>>, CloseConnection> {
        match self {
            Answer::Wechat { body, .. } => Ok(json_response(body)),
            Answer::Other(response) => Ok(response),
            Answer::BadGateway => Ok(bad_gateway()),
            Answer::Reset => Err(CloseConnection("fault injected: reset")),
            Answer::Hang => std::future::pending().await,
        }
    }
}

/// The text WeChat puts before `, rid: …` for each errcode the stand-in answers.
fn errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40013 => "invalid appid",
        40014 => "invalid access_token",
        40029 => "invalid code",
        40125 => "invalid appsecret",
        40163 => "code been used",
        40226 => "code blocked",
        41001 => "access_token missing",
        41002 => "appid missing",
        41004 => "appsecret missing",
        41008 => "missing code",
        41021 => "missing component_access_token",
        42001 => "access_token expired",
        43002 => "require POST method",
        45009 => "reach max api daily quota limit",
        45011 => "api minute-quota reach limit, must slower, retry next minute",
        47001 => "data format error",
        48006 => "forbid to clear quota because of reaching the limit",
        61003 => "component is not authorized by this account",
        61006 => "component ticket is invalid",
        61023 => "invalid refresh_token",
        76003 => "invalid cgi_path",
        76021 => "cgi_path not found, please check",
        76022 => "could not use this cgi_path, no permission",
        _ => "unknown error",
    }
}

/// Returned by the service to make hyper close the connection without answering.
#[derive(Debug)]
pub(crate) struct CloseConnection(pub(crate) &'static str);

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CloseConnection {}

/// HTTP 200 with `body` and WeChat's JSON Content-Type.
pub(crate) fn json_response(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    response
}

/// A `text/plain` answer of the stand-in's own, for a request it cannot take.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn bad_gateway() -> Response<Full<Bytes>> {
    // What an nginx in front of an unreachable backend sends.
    const BODY: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                        <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
                        </body>\r\n</html>\r\n";
    let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

const ECHO_STATUS: HeaderName = HeaderName::from_static("x-echo-status");
const ECHO_CONTENT_TYPE: HeaderName = HeaderName::from_static("x-echo-content-type");
const ECHO_CUSTOM: HeaderName = HeaderName::from_static("x-echo-custom");
const ECHO_METHOD: HeaderName = HeaderName::from_static("x-echo-method");

/// The echo answer described on [`StandIn`](crate::StandIn).
pub(crate) fn echo(parts: &Parts, body: &Bytes) -> Answer {
    let status = match parts.headers.get(&ECHO_STATUS) {
        None => StatusCode::OK,
        Some(value) => {
            // 1xx are not final answers and hyper would not send them as one.
            let status = value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u16>().ok())
                .filter(|code| (200..=599).contains(code))
                .and_then(|code| StatusCode::from_u16(code).ok());
            let Some(status) = status else {
                return Answer::Other(plain(
                    StatusCode::BAD_REQUEST,
                    "x-echo-status must be a status code from 200 to 599",
                ));
            };
            status
        }
    };

    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.get_mut(name.as_str()) {
            // A repeated header reads as one, joined the way HTTP allows.
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(
                    name.as_str().to_owned(),
                    serde_json::Value::String(value.into_owned()),
                );
            }
        }
    }
    let uri = parts.uri.path_and_query().map_or_else(
        || parts.uri.path(),
        |path_and_query| path_and_query.as_str(),
    );
    let echoed = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
        "body_len": body.len(),
    });

    let mut response = Response::new(Full::new(Bytes::from(echoed.to_string())));
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    let content_type = parts
        .headers
        .get(&ECHO_CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(JSON_CONTENT_TYPE));
    response_headers.insert(CONTENT_TYPE, content_type);
    response_headers.insert(ECHO_CUSTOM, HeaderValue::from_static("stand-in"));
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        response_headers.insert(ECHO_METHOD, method);
    }
    Answer::Other(response)
}
