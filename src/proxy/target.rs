//! The target phase and the request's headers: where a request goes, its id, and what of
//! its headers goes upstream.

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Method};

use super::{MAX_WAIT_HEADER, REQUEST_ID_HEADER};
use crate::answer::LocalAnswer;
use crate::upstream::strip_hop_by_hop;
use crate::wechat::{Api, PathClass};

/// Where a request goes: its API and its path and query, as received.
pub(super) struct Target {
    pub(super) api: Api,
    pub(super) path_and_query: PathAndQuery,
}

/// The request's id: the client's `X-Request-Id` when it is sane (so a client's id can be
/// followed through wxgate's log), else 16 random hex digits.
pub(super) fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |value: &&HeaderValue| {
        (1..=64).contains(&value.len())
            && value
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(b))
    };
    if let Some(value) = headers.get(REQUEST_ID_HEADER).filter(sane) {
        return value.clone();
    }
    let mut id = [0u8; 16];
    let random = fastrand::u64(..);
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((random >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// The target phase: the API of a plain path. `CONNECT`, an authority-form or
/// asterisk-form target, and dot segments (which an HTTP client would resolve, and so send
/// somewhere other than the path the request named) are refused; so is a path that looks
/// like a known API only up to case or `;` parameters. A known API written another way
/// WeChat reads as the same goes upstream under its documented path (see [`crate::wechat::Api`]).
pub(super) fn read_target(parts: &Parts) -> Result<Target, LocalAnswer> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .ok_or(LocalAnswer::BadTarget)?;
    let path = path_and_query.path();
    if parts.method == Method::CONNECT || !path.starts_with('/') || has_dot_segment(path) {
        return Err(LocalAnswer::BadTarget);
    }
    match Api::classify(path) {
        PathClass::Exact(api) => Ok(Target {
            api,
            path_and_query,
        }),
        PathClass::Variant(api) => {
            let canonical = match path_and_query.query() {
                Some(query) => format!("{}?{query}", api.label()),
                None => api.label().to_owned(),
            };
            Ok(Target {
                api,
                path_and_query: canonical.parse().map_err(|_| LocalAnswer::BadTarget)?,
            })
        }
        PathClass::Ambiguous => Err(LocalAnswer::BadTarget),
    }
}

/// What goes upstream: the client's headers minus those describing the client's connection,
/// `Content-Length` (recomputed from the body), `Expect` (wxgate has read the whole body
/// already, answering the client's `100-continue` itself), `Accept-Encoding` (wxgate must
/// read each answer's errcode, so it asks for the identity encoding) and wxgate's own.
/// `Host` is left for the upstream client to replace with the upstream's (one replacement
/// instead of a removal and an insertion).
pub(super) fn prepare_upstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(
        headers,
        &[
            header::CONTENT_LENGTH,
            header::EXPECT,
            header::ACCEPT_ENCODING,
            MAX_WAIT_HEADER,
        ],
    );
}

/// Whether a path has `.` or `..` segments.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_clients_when_sane() {
        let mut headers = HeaderMap::new();
        let made_up = request_id(&headers);
        assert_eq!(made_up.len(), 16);
        assert_ne!(made_up, request_id(&headers));
        headers.insert(REQUEST_ID_HEADER, "abc-123.x:y_z".parse().unwrap());
        assert_eq!(request_id(&headers), "abc-123.x:y_z");
        for bad in ["has space", "quote\"", &"x".repeat(65)] {
            headers.insert(REQUEST_ID_HEADER, bad.parse().unwrap());
            assert_eq!(request_id(&headers).len(), 16, "{bad}");
        }
    }

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
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        headers.insert(MAX_WAIT_HEADER, "10".parse().unwrap());
        headers.insert("x-custom", "kept".parse().unwrap());
        prepare_upstream_headers(&mut headers);
        // Host is replaced by the upstream client (see `UpstreamClient::outgoing`).
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["x-custom"], "kept");
    }
}
