//! TOML text → the raw structs of [`super`], with every unknown key and every value of the
//! wrong type found in one read, each named by its key path and never by its value; and
//! [`Secret`], the string type of keys that hold secrets.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigErrors, RawConfig};

/// Parses `text` into raw structs. A syntax error is the only early failure; unknown keys and
/// values of the wrong type are returned as problems (in that order, each in key order), and
/// a wrongly typed key keeps its default so that validation still sees every other key.
pub(super) fn read(text: &str) -> Result<(RawConfig, Vec<String>), ConfigErrors> {
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| ConfigErrors(vec![syntax_error(&error)]))?;
    let mut document = toml::Value::Table(table);
    let mut wrong_types = Vec::new();
    // serde stops at the first wrongly typed value: note it, take it out, read again. Each
    // round takes one value out, so this ends.
    loop {
        let mut problems = Vec::new();
        let mut unknown = |path: serde_ignored::Path| {
            problems.push(format!("{}: unknown key", key_path(&ignored_path(&path))));
        };
        let deserializer = serde_ignored::Deserializer::new(document.clone(), &mut unknown);
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(deserializer) {
            Ok(raw) => {
                problems.append(&mut wrong_types);
                return Ok((raw, problems));
            }
            Err(error) => error,
        };
        let segments: Option<Vec<Segment>> = error.path().iter().map(Segment::from).collect();
        let taken = segments
            .as_deref()
            .and_then(|segments| Some((key_path(segments), take(&mut document, segments)?)));
        let Some((path, value)) = taken else {
            // Not a value of the wrong type in a table (no such error is known): report it
            // without its text, which could hold the value, and stop.
            wrong_types.push("the file does not have the shape of a configuration".into());
            return Err(ConfigErrors(wrong_types));
        };
        wrong_types.push(wrong_type(&path, error.inner().message(), &value));
    }
}

/// A TOML syntax error without the offending source line: the line could hold a value an
/// operator would not want in a CI log.
fn syntax_error(error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => format!("not valid TOML at byte {}: {}", span.start, error.message()),
        None => format!("not valid TOML: {}", error.message()),
    }
}

/// `{path}: expected an integer, found string`. serde's message is only read for what was
/// expected (after its last ", expected ", which names a Rust type and never the value); the
/// value is described by its TOML type alone.
fn wrong_type(path: &str, message: &str, found: &toml::Value) -> String {
    let expected = message.rsplit_once(", expected ").map_or("", |(_, e)| e);
    let expected = if expected.contains("struct") || expected.contains("map") {
        "a table"
    } else if expected.contains("string") {
        "a string"
    } else if expected.contains("bool") {
        "a boolean"
    } else if expected.contains("sequence") {
        "an array"
    } else if expected.starts_with('f') {
        "a number"
    } else if expected.starts_with(['i', 'u']) || expected.contains("integer") {
        "an integer"
    } else {
        "another type"
    };
    if message.starts_with("invalid type") {
        format!("{path}: expected {expected}, found {}", found.type_str())
    } else {
        format!("{path}: not a usable value (expected {expected})")
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

impl Segment {
    fn from(segment: &serde_path_to_error::Segment) -> Option<Segment> {
        match segment {
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            _ => None,
        }
    }
}

fn ignored_path(path: &serde_ignored::Path) -> Vec<Segment> {
    use serde_ignored::Path as P;
    match path {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut segments = ignored_path(parent);
            segments.push(Segment::Index(*index));
            segments
        }
        P::Map { parent, key } => {
            let mut segments = ignored_path(parent);
            segments.push(Segment::Key(key.clone()));
            segments
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// `quota.apis."/cgi-bin/token".burst`, `server.allow[2]`: as a TOML dotted key, quoted
/// where TOML needs quotes.
pub(super) fn key_path(segments: &[Segment]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&quote_key(key));
            }
            Segment::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

pub(super) fn quote_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{}\"", key.escape_default())
    }
}

/// Removes and returns the value at `segments`.
fn take(value: &mut toml::Value, segments: &[Segment]) -> Option<toml::Value> {
    let (first, rest) = segments.split_first()?;
    match (value, first) {
        (toml::Value::Table(table), Segment::Key(key)) if rest.is_empty() => table.remove(key),
        (toml::Value::Array(array), Segment::Index(i)) if rest.is_empty() && *i < array.len() => {
            Some(array.remove(*i))
        }
        (toml::Value::Table(table), Segment::Key(key)) => take(table.get_mut(key)?, rest),
        (toml::Value::Array(array), Segment::Index(i)) => take(array.get_mut(*i)?, rest),
        _ => None,
    }
}

/// How the value of a [`Secret`] is shown.
pub(crate) trait Mask {
    /// The text `check-config` and `Debug` show instead of `text`.
    fn mask(text: &str) -> String;
}

/// A URL whose userinfo may hold a password: shown as `https://user:***@host`. A secret
/// that is not a URL (a shared password) would get a mask that shows `***` alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct UrlPassword;

impl Mask for UrlPassword {
    fn mask(text: &str) -> String {
        super::base_url::mask_userinfo(text)
    }
}

/// The text of a key that may hold a secret: read as a plain string; serialized (by
/// `check-config`) and debug-printed only through its [`Mask`], so neither leaks it.
#[derive(Clone, Default, PartialEq)]
pub(crate) struct Secret<M> {
    text: String,
    mask: PhantomData<M>,
}

impl<M> Secret<M> {
    pub(super) fn new(text: impl Into<String>) -> Self {
        Secret {
            text: text.into(),
            mask: PhantomData,
        }
    }

    /// The secret itself, for validation to parse.
    pub(super) fn expose(&self) -> &str {
        &self.text
    }

    /// Whether the key is empty (absent).
    pub(super) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

impl<'de, M> Deserialize<'de> for Secret<M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

impl<M: Mask> Serialize for Secret<M> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&M::mask(&self.text))
    }
}

impl<M: Mask> fmt::Debug for Secret<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&M::mask(&self.text), f)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(text: &str) -> Vec<String> {
        Config::from_toml_str(text).unwrap_err().0
    }

    #[test]
    fn every_unknown_key_is_reported_in_key_order() {
        let text = r#"
            colour = 1
            [server]
            lisen = "x"
            listen = "127.0.0.1:1"
            [upstream]
            timout_ms = 5
            [quota]
            windows = 2
            [quota.apis."/cgi-bin/token"]
            perwindow = 3
            [retry]
            hold = 1
            [surprise]
            x = 1
        "#;
        assert_eq!(
            problems(text),
            [
                "colour: unknown key",
                "quota.apis.\"/cgi-bin/token\".perwindow: unknown key",
                "quota.windows: unknown key",
                "retry.hold: unknown key",
                "server.lisen: unknown key",
                "surprise: unknown key",
                "upstream.timout_ms: unknown key",
            ]
        );
    }

    #[test]
    fn wrong_types_are_named_by_path_without_their_value() {
        let text = r#"
            [server]
            listen = 8080
            max_body_bytes = "hunter2-a"
            [upstream]
            base_url = ["hunter2-b"]
            timeout_ms = 1.5
            [quota.apis]
            "/cgi-bin/token" = "hunter2-c"
            [retry]
            max_hold_ms = "hunter2-d"
            busy_attempts = 0
            retries = true
        "#;
        let errors = problems(text);
        assert_eq!(
            errors,
            [
                "retry.retries: unknown key",
                "quota.apis.\"/cgi-bin/token\": expected a table, found string",
                "retry.max_hold_ms: expected an integer, found string",
                "server.listen: expected a string, found integer",
                "server.max_body_bytes: expected an integer, found string",
                "upstream.base_url: expected a string, found array",
                "upstream.timeout_ms: expected an integer, found float",
            ]
        );
        assert!(!errors.join("\n").contains("hunter2"));
        // A whole table of the wrong type, and validation still runs on the rest.
        assert_eq!(
            problems("server = 5\n[code_cache]\nttl_secs = 0\n"),
            [
                "server: expected a table, found integer",
                "code_cache.ttl_secs: 0 is out of range (1..=86400)",
            ]
        );
    }

    #[test]
    fn a_syntax_error_gives_its_position_not_its_line() {
        let errors = problems("[server]\nlisten = \"hunter2\nx = 1\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("not valid TOML at byte "),
            "{errors:?}"
        );
        assert!(!errors[0].contains("hunter2"), "{errors:?}");
    }
}
