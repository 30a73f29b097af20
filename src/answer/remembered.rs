//! A remembered answer: what a replay of a code exchange gets, byte for byte as WeChat sent
//! it. One type in this process's memory and in Redis, with one encoding for both.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use crate::upstream::UpstreamResponse;
use crate::wechat::JSON_CONTENT_TYPE;

/// A remembered answer: WeChat's status, Content-Type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RememberedAnswer {
    /// The upstream status.
    pub status: StatusCode,
    /// The upstream Content-Type, if it had one.
    pub content_type: Option<HeaderValue>,
    /// The upstream body.
    pub body: Bytes,
}

/// The Content-Type length that says there is none.
const NO_CONTENT_TYPE: u16 = u16::MAX;

/// The Content-Type length that says it is WeChat's usual [`JSON_CONTENT_TYPE`], not
/// written out: nearly every answer has it, and a million remembered answers need not hold
/// a million copies.
const WECHAT_JSON: u16 = u16::MAX - 1;

impl RememberedAnswer {
    /// The parts of an upstream response a replay gives back.
    pub fn of(response: &UpstreamResponse) -> RememberedAnswer {
        RememberedAnswer {
            status: response.status,
            content_type: response.headers.get(header::CONTENT_TYPE).cloned(),
            body: response.body.clone(),
        }
    }

    /// The answer encoded (see [`RememberedAnswer::encode_parts`]).
    pub fn encode(&self) -> Option<Vec<u8>> {
        RememberedAnswer::encode_parts(self.status, self.content_type.as_ref(), &self.body)
    }

    /// An answer of these parts encoded: `status (2) | content-type length (2) |
    /// content-type | body`, the length [`NO_CONTENT_TYPE`] for none and [`WECHAT_JSON`] for
    /// WeChat's usual one (then not written out). `None` for a Content-Type too long to say.
    pub fn encode_parts(
        status: StatusCode,
        content_type: Option<&HeaderValue>,
        body: &[u8],
    ) -> Option<Vec<u8>> {
        let (len, written) = match content_type {
            None => (NO_CONTENT_TYPE, &[][..]),
            Some(value) if value.as_bytes() == JSON_CONTENT_TYPE.as_bytes() => {
                (WECHAT_JSON, &[][..])
            }
            Some(value) => {
                let len = u16::try_from(value.len())
                    .ok()
                    .filter(|len| *len < WECHAT_JSON)?;
                (len, value.as_bytes())
            }
        };
        let mut out = Vec::with_capacity(4 + written.len() + body.len());
        out.extend_from_slice(&status.as_u16().to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(written);
        out.extend_from_slice(body);
        Some(out)
    }

    /// The answer `data` encodes; `None` if it is not one.
    pub fn decode(data: &[u8]) -> Option<RememberedAnswer> {
        let status =
            StatusCode::from_u16(u16::from_be_bytes([*data.first()?, *data.get(1)?])).ok()?;
        let (content_type, body) = match u16::from_be_bytes([*data.get(2)?, *data.get(3)?]) {
            NO_CONTENT_TYPE => (None, data.get(4..)?),
            WECHAT_JSON => (
                Some(HeaderValue::from_static(JSON_CONTENT_TYPE)),
                data.get(4..)?,
            ),
            len => {
                let end = 4 + usize::from(len);
                let value = HeaderValue::from_bytes(data.get(4..end)?).ok()?;
                (Some(value), data.get(end..)?)
            }
        };
        Some(RememberedAnswer {
            status,
            content_type,
            body: Bytes::copy_from_slice(body),
        })
    }

    /// How many bytes of an encoding are the answer's own (its Content-Type when it is
    /// written out, and its body): what the code cache's size limit counts.
    pub fn own_bytes(encoded: &[u8]) -> usize {
        encoded.len().saturating_sub(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_their_encoding_byte_for_byte() {
        let long = format!("application/json; {}", "x".repeat(300));
        for content_type in [
            None,
            Some(JSON_CONTENT_TYPE),
            Some("text/plain"),
            Some(""),
            Some(&long),
        ] {
            let answer = RememberedAnswer {
                status: StatusCode::OK,
                content_type: content_type.map(|value| HeaderValue::from_str(value).unwrap()),
                body: Bytes::from_static(br#"{"openid":"o","session_key":"k"}"#),
            };
            let encoded = answer.encode().unwrap();
            assert_eq!(RememberedAnswer::decode(&encoded), Some(answer));
        }
        // WeChat's usual Content-Type is not written out.
        let json = RememberedAnswer {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static(JSON_CONTENT_TYPE)),
            body: Bytes::from_static(b"{}"),
        };
        assert_eq!(RememberedAnswer::own_bytes(&json.encode().unwrap()), 2);
        assert_eq!(RememberedAnswer::decode(b"\x00"), None);
        assert_eq!(RememberedAnswer::decode(b"\x00\xc8\x00\x09ab"), None);
    }
}
