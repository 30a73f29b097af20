//! The recorder of validation: one `Checks` per table, which reads keys of that table,
//! records each problem with its key path (never with the value, when a value could be a
//! secret), and gives the typed value only when it is usable.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::read::quote_key;

/// A key's name and its raw value.
pub(super) type Key<'a, T> = (&'static str, &'a T);

/// Checks the keys of one table, recording each problem under its key path. Every method
/// that returns `None` has recorded why.
pub(super) struct Checks<'p> {
    /// The table's key path (`server`, `quota.apis."/cgi-bin/token"`).
    table: String,
    problems: &'p mut Vec<String>,
}

impl<'p> Checks<'p> {
    pub(super) fn new(problems: &'p mut Vec<String>, table: &str) -> Self {
        Checks {
            table: table.to_owned(),
            problems,
        }
    }

    /// The checks of this table's table `name` (`server` → `server.tls`).
    pub(super) fn table(&mut self, name: &str) -> Checks<'_> {
        Checks {
            table: self.path(name),
            problems: &mut *self.problems,
        }
    }

    /// The checks of the table `key` of this table's table `name`
    /// (`quota` → `quota.apis."/cgi-bin/token"`).
    pub(super) fn nested(&mut self, name: &str, key: &str) -> Checks<'_> {
        Checks {
            table: format!("{}.{name}.{}", self.table, quote_key(key)),
            problems: &mut *self.problems,
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        format!("{}.{key}", self.table)
    }

    pub(super) fn problem(&mut self, key: &str, message: impl fmt::Display) {
        let path = self.path(key);
        self.problems.push(format!("{path}: {message}"));
    }

    /// A problem with the table itself (its name, in an override table).
    pub(super) fn table_problem(&mut self, message: impl fmt::Display) {
        self.problems.push(format!("{}: {message}", self.table));
    }

    pub(super) fn check<T, E: fmt::Display>(
        &mut self,
        key: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        result.map_err(|error| self.problem(key, error)).ok()
    }

    pub(super) fn int<T: TryFrom<i64>>(
        &mut self,
        (key, value): Key<i64>,
        range: RangeInclusive<i64>,
    ) -> Option<T> {
        if !range.contains(value) {
            let (min, max) = range.into_inner();
            self.problem(key, format!("{value} is out of range ({min}..={max})"));
            return None;
        }
        let converted = T::try_from(*value).ok();
        if converted.is_none() {
            self.problem(key, format!("{value} does not fit this platform"));
        }
        converted
    }

    pub(super) fn millis(&mut self, key: Key<i64>, range: RangeInclusive<i64>) -> Option<Duration> {
        self.int(key, range).map(Duration::from_millis)
    }

    pub(super) fn secs(&mut self, key: Key<i64>, range: RangeInclusive<i64>) -> Option<Duration> {
        self.int(key, range).map(Duration::from_secs)
    }

    pub(super) fn socket_addr(&mut self, (key, text): Key<String>) -> Option<SocketAddr> {
        let parsed = text.parse().ok();
        if parsed.is_none() {
            self.problem(
                key,
                format!("\"{text}\" is not an IP address and port such as \"127.0.0.1:8080\""),
            );
        }
        parsed
    }
}
