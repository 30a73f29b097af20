//! `wxgate-relay`: [`DelayRelay`] as a process of its own, for scripts that put a peer at a
//! distance on one machine (`deploy/datacentre.sh`: Redis a millisecond away from the
//! replicas, WeChat tens of milliseconds; `benches/load/compare.sh`: a Redis at a distance).
//!
//! It prints `relaying LISTEN -> TARGET (...)` once its port is bound, then relays until it
//! is killed. A command line it cannot understand exits 64 with the usage.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use wxgate_stand_in::{Delay, DelayRelay};

const USAGE: &str = "\
usage: wxgate-relay --listen ADDR --to ADDR [options]

Relays every TCP connection made to --listen to --to, holding each chunk of bytes for a delay
drawn for it (base ± jitter, uniformly), each direction on its own; a stream's bytes keep
their order whatever the jitter.

  --listen ADDR             address to listen on, such as 10.0.0.1:6379 (port 0: a free one)
  --to ADDR                 address to relay to, such as 127.0.0.1:6379
  --delay-ms MS             delay of what the client sends, may be fractional (default 0)
  --jitter-ms MS            its largest deviation either way (default 0)
  --reverse-delay-ms MS     delay of what the target answers (default: --delay-ms)
  --reverse-jitter-ms MS    its jitter (default: --jitter-ms)
  -h, --help                this text";

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
            eprintln!("wxgate-relay: {problem}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let relay = match DelayRelay::start(args.listen, args.to, args.forward, args.reverse) {
        Ok(relay) => relay,
        Err(error) => {
            eprintln!("wxgate-relay: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // Best effort: a reader that closed stdout must not stop the relaying.
    let _ = writeln!(
        std::io::stdout().lock(),
        "relaying {} -> {} (forward {}, reverse {})",
        relay.addr(),
        relay.target(),
        args.forward,
        args.reverse
    )
    .and_then(|()| std::io::stdout().flush());
    loop {
        std::thread::park();
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    forward: Delay,
    reverse: Delay,
}

impl Args {
    /// The arguments after the program name; `Ok(None)` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
        let (mut listen, mut to) = (None, None);
        let (mut delay, mut jitter) = (Duration::ZERO, Duration::ZERO);
        let (mut reverse_delay, mut reverse_jitter) = (None, None);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // `--name value` and `--name=value` alike.
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = || match inline {
                Some(value) => Ok(value.to_owned()),
                None => args.next().ok_or_else(|| format!("{name} needs a value")),
            };
            match name.as_str() {
                "-h" | "--help" => return Ok(None),
                "--listen" => listen = Some(address(&name, &value()?)?),
                "--to" => to = Some(address(&name, &value()?)?),
                "--delay-ms" => delay = millis(&name, &value()?)?,
                "--jitter-ms" => jitter = millis(&name, &value()?)?,
                "--reverse-delay-ms" => reverse_delay = Some(millis(&name, &value()?)?),
                "--reverse-jitter-ms" => reverse_jitter = Some(millis(&name, &value()?)?),
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        let forward = Delay::new(delay, jitter);
        let reverse = Delay::new(
            reverse_delay.unwrap_or(delay),
            reverse_jitter.unwrap_or(jitter),
        );
        for (flag, delay) in [("--jitter-ms", forward), ("--reverse-jitter-ms", reverse)] {
            if delay.jitter > delay.base {
                return Err(format!(
                    "{flag} ({}) is larger than the delay ({}): a delay cannot be negative",
                    delay.jitter.as_secs_f64() * 1000.0,
                    delay.base.as_secs_f64() * 1000.0
                ));
            }
        }
        Ok(Some(Args {
            listen: listen.ok_or("--listen is required")?,
            to: to.ok_or("--to is required")?,
            forward,
            reverse,
        }))
    }
}

fn address(name: &str, text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{name}: {text:?} is not an address such as 127.0.0.1:6379"))
}

fn millis(name: &str, text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|ms| *ms >= 0.0)
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
        .ok_or_else(|| format!("{name}: {text:?} is not a number of milliseconds, 0 or more"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        Args::parse(args.iter().map(|arg| (*arg).to_owned()))
    }

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1000.0)
    }

    #[test]
    fn the_reverse_direction_gets_the_forward_delay_unless_told() {
        let args = parse(&[
            "--listen",
            "10.0.0.1:6379",
            "--to=127.0.0.1:7001",
            "--delay-ms",
            "1",
            "--jitter-ms=0.3",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            args,
            Args {
                listen: "10.0.0.1:6379".parse().unwrap(),
                to: "127.0.0.1:7001".parse().unwrap(),
                forward: Delay::new(ms(1.0), ms(0.3)),
                reverse: Delay::new(ms(1.0), ms(0.3)),
            }
        );
        let args = parse(&[
            "--listen=127.0.0.1:0",
            "--to=127.0.0.1:7001",
            "--delay-ms=15",
            "--reverse-delay-ms=20",
            "--reverse-jitter-ms=2",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(args.forward, Delay::fixed(ms(15.0)));
        assert_eq!(args.reverse, Delay::new(ms(20.0), ms(2.0)));
        assert_eq!(parse(&["--help"]).unwrap(), None);
    }

    #[test]
    fn a_command_line_it_cannot_use_is_refused_with_the_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--listen is required"),
            (&["--listen", "127.0.0.1:0"], "--to is required"),
            (&["--listen", "localhost"], "not an address"),
            (&["--listen"], "--listen needs a value"),
            (&["--delay-ms", "-1"], "0 or more"),
            (&["--jitter-ms", "soon"], "0 or more"),
            (
                &["--listen=127.0.0.1:0", "--to=127.0.0.1:1", "--jitter-ms=1"],
                "--jitter-ms (1) is larger than the delay (0)",
            ),
            (
                &[
                    "--listen=127.0.0.1:0",
                    "--to=127.0.0.1:1",
                    "--delay-ms=2",
                    "--jitter-ms=2",
                    "--reverse-delay-ms=1",
                ],
                "--reverse-jitter-ms (2) is larger",
            ),
            (&["--delay", "1"], "unknown argument"),
        ];
        for (args, expected) in cases {
            let problem = parse(args).unwrap_err();
            assert!(problem.contains(expected), "{args:?}: {problem}");
        }
    }
}
