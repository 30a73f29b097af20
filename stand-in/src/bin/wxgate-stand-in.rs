//! `wxgate-stand-in`: the stand-in for `api.weixin.qq.com` as a process of its own, for
//! scripts that run wxgate as a binary (`deploy/cluster-demo.sh`, `benches/load/soak.sh`): a
//! quota over a short window, a latency, faults drawn at random, and the calls per window on
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
    FaultMix, StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET, STATS_PATH,
};

const USAGE: &str = "\
usage: wxgate-stand-in [--listen ADDR] [--quota-per-window N] [--window-secs S]
                       [--latency-ms MS] [--faults MIX] [--no-call-log]

Serves a stand-in for api.weixin.qq.com (single-use codes, a per-(appid, API) quota over
windows aligned to the epoch, WeChat's errcodes) and, on GET /__stand_in/stats, the calls it
received per window as JSON.

  --listen ADDR           address to bind (default 127.0.0.1:0: a free loopback port)
  --quota-per-window N    calls per (appid, API) and window before 45011 (default: unlimited)
  --window-secs S         quota window in seconds, may be fractional (default 60)
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
         (appid, API) and {:?} window; latency {:?}; faults {}; stats on {}{STATS_PATH}",
        stand_in.addr(),
        args.window,
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

    fn config(&self) -> StandInConfig {
        StandInConfig {
            quota_per_window: self.quota_per_window,
            window: self.window,
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
