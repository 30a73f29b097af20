//! What the code cache's map holds: a call in flight or a remembered answer per key
//! ([`CodeSlot`]), which answers are remembered at all, and the FIFO that expires them.
//!
//! Every answer has the same lifetime, so insertion order is expiry order: a FIFO of
//! (expiry, key) expires answers on time and evicts the oldest when `max_entries` is
//! reached, with no per-entry timers and no LRU bookkeeping on the read path.

use std::collections::VecDeque;
use std::sync::Arc;

use http::StatusCode;

use super::key::CodeKey;
use super::leader::{CodeFlight, CodeWaiter};
use crate::answer::RememberedAnswer;
use crate::wechat::Errcode;

/// What the map holds for a key.
pub(super) enum CodeSlot {
    /// A call is being made; followers subscribe to it.
    InFlight(Arc<CodeFlight>),
    /// A remembered answer, encoded ([`RememberedAnswer::encode`]): one allocation, with
    /// WeChat's usual Content-Type not written out.
    Remembered {
        /// Seconds since the cache's base.
        expires: u32,
        encoded: Box<[u8]>,
    },
}

/// What the map holds for a key, as a caller about to make the call finds it.
pub enum Lookup {
    /// A remembered answer.
    Remembered(RememberedAnswer),
    /// An identical call is in flight: wait for its answer.
    InFlight(CodeWaiter),
    /// Nothing: the call is to be made.
    Absent,
}

impl CodeSlot {
    /// The slot of an answer to remember until `expires`, or `None` if it is larger than
    /// [`MAX_REMEMBERED_BYTES`] (or cannot be encoded).
    pub(super) fn remembered(encoded: Option<Vec<u8>>, expires: u32) -> Option<CodeSlot> {
        let encoded = encoded?;
        (RememberedAnswer::own_bytes(&encoded) <= MAX_REMEMBERED_BYTES).then(|| {
            CodeSlot::Remembered {
                expires,
                encoded: encoded.into_boxed_slice(),
            }
        })
    }

    /// What a caller finds here at `now` (seconds since the cache's base): an expired
    /// answer is as good as none.
    pub(super) fn lookup(&self, now: u32) -> Lookup {
        match self {
            CodeSlot::Remembered { expires, encoded } if *expires > now => {
                match RememberedAnswer::decode(encoded) {
                    Some(answer) => Lookup::Remembered(answer),
                    None => Lookup::Absent,
                }
            }
            CodeSlot::InFlight(flight) => Lookup::InFlight(flight.join()),
            CodeSlot::Remembered { .. } => Lookup::Absent,
        }
    }

    /// When a remembered answer expires (`None` for a call in flight).
    pub(super) fn expires(&self) -> Option<u32> {
        match self {
            CodeSlot::Remembered { expires, .. } => Some(*expires),
            CodeSlot::InFlight(_) => None,
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
    use crate::wechat::JSON_CONTENT_TYPE;
    use bytes::Bytes;
    use http::HeaderValue;

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
        let slot = |body_len: usize| {
            let body = vec![b' '; body_len];
            CodeSlot::remembered(
                RememberedAnswer::encode_parts(StatusCode::OK, None, &body),
                9,
            )
        };
        assert!(slot(MAX_REMEMBERED_BYTES).is_some());
        assert!(slot(MAX_REMEMBERED_BYTES + 1).is_none());
    }

    #[test]
    fn remembered_answers_come_back_byte_for_byte() {
        let long = format!("application/json; {}", "x".repeat(300));
        for content_type in [
            None,
            Some(JSON_CONTENT_TYPE),
            Some("text/plain"),
            Some(&long),
        ] {
            let answer = RememberedAnswer {
                status: StatusCode::OK,
                content_type: content_type.map(|value| HeaderValue::from_str(value).unwrap()),
                body: Bytes::from_static(br#"{"openid":"o","session_key":"k"}"#),
            };
            let slot = CodeSlot::remembered(answer.encode(), 9).unwrap();
            let Lookup::Remembered(remembered) = slot.lookup(8) else {
                panic!("not remembered");
            };
            assert_eq!(remembered, answer);
            assert!(matches!(slot.lookup(9), Lookup::Absent), "expired");
        }
    }
}
