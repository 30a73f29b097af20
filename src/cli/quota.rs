//! `wxgate quota`: `GET /quota` from the admin port of the wxgate serving the same
//! configuration file, printed as a table: every (appid, API) with recent traffic, the limit
//! in force and where it comes from, the calls of this window, the callers waiting, a 45011
//! pause, and the daily quota where WeChat stated one.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde::Deserialize;

use super::admin::{reachable, request};

/// Prints the quota table of the wxgate whose admin port is `admin`: exit 0, or 1 with why
/// it could not be read.
pub fn quota(admin: SocketAddr) -> ExitCode {
    let target = reachable(admin);
    super::block_on(async move {
        match request(target, Method::GET, "/quota").await {
            Ok((StatusCode::OK, body)) => match serde_json::from_str::<Table>(&body) {
                Ok(table) => {
                    print!("{}", table.render(now_ms()));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!(
                        "wxgate quota: the admin port's answer is not a quota table: {error}"
                    );
                    ExitCode::FAILURE
                }
            },
            Ok((status, body)) => {
                eprintln!("wxgate quota: the admin port answered {status}: {body}");
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("wxgate quota: cannot reach the admin port {target}: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `GET /quota`'s answer, as far as the table reads it.
#[derive(Debug, Deserialize)]
struct Table {
    keys: Vec<Row>,
    omitted: usize,
}

#[derive(Debug, Deserialize)]
struct Row {
    appid: String,
    api: String,
    on_behalf: bool,
    limit: u32,
    window_secs: f64,
    source: String,
    calls: u32,
    waiting: usize,
    paused_until_ms: Option<u64>,
    daily_blocked_until: Option<String>,
    daily: Option<Daily>,
}

#[derive(Debug, Deserialize)]
struct Daily {
    used: u64,
    limit: u64,
}

impl Table {
    /// The table as text, its columns aligned; `now_ms` for the pauses' time left.
    fn render(&self, now_ms: u64) -> String {
        let header = [
            "APPID", "API", "LIMIT", "SOURCE", "CALLS", "WAITING", "PAUSED", "DAILY",
        ];
        let mut lines: Vec<[String; 8]> = vec![header.map(str::to_owned)];
        for row in &self.keys {
            let api = if row.on_behalf {
                format!("{} (on behalf)", row.api)
            } else {
                row.api.clone()
            };
            let paused = row.paused_until_ms.map_or("-".to_owned(), |until| {
                format!("{:.1} s", until.saturating_sub(now_ms) as f64 / 1000.0)
            });
            let mut daily = row.daily.as_ref().map_or("-".to_owned(), |daily| {
                format!("{}/{}", daily.used, daily.limit)
            });
            if let Some(until) = &row.daily_blocked_until {
                daily = format!("{daily} spent until {until}");
            }
            lines.push([
                row.appid.clone(),
                api,
                format!("{}/{} s", row.limit, row.window_secs),
                row.source.clone(),
                row.calls.to_string(),
                row.waiting.to_string(),
                paused,
                daily,
            ]);
        }
        let mut widths = [0usize; 8];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.len());
            }
        }
        let mut out = String::new();
        for line in &lines {
            let cells: Vec<String> = line
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        if self.keys.is_empty() {
            out.push_str("(no key has had traffic recently)\n");
        }
        if self.omitted > 0 {
            out.push_str(&format!("({} quieter keys not shown)\n", self.omitted));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_its_columns_and_says_what_it_left_out() {
        let table: Table = serde_json::from_str(
            r#"{"keys":[
              {"appid":"wx00000000000000a1","api":"/wxa/x","on_behalf":false,"limit":20,"burst":1,
               "window_secs":2.0,"source":"wechat","calls":12,"waiting":3,"paused_until_ms":2500,
               "daily_blocked_until":null,"daily":{"used":900,"limit":1000}},
              {"appid":"wx00000000000000a1","api":"/sns/jscode2session","on_behalf":false,"limit":19,
               "burst":1,"window_secs":1.0,"source":"learned","calls":0,"waiting":0,
               "paused_until_ms":null,"daily_blocked_until":"2025-01-02T00:00:00+08:00","daily":null}],
              "omitted":2}"#,
        )
        .unwrap();
        let text = table.render(1000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("APPID"), "{text}");
        assert!(
            lines[1].contains("20/2 s") && lines[1].contains("wechat"),
            "{text}"
        );
        assert!(
            lines[1].contains("1.5 s") && lines[1].contains("900/1000"),
            "{text}"
        );
        assert!(
            lines[2].contains("spent until 2025-01-02T00:00:00+08:00"),
            "{text}"
        );
        assert_eq!(lines[0].find("API"), lines[1].find("/wxa/x"), "aligned");
        assert!(text.contains("(2 quieter keys not shown)"));
    }
}
