//! The headers a proxy must not forward: hop-by-hop headers (RFC 9110 §7.6.1) and those a
//! `Connection` header names.

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1): a proxy
/// consumes them and never forwards them, nor those named in `Connection`.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop headers, those named in `Connection`, and `also`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    // One pass over the (few) headers finds what is there; only that is removed. A name is
    // told apart by its text (a match on length and bytes), not by comparing it with each of
    // the names in turn.
    let mut present = [false; 16];
    assert!(
        HOP_BY_HOP.len() + also.len() <= present.len(),
        "strip_hop_by_hop: too many extra names"
    );
    let mut any = false;
    for name in headers.keys() {
        let found = hop_by_hop_index(name.as_str())
            .or_else(|| Some(HOP_BY_HOP.len() + also.iter().position(|hop| hop == name)?));
        if let Some(i) = found {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    let only_keep_alive_or_close = || {
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().map(HeaderValue::as_bytes);
        values.next().is_none()
            && first.is_some_and(|value| {
                value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
            })
    };
    if present[0] && !only_keep_alive_or_close() {
        // `keep-alive` and `close` name no header; others name headers to remove.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|name| {
                !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP
        .iter()
        .chain(also)
        .zip(present)
        .filter(|(_, present)| *present)
    {
        headers.remove(name);
    }
}

/// Whether `name` is one of [`HOP_BY_HOP`].
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name.as_str()).is_some()
}

/// The position of `name` in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &str) -> Option<usize> {
    // In HOP_BY_HOP's order (a test checks it).
    Some(match name {
        "connection" => 0,
        "te" => 1,
        "trailer" => 2,
        "transfer-encoding" => 3,
        "upgrade" => 4,
        "proxy-authorization" => 5,
        "proxy-authenticate" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut headers, &[]);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn every_hop_by_hop_name_is_found_at_its_position() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index("content-type"), None);
    }
}
