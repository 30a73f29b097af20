//! Reading what an upstream body says about a call, and the bounded errcode label.
//!
//! Some documentation shows `errcode` as a string, so it is read leniently. A body without
//! `errcode` is a success only if it carries what WeChat's success of that API carries (a
//! code exchange's `openid` and `session_key`): a JSON object from something else in the path
//! (`{"message":"gateway busy"}` from a front end) is [`Errcode::Unexpected`], passed through
//! and never remembered.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{Api, LenientNumber};

/// What an upstream body says about the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errcode {
    /// WeChat's success: no `errcode` (or `0`), and the fields the API's success carries.
    Success,
    /// A JSON object with a non-zero `errcode`.
    Code(i64),
    /// A JSON object without `errcode` and without what the API's success carries.
    Unexpected,
    /// Not a JSON object (or an `errcode` that is not a number).
    NotJson,
}

impl Errcode {
    /// Reads the answer of `api` from its body.
    pub fn read(api: Api, body: &[u8]) -> Errcode {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            errcode: Option<LenientNumber>,
            #[serde(default)]
            openid: Option<IgnoredAny>,
            #[serde(default)]
            session_key: Option<IgnoredAny>,
        }
        // A success body is `{"session_key":…}` and most error bodies begin with `{"errcode"`,
        // so anything that does not start like an object is not parsed at all.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Errcode::NotJson;
        }
        let Ok(probe) = serde_json::from_slice::<Probe>(body) else {
            return Errcode::NotJson;
        };
        let code = match probe.errcode.map(|errcode| errcode.value()) {
            None => 0,
            Some(Some(code)) => code,
            Some(None) => return Errcode::NotJson,
        };
        if code != 0 {
            return Errcode::Code(code);
        }
        let carries_a_session = probe.openid.is_some() && probe.session_key.is_some();
        if api.is_code_exchange() && !carries_a_session {
            return Errcode::Unexpected;
        }
        Errcode::Success
    }

    /// The bounded metric label: `0`, `none`, `unexpected`, a code from
    /// [`KNOWN_ERRCODES`], or `other`; the label at [`Errcode::label_index`].
    pub fn label(self) -> &'static str {
        let index = self.label_index();
        FIXED_LABELS
            .get(index)
            .copied()
            .unwrap_or_else(|| KNOWN_ERRCODES[index - FIXED_LABELS.len()].1)
    }

    /// Position of [`Errcode::label`] in [`errcode_labels`], for per-label tables.
    pub fn label_index(self) -> usize {
        match self {
            Errcode::Success => 0,
            Errcode::NotJson => 1,
            Errcode::Unexpected => 3,
            Errcode::Code(code) => KNOWN_ERRCODES
                .binary_search_by_key(&code, |(known, _)| *known)
                .map_or(2, |position| position + FIXED_LABELS.len()),
        }
    }
}

/// The labels that are not a known errcode, in index order.
const FIXED_LABELS: [&str; 4] = ["0", "none", "other", "unexpected"];

/// The errcodes that get a label of their own, sorted; any other folds into `other`.
pub const KNOWN_ERRCODES: [(i64, &str); 20] = [
    (-1, "-1"),
    (40001, "40001"),
    (40002, "40002"),
    (40013, "40013"),
    (40029, "40029"),
    (40097, "40097"),
    (40125, "40125"),
    (40163, "40163"),
    (40226, "40226"),
    (41002, "41002"),
    (41004, "41004"),
    (41008, "41008"),
    (41021, "41021"),
    (42001, "42001"),
    (45009, "45009"),
    (45011, "45011"),
    (47001, "47001"),
    (48001, "48001"),
    (61003, "61003"),
    (76022, "76022"),
];

/// Every value [`Errcode::label`] can return, in index order, for pre-registering series.
pub fn errcode_labels() -> impl Iterator<Item = &'static str> {
    FIXED_LABELS
        .into_iter()
        .chain(KNOWN_ERRCODES.iter().map(|(_, label)| *label))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &[u8] = br#"{"session_key":"k","openid":"o"}"#;

    #[test]
    fn errcode_is_read_leniently() {
        let read = |body: &[u8]| Errcode::read(Api::Other, body);
        assert_eq!(read(SESSION), Errcode::Success);
        assert_eq!(read(br#"{"errcode":0,"errmsg":"ok"}"#), Errcode::Success);
        assert_eq!(
            read(br#"{"errcode":45011,"errmsg":"x rid: 1"}"#),
            Errcode::Code(45011)
        );
        assert_eq!(
            read(br#" {"errcode":"40029","errmsg":"invalid code"}"#),
            Errcode::Code(40029)
        );
        assert_eq!(read(br#"{"errcode":-1}"#), Errcode::Code(-1));
        assert_eq!(read(b"<html>502</html>"), Errcode::NotJson);
        assert_eq!(read(b"{not json"), Errcode::NotJson);
        assert_eq!(read(b""), Errcode::NotJson);
    }

    #[test]
    fn a_code_exchange_succeeds_only_with_a_session() {
        let read = |body: &[u8]| Errcode::read(Api::JsCode2Session, body);
        assert_eq!(read(SESSION), Errcode::Success);
        assert_eq!(
            read(br#"{"openid":"o","session_key":"k","unionid":"u"}"#),
            Errcode::Success
        );
        assert_eq!(
            read(br#"{"message":"gateway busy, try again"}"#),
            Errcode::Unexpected
        );
        assert_eq!(read(br#"{"openid":"o"}"#), Errcode::Unexpected);
        assert_eq!(read(br#"{"errcode":0}"#), Errcode::Unexpected);
        assert_eq!(read(br#"{"errcode":40163}"#), Errcode::Code(40163));
        // Other APIs' successes carry other fields.
        assert_eq!(
            Errcode::read(Api::Token, br#"{"access_token":"t","expires_in":7200}"#),
            Errcode::Success
        );
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(Errcode::Code(45011).label(), "45011");
        assert_eq!(Errcode::Code(12345678).label(), "other");
        assert_eq!(Errcode::Success.label(), "0");
        assert_eq!(Errcode::NotJson.label(), "none");
        assert_eq!(Errcode::Unexpected.label(), "unexpected");
        assert_eq!(
            errcode_labels().count(),
            KNOWN_ERRCODES.len() + FIXED_LABELS.len()
        );
        assert!(KNOWN_ERRCODES.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        for (index, label) in errcode_labels().enumerate() {
            let errcode = match label {
                "0" => Errcode::Success,
                "none" => Errcode::NotJson,
                "other" => Errcode::Code(99_999_999),
                "unexpected" => Errcode::Unexpected,
                code => Errcode::Code(code.parse().unwrap()),
            };
            assert_eq!(errcode.label_index(), index);
            assert_eq!(errcode.label(), label);
        }
    }
}
