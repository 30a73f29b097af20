//! `wxgate-stand-in`: the stand-in for `api.weixin.qq.com` as a process of its own, for
//! scripts that run wxgate as a binary (`deploy/cluster-demo.sh`, `benches/load/soak.sh`): a
//! quota over a short window, per-API rate and daily limits, the per-user limit of code
//! exchanges, a latency, faults drawn at random, and the calls per window on
//! `GET /__stand_in/stats`.
//!
//! It prints `listening on ADDR` once its port is bound, then serves until it is killed (it
//! keeps nothing worth a clean shutdown). A command line it cannot understand exits 64 with
//! the usage, as wxgate's does.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use wxgate_stand_in::{
    ApiLimits, FaultMix, RateLimit, StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET,
    STATS_PATH,
};

const USAGE: &str = "\
usage: wxgate-stand-in [--listen ADDR] [--quota-per-window N] [--window-secs S]
                       [--rate-limit KEY=N/S]... [--component-rate-limit KEY=N/S]...
                       [--daily-limit KEY=N]... [--user-rate-limit N/S|off] [--day-secs S]
                       [--latency-ms MS] [--faults MIX] [--no-call-log]

Serves a stand-in for api.weixin.qq.com (single-use codes, per-(appid, API) rate and daily
limits over windows and days aligned to the epoch, quota/get and clear_quota, WeChat's
errcodes) and, on GET /__stand_in/stats, its limits and the calls it received per window as
JSON.

  --listen ADDR           address to bind (default 127.0.0.1:0: a free loopback port)
  --quota-per-window N    calls per (appid, API) and window before 45011, for the code
                          exchanges and token fetches (default: unlimited)
  --window-secs S         quota window in seconds, may be fractional (default 60)
  --rate-limit KEY=N/S    N calls per S seconds for the API of KEY: PATH for every appid, or
                          PATH@APPID for one; a path otherwise echoed then checks its
                          access_token and is counted (repeatable)
  --component-rate-limit KEY=N/S
                          the same, for calls a platform makes on the account's behalf
  --daily-limit KEY=N     N calls a day before 45009 (repeatable)
  --user-rate-limit N/S   each WeChat user's code exchanges (codes u<user>_...); off: none
                          (default 100/60)
  --day-secs S            length of the day of the daily limits, ending at midnight UTC+8
                          (default 86400)
  --latency-ms MS         added before every answer (default 0)
  --faults MIX            faults drawn at random, each call on its own: NAME=FRACTION,...
                          with NAME busy (-1), minute-quota (45011), daily-quota (45009),
                          bad-gateway (502), reset (closed unanswered), hang (never
                          answers), lost-answer (executed, then closed unanswered) or
                          delay:MS (answered MS late), e.g. busy=0.02,delay:1500=0.003;
                          the fractions add up to at most 1 (default: no faults)
  --no-call-log           keep no per-call log: counters only, and no windows in the stats
                          (for long runs, where the log would grow)
  -h, --help              this text";

/// Exit code of a command line that cannot be understood (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("wxgate-stand-in: {problem}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread is plenty for a test double behind a quota; it also leaves the CPUs to
    // what is being measured.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(serve(&args)),
        Err(error) => Err(error),
    };
    let Err(error) = result;
    eprintln!("wxgate-stand-in: cannot serve on {}: {error}", args.listen);
    ExitCode::FAILURE
}

/// Binds, says where, and serves until the process is killed.
async fn serve(args: &Args) -> std::io::Result<Infallible> {
    let listener = TcpListener::bind(args.listen).await?;
    let stand_in = StandIn::start_on(listener, args.config()).await?;
    let quota = args
        .quota_per_window
        .map_or_else(|| "unlimited".to_owned(), |quota| quota.to_string());
    // Best effort: a reader that closed stdout after the first line must not stop the
    // serving.
    let _ = writeln!(
        std::io::stdout().lock(),
        "listening on {}\napp {DEFAULT_APPID} (secret {DEFAULT_APP_SECRET}); quota {quota} per \
         (appid, API) and {:?} window; {} API limits; latency {:?}; faults {}; stats on \
         {}{STATS_PATH}",
        stand_in.addr(),
        args.window,
        args.api_limits.len(),
        args.latency,
        args.faults,
        stand_in.base_url()
    )
    .and_then(|()| std::io::stdout().flush());
    std::future::pending().await
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
struct Args {
    listen: SocketAddr,
    quota_per_window: Option<u32>,
    window: Duration,
    api_limits: Vec<ApiLimits>,
    user_rate_limit: Option<RateLimit>,
    day: Duration,
    latency: Duration,
    faults: FaultMix,
    record_calls: bool,
}

impl Args {
    /// The arguments after the program name; `Ok(None)` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            quota_per_window: None,
            window: Duration::from_secs(60),
            api_limits: Vec::new(),
            user_rate_limit: StandInConfig::default().user_rate_limit,
            day: Duration::from_secs(86_400),
            latency: Duration::ZERO,
            faults: FaultMix::default(),
            record_calls: true,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // `--name value` and `--name=value` alike.
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| match inline {
                Some(value) => Ok(value.to_owned()),
                None => args.next().ok_or_else(|| format!("{name} needs a value")),
            };
            match name.as_str() {
                "-h" | "--help" => return Ok(None),
                "--listen" => {
                    let text = value("--listen")?;
                    parsed.listen = text.parse().map_err(|_| {
                        format!("--listen: {text:?} is not an address such as 127.0.0.1:8081")
                    })?;
                }
                "--quota-per-window" => {
                    let text = value("--quota-per-window")?;
                    let quota = text.parse::<u32>().ok().filter(|quota| *quota > 0);
                    let quota = quota.ok_or_else(|| {
                        format!("--quota-per-window: {text:?} is not a whole number above 0")
                    })?;
                    parsed.quota_per_window = Some(quota);
                }
                "--window-secs" => {
                    let text = value("--window-secs")?;
                    parsed.window = text
                        .parse::<f64>()
                        .ok()
                        .filter(|secs| *secs > 0.0)
                        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                        .ok_or_else(|| {
                            format!("--window-secs: {text:?} is not a number of seconds above 0")
                        })?;
                }
                "--rate-limit" | "--component-rate-limit" | "--daily-limit" => {
                    let text = value(&name)?;
                    parsed.add_api_limit(&name, &text)?;
                }
                "--user-rate-limit" => {
                    let text = value("--user-rate-limit")?;
                    parsed.user_rate_limit = match text.as_str() {
                        "off" => None,
                        _ => Some(
                            text.parse()
                                .map_err(|problem| format!("--user-rate-limit: {problem}"))?,
                        ),
                    };
                }
                "--day-secs" => {
                    let text = value("--day-secs")?;
                    parsed.day = text
                        .parse::<f64>()
                        .ok()
                        .filter(|secs| *secs > 0.0)
                        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                        .ok_or_else(|| {
                            format!("--day-secs: {text:?} is not a number of seconds above 0")
                        })?;
                }
                "--latency-ms" => {
                    let text = value("--latency-ms")?;
                    let millis = text.parse::<u64>().map_err(|_| {
                        format!("--latency-ms: {text:?} is not a whole number of milliseconds")
                    })?;
                    parsed.latency = Duration::from_millis(millis);
                }
                "--faults" => {
                    let text = value("--faults")?;
                    parsed.faults = text
                        .parse()
                        .map_err(|problem| format!("--faults: {problem}"))?;
                }
                "--no-call-log" if inline.is_none() => parsed.record_calls = false,
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        Ok(Some(parsed))
    }

    /// One `--rate-limit`, `--component-rate-limit` or `--daily-limit` (`flag`) with its
    /// `KEY=VALUE`, merged into the entry of its key.
    fn add_api_limit(&mut self, flag: &str, text: &str) -> Result<(), String> {
        let (key, figure) = text
            .split_once('=')
            .ok_or_else(|| format!("{flag}: {text:?} is not KEY=VALUE"))?;
        let (path, appid) = match key.split_once('@') {
            Some((path, appid)) => (path, Some(appid.to_owned())),
            None => (key, None),
        };
        if !path.starts_with('/') || appid.as_deref() == Some("") {
            return Err(format!("{flag}: {key:?} is not PATH or PATH@APPID"));
        }
        let index = match self
            .api_limits
            .iter()
            .position(|entry| entry.path == path && entry.appid == appid)
        {
            Some(index) => index,
            None => {
                self.api_limits.push(ApiLimits {
                    appid,
                    ..ApiLimits::new(path)
                });
                self.api_limits.len() - 1
            }
        };
        let entry = &mut self.api_limits[index];
        let rate = || {
            figure
                .parse::<RateLimit>()
                .map_err(|problem| format!("{flag}: {problem}"))
        };
        match flag {
            "--rate-limit" => entry.rate_limit = Some(rate()?),
            "--component-rate-limit" => entry.component_rate_limit = Some(rate()?),
            _ => {
                let limit = figure
                    .parse::<u64>()
                    .map_err(|_| format!("{flag}: {figure:?} is not a whole number of calls"))?;
                entry.daily_limit = Some(limit);
            }
        }
        Ok(())
    }

    fn config(&self) -> StandInConfig {
        StandInConfig {
            quota_per_window: self.quota_per_window,
            window: self.window,
            api_limits: self.api_limits.clone(),
            user_rate_limit: self.user_rate_limit,
            day: self.day,
            latency: self.latency,
            random_faults: self.faults.clone(),
            record_calls: self.record_calls,
            ..StandInConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wxgate_stand_in::Fault;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        Args::parse(args.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn defaults_serve_a_free_loopback_port_without_quota() {
        let args = parse(&[]).unwrap().unwrap();
        assert_eq!(args.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(args.quota_per_window, None);
        assert_eq!(args.window, Duration::from_secs(60));
        assert!(args.api_limits.is_empty());
        assert_eq!(
            args.user_rate_limit,
            Some(RateLimit::new(100, Duration::from_secs(60)))
        );
        assert_eq!(args.day, Duration::from_secs(86_400));
        assert_eq!(args.latency, Duration::ZERO);
        assert!(args.faults.is_empty());
        assert!(args.record_calls);
    }

    #[test]
    fn every_option_in_both_spellings() {
        let args = parse(&[
            "--listen",
            "127.0.0.1:18081",
            "--quota-per-window=40",
            "--window-secs",
            "0.5",
            "--rate-limit",
            "/wxa/a=20/3",
            "--daily-limit=/wxa/a=1000",
            "--component-rate-limit",
            "/wxa/a@wx1=5/1",
            "--user-rate-limit=off",
            "--day-secs",
            "120",
            "--latency-ms=20",
            "--faults",
            "busy=0.25,delay:1500=0.5",
            "--no-call-log",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            args,
            Args {
                listen: SocketAddr::from(([127, 0, 0, 1], 18081)),
                quota_per_window: Some(40),
                window: Duration::from_millis(500),
                api_limits: vec![
                    ApiLimits::new("/wxa/a")
                        .with_rate_limit(RateLimit::new(20, Duration::from_secs(3)))
                        .with_daily_limit(1000),
                    ApiLimits::new("/wxa/a")
                        .for_appid("wx1")
                        .with_component_rate_limit(RateLimit::new(5, Duration::from_secs(1))),
                ],
                user_rate_limit: None,
                day: Duration::from_secs(120),
                latency: Duration::from_millis(20),
                faults: FaultMix::new([
                    (Fault::Busy, 0.25),
                    (Fault::Delay(Duration::from_millis(1500)), 0.5)
                ])
                .unwrap(),
                record_calls: false,
            }
        );
        assert_eq!(parse(&["-h"]).unwrap(), None);
        assert_eq!(parse(&["--quota-per-window", "3", "--help"]).unwrap(), None);
    }

    #[test]
    fn a_command_line_it_cannot_use_is_refused_with_the_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&["--listen"], "--listen needs a value"),
            (&["--listen", "localhost"], "not an address"),
            (&["--quota-per-window", "0"], "above 0"),
            (&["--quota-per-window", "-3"], "above 0"),
            (&["--window-secs", "0"], "above 0"),
            (&["--window-secs", "NaN"], "above 0"),
            (&["--latency-ms", "1.5"], "milliseconds"),
            (&["--faults", "busy"], "NAME=FRACTION"),
            (&["--faults", "busy=2"], "from 0 to 1"),
            (&["--faults", "busy=0.6,reset=0.6"], "more than 1"),
            (&["--faults", "slow=0.1"], "not a fault"),
            (&["--faults", "delay:soon=0.1"], "milliseconds"),
            (&["--rate-limit", "/wxa/a"], "KEY=VALUE"),
            (&["--rate-limit", "wxa/a=1/1"], "PATH or PATH@APPID"),
            (&["--rate-limit", "/wxa/a@=1/1"], "PATH or PATH@APPID"),
            (&["--rate-limit", "/wxa/a=20"], "CALLS/SECONDS"),
            (&["--component-rate-limit", "/wxa/a=1/0"], "above 0"),
            (&["--daily-limit", "/wxa/a=many"], "whole number"),
            (&["--user-rate-limit", "100"], "CALLS/SECONDS"),
            (&["--day-secs", "0"], "above 0"),
            (&["--no-call-log=yes"], "unknown argument"),
            (&["--quota", "3"], "unknown argument"),
            (&["serve"], "unknown argument"),
        ];
        for (args, expected) in cases {
            let problem = parse(args).unwrap_err();
            assert!(problem.contains(expected), "{args:?}: {problem}");
        }
    }
}
