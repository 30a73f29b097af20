//! A request as it goes on the wire: the request line with the base URL's prefix, the
//! upstream's `Host` (and `Authorization` for a base URL with userinfo), the client's other
//! headers, and the body's length.

use http::{header, HeaderValue, Method};

use super::UpstreamRequest;

/// Writes requests for one upstream: what the base URL adds to each.
#[derive(Debug, Clone)]
pub(super) struct RequestWriter {
    /// The base URL's path, without a trailing slash (usually empty).
    pub(super) prefix: String,
    /// `Host`, in place of the client's.
    pub(super) host: HeaderValue,
    /// `Authorization` for a base URL with userinfo, in place of the client's.
    pub(super) authorization: Option<HeaderValue>,
}

impl RequestWriter {
    /// Writes `request`'s head (request line, headers, blank line) to `out`.
    ///
    /// The path is the prefix and the client's path and query joined as text, never URL
    /// resolution (see the module doc of [`super`]). `Content-Length` is the body's (the
    /// client's was dropped with the hop-by-hop headers): sent for any body, and for an empty
    /// one with a method whose requests carry content.
    pub(super) fn write_head(&self, request: &UpstreamRequest, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(request.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(request.path_and_query.as_str().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(authorization) = &self.authorization {
            out.extend_from_slice(b"authorization: ");
            out.extend_from_slice(authorization.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in &request.headers {
            let ours = *name == header::HOST
                || (*name == header::AUTHORIZATION && self.authorization.is_some());
            if ours {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !request.body.is_empty() || carries_content(&request.method) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(decimal(request.body.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Methods whose requests carry content, so that an empty one says so with a length of 0.
fn carries_content(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

/// The decimal digits of `n`, without an allocation.
fn decimal(mut n: usize) -> Digits {
    let mut digits = Digits {
        bytes: [0; 20],
        start: 20,
    };
    loop {
        digits.start -= 1;
        digits.bytes[digits.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return digits;
        }
    }
}

/// Up to 20 decimal digits, at the end of `bytes`.
struct Digits {
    bytes: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;

    fn writer(prefix: &str, authorization: Option<&str>) -> RequestWriter {
        RequestWriter {
            prefix: prefix.to_owned(),
            host: HeaderValue::from_static("api.weixin.qq.com"),
            authorization: authorization.map(|value| HeaderValue::from_str(value).unwrap()),
        }
    }

    fn request(method: Method, target: &str, body: &'static str) -> UpstreamRequest {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("wxgate.local"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        headers.append("x-custom", HeaderValue::from_static("a"));
        headers.append("x-custom", HeaderValue::from_static("b"));
        UpstreamRequest {
            method,
            path_and_query: target.parse().unwrap(),
            headers,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn head(writer: &RequestWriter, request: &UpstreamRequest) -> String {
        let mut out = b"left over".to_vec();
        writer.write_head(request, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_get_carries_the_upstreams_host_and_the_clients_other_headers() {
        let get = request(Method::GET, "/sns/jscode2session?js_code=x", "");
        assert_eq!(
            head(&writer("", None), &get),
            "GET /sns/jscode2session?js_code=x HTTP/1.1\r\nhost: api.weixin.qq.com\r\n\
             authorization: Bearer client\r\nx-custom: a\r\nx-custom: b\r\n\r\n"
        );
    }

    #[test]
    fn the_prefix_is_joined_as_text_and_the_base_urls_authorization_replaces_the_clients() {
        let post = request(Method::POST, "//evil.example/x", "{}");
        assert_eq!(
            head(&writer("/wechat", Some("Basic dTpw")), &post),
            "POST /wechat//evil.example/x HTTP/1.1\r\nhost: api.weixin.qq.com\r\n\
             authorization: Basic dTpw\r\nx-custom: a\r\nx-custom: b\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn an_empty_post_says_its_length_and_an_empty_get_does_not() {
        let post = head(&writer("", None), &request(Method::POST, "/x", ""));
        assert!(post.ends_with("content-length: 0\r\n\r\n"), "{post}");
        let get = head(&writer("", None), &request(Method::GET, "/x", ""));
        assert!(!get.contains("content-length"), "{get}");
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0, 7, 10, 1234567890, usize::MAX] {
            assert_eq!(decimal(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
