//! What the exchange map holds: a call in flight or a remembered answer per key, the
//! remembered answers' compact form, which answers are remembered at all, and the FIFO that
//! expires them.
//!
//! Every answer has the same lifetime, so insertion order is expiry order: a FIFO of
//! (expiry, key) expires answers on time and evicts the oldest when `max_entries` is
//! reached, with no per-entry timers and no LRU bookkeeping on the read path.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use super::flight::{Flight, Waiter};
use super::key::CodeKey;
use crate::upstream::UpstreamResponse;
use crate::wechat::{Errcode, JSON_CONTENT_TYPE};

/// What the map holds for a key.
pub(super) enum Slot {
    /// A call is being made; followers subscribe to it.
    InFlight(Arc<Flight>),
    /// A remembered answer.
    Ready(Stored),
}

/// What the map holds for a key, as a caller about to make the call finds it.
pub enum Lookup {
    /// A remembered answer.
    Remembered(Remembered),
    /// An identical call is in flight: wait for its answer.
    InFlight(Waiter),
    /// Nothing: the call is to be made.
    Absent,
}

impl Slot {
    /// What a caller finds here at `now` (seconds since the exchange's base): an expired
    /// answer is as good as none.
    pub(super) fn lookup(&self, now: u32) -> Lookup {
        match self {
            Slot::Ready(stored) if stored.expires > now => Lookup::Remembered(stored.remembered()),
            Slot::InFlight(flight) => Lookup::InFlight(flight.waiter()),
            Slot::Ready(_) => Lookup::Absent,
        }
    }
}

/// Answers the same code will always get: success, invalid code, code used, risky user.
/// Transient ones (-1, 45011, 45009, 5xx, no answer) are never remembered.
pub fn is_definitive(status: StatusCode, errcode: Errcode) -> bool {
    status == StatusCode::OK
        && matches!(
            errcode,
            Errcode::Success | Errcode::Code(40029) | Errcode::Code(40163) | Errcode::Code(40226)
        )
}

/// A remembered answer as a replay hands it out: status, Content-Type and body, byte for
/// byte as WeChat sent them.
#[derive(Debug, Clone)]
pub struct Remembered {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Remembered {
    /// A remembered answer from its parts.
    pub fn new(status: StatusCode, content_type: Option<HeaderValue>, body: Bytes) -> Remembered {
        Remembered {
            status,
            content_type,
            body,
        }
    }

    /// The upstream status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The upstream Content-Type, if it had one.
    pub fn content_type(&self) -> Option<HeaderValue> {
        self.content_type.clone()
    }

    /// The upstream body.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }
}

/// A remembered answer as it is kept: 24 bytes plus one allocation holding the body (and an
/// unusual Content-Type), WeChat's usual Content-Type shared by all.
#[derive(Debug)]
pub(super) struct Stored {
    /// The Content-Type bytes (for [`StoredContentType::Own`]) followed by the body.
    data: Box<[u8]>,
    /// Seconds since the exchange's base.
    pub(super) expires: u32,
    status: u16,
    content_type: StoredContentType,
}

/// The Content-Type of a stored answer, without a copy of the common one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredContentType {
    /// The answer had none.
    None,
    /// WeChat's usual [`JSON_CONTENT_TYPE`].
    Json,
    /// Another one: the first `len` bytes of the stored data.
    Own {
        /// Its length.
        len: u16,
    },
}

impl Stored {
    /// The compact form of `response`, or `None` if it is larger than
    /// [`MAX_REMEMBERED_BYTES`].
    pub(super) fn new(response: &UpstreamResponse, expires: u32) -> Option<Stored> {
        Stored::compact(
            response.status,
            response.headers.get(header::CONTENT_TYPE),
            &response.body,
            expires,
        )
    }

    /// The compact form of an answer remembered elsewhere (another replica's).
    pub(super) fn from_remembered(remembered: &Remembered, expires: u32) -> Option<Stored> {
        Stored::compact(
            remembered.status,
            remembered.content_type.as_ref(),
            &remembered.body,
            expires,
        )
    }

    fn compact(
        status: StatusCode,
        content_type: Option<&HeaderValue>,
        body: &[u8],
        expires: u32,
    ) -> Option<Stored> {
        let (content_type, prefix) = match content_type {
            None => (StoredContentType::None, &[][..]),
            Some(v) if v.as_bytes() == JSON_CONTENT_TYPE.as_bytes() => {
                (StoredContentType::Json, &[][..])
            }
            Some(v) => {
                let len = u16::try_from(v.as_bytes().len()).ok()?;
                (StoredContentType::Own { len }, v.as_bytes())
            }
        };
        if prefix.len() + body.len() > MAX_REMEMBERED_BYTES {
            return None;
        }
        let mut data = Vec::with_capacity(prefix.len() + body.len());
        data.extend_from_slice(prefix);
        data.extend_from_slice(body);
        Some(Stored {
            data: data.into_boxed_slice(),
            expires,
            status: status.as_u16(),
            content_type,
        })
    }

    /// The answer as a replay hands it out.
    pub(super) fn remembered(&self) -> Remembered {
        let (content_type, split) = match self.content_type {
            StoredContentType::None => (None, 0),
            StoredContentType::Json => (Some(HeaderValue::from_static(JSON_CONTENT_TYPE)), 0),
            StoredContentType::Own { len } => {
                let len = usize::from(len);
                (HeaderValue::from_bytes(&self.data[..len]).ok(), len)
            }
        };
        Remembered {
            status: StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK),
            content_type,
            body: Bytes::copy_from_slice(&self.data[split..]),
        }
    }
}

/// The largest answer remembered, Content-Type included. WeChat's code-exchange answers are
/// about 120 bytes; anything much larger did not come from WeChat's exchange, and a million
/// of them must not fill the memory.
pub const MAX_REMEMBERED_BYTES: usize = 4096;

/// Records of the expiry queue per block.
const EXPIRY_BLOCK: usize = 4096;

/// A FIFO of (expiry, key) kept in fixed-size blocks: it grows and shrinks a block at a
/// time, so no push copies the whole queue (a `VecDeque` of a million records doubling
/// would stall the runtime for milliseconds).
#[derive(Default)]
pub(super) struct ExpiryQueue {
    blocks: VecDeque<Vec<(u32, CodeKey)>>,
    /// Records of the first block already popped.
    head: usize,
}

impl ExpiryQueue {
    pub(super) fn push_back(&mut self, record: (u32, CodeKey)) {
        match self.blocks.back_mut() {
            Some(block) if block.len() < EXPIRY_BLOCK => block.push(record),
            _ => {
                let mut block = Vec::with_capacity(EXPIRY_BLOCK);
                block.push(record);
                self.blocks.push_back(block);
            }
        }
    }

    pub(super) fn front(&self) -> Option<(u32, CodeKey)> {
        self.blocks.front()?.get(self.head).copied()
    }

    pub(super) fn pop_front(&mut self) {
        let only_block = self.blocks.len() == 1;
        let Some(first) = self.blocks.front_mut() else {
            return;
        };
        self.head += 1;
        if self.head >= first.len() {
            if only_block && first.len() < EXPIRY_BLOCK {
                // The only block, not full yet: reuse it.
                first.clear();
            } else {
                self.blocks.pop_front();
            }
            self.head = 0;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum::<usize>() - self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn the_expiry_queue_is_first_in_first_out_across_blocks() {
        let key = CodeKey::from_parts;
        let mut queue = ExpiryQueue::default();
        let now = 1u32;
        let total = EXPIRY_BLOCK * 2 + 10;
        for i in 0..total {
            queue.push_back((now, key(0, i as u64)));
        }
        assert_eq!(queue.len(), total);
        for i in 0..total - 5 {
            assert_eq!(queue.front(), Some((now, key(0, i as u64))));
            queue.pop_front();
        }
        assert_eq!(queue.len(), 5);
        queue.push_back((now, key(u64::MAX, u64::MAX)));
        for i in total - 5..total {
            assert_eq!(queue.front(), Some((now, key(0, i as u64))));
            queue.pop_front();
        }
        assert_eq!(queue.front(), Some((now, key(u64::MAX, u64::MAX))));
        queue.pop_front();
        assert_eq!(queue.front(), None);
        assert_eq!(queue.len(), 0);
        queue.pop_front();
        queue.push_back((now, key(0, 7)));
        assert_eq!(queue.front(), Some((now, key(0, 7))));
    }

    #[test]
    fn definitive_answers() {
        assert!(is_definitive(StatusCode::OK, Errcode::Success));
        assert!(is_definitive(StatusCode::OK, Errcode::Code(40163)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(-1)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(45011)));
        assert!(!is_definitive(StatusCode::OK, Errcode::Code(45009)));
        assert!(!is_definitive(StatusCode::BAD_GATEWAY, Errcode::Success));
        assert!(!is_definitive(StatusCode::OK, Errcode::NotJson));
    }

    #[test]
    fn large_answers_are_not_kept() {
        let response = |body_len: usize| UpstreamResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b' '; body_len]),
        };
        assert!(Stored::new(&response(MAX_REMEMBERED_BYTES), 9).is_some());
        assert!(Stored::new(&response(MAX_REMEMBERED_BYTES + 1), 9).is_none());
    }

    #[test]
    fn stored_answers_come_back_byte_for_byte() {
        let long = format!("application/json; {}", "x".repeat(300));
        for content_type in [
            None,
            Some(JSON_CONTENT_TYPE),
            Some("text/plain"),
            Some(&long),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(value) = content_type {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            }
            let response = UpstreamResponse {
                status: StatusCode::OK,
                headers,
                body: Bytes::from_static(br#"{"openid":"o","session_key":"k"}"#),
            };
            let remembered = Stored::new(&response, 9).unwrap().remembered();
            assert_eq!(remembered.status(), StatusCode::OK);
            assert_eq!(
                remembered
                    .content_type()
                    .as_ref()
                    .map(HeaderValue::as_bytes),
                content_type.map(str::as_bytes)
            );
            assert_eq!(remembered.body(), response.body);
        }
    }
}
