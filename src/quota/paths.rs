//! The paths of the APIs outside [`Api`](crate::wechat::Api) that have quota keys: a call of
//! such an API gets a key once wxgate knows the appid of the access token it carries. Each
//! path gets a number, kept in the key ([`QuotaKey`](super::QuotaKey) stays `Copy` and
//! small), and at most [`MAX_PATHS`] paths are ever numbered, so neither the keys nor
//! anything named after them can grow without bound from paths clients make up. Metrics keep
//! labelling these APIs `other`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// How many paths get a number; calls of further paths go unlimited, as calls without a
/// known appid always did. WeChat has a few hundred APIs; a backend calls tens of them.
pub const MAX_PATHS: usize = 1024;

/// The longest path that gets a number.
const MAX_PATH_LEN: usize = 128;

/// The numbered paths: number 0 is no path (the known APIs).
#[derive(Default)]
pub struct ApiPaths {
    numbers: RwLock<HashMap<Arc<str>, u16>>,
    paths: RwLock<Vec<Arc<str>>>,
}

impl ApiPaths {
    /// The number of `path`, given it now if it has none; `None` for a path that is not
    /// shaped like a WeChat API (`/` and segments of `[A-Za-z0-9_.-]`, no empty segment,
    /// not under `/sns/`), or when [`MAX_PATHS`] are numbered already.
    pub fn number(&self, path: &str) -> Option<u16> {
        if let Some(number) = self.numbers.read().get(path) {
            return Some(*number);
        }
        if !is_api_path(path) {
            return None;
        }
        let mut numbers = self.numbers.write();
        if let Some(number) = numbers.get(path) {
            return Some(*number);
        }
        let mut paths = self.paths.write();
        if paths.len() >= MAX_PATHS {
            return None;
        }
        let path: Arc<str> = path.into();
        paths.push(path.clone());
        let number = u16::try_from(paths.len()).ok()?;
        numbers.insert(path, number);
        Some(number)
    }

    /// The path numbered `number`.
    pub fn path(&self, number: u16) -> Option<Arc<str>> {
        let index = usize::from(number).checked_sub(1)?;
        self.paths.read().get(index).cloned()
    }
}

/// Whether `path` is shaped like one of WeChat's API paths (the code exchanges under `/sns/`
/// name their appid, and quota/get cannot be asked about them).
fn is_api_path(path: &str) -> bool {
    path.len() <= MAX_PATH_LEN
        && path.starts_with('/')
        && !path.starts_with("/sns/")
        && path[1..].split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_get_stable_numbers_up_to_the_cap() {
        let paths = ApiPaths::default();
        let a = paths.number("/wxa/getwxacode").unwrap();
        assert_eq!(paths.number("/wxa/getwxacode"), Some(a));
        assert_ne!(paths.number("/wxa/business/getuserphonenumber"), Some(a));
        assert_eq!(paths.path(a).as_deref(), Some("/wxa/getwxacode"));
        assert_eq!(paths.path(0), None);
        for bad in [
            "/sns/jscode2session",
            "/wxa//x",
            "/wxa/x/",
            "/wxa/%41",
            "x",
            "/a/../b",
        ] {
            assert_eq!(paths.number(bad), None, "{bad}");
        }
        for i in 0..MAX_PATHS {
            paths.number(&format!("/wxa/p{i}"));
        }
        assert_eq!(paths.number("/wxa/one-too-many"), None);
        assert_eq!(
            paths.number("/wxa/getwxacode"),
            Some(a),
            "numbered paths stay"
        );
    }
}
