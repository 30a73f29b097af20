//! The `wxgate` binary: reads the command line (clap), sets up logging, loads the configuration
//! (exit 64 if it is invalid, before any port is bound), and runs the proxy until SIGTERM or
//! SIGINT; or runs `wxgate demo` (with the `demo` feature, on by default; see the
//! `wxgate-demo` crate).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue};
use clap::{CommandFactory, Parser, Subcommand};
use wxgate::{CheckedConfig, Config, EXIT_INVALID_CONFIG};

/// jemalloc, not the system allocator: a request allocates a few dozen short-lived blocks
/// while the code cache keeps millions of small long-lived ones, and glibc's malloc spends a
/// tenth of a request's CPU on that mix (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status of a command line that cannot be understood (`EX_USAGE`, as for an invalid
/// configuration; clap's own would be 2).
const EXIT_USAGE: u8 = 64;

/// A reverse proxy for api.weixin.qq.com: minute-quota safety, single-use code safety,
/// Prometheus metrics.
#[derive(Debug, Parser)]
#[command(
    name = "wxgate",
    version,
    after_help = "Logging: RUST_LOG (default \"info\", for demo \"warn,wxgate::server=info\"; \
                  \"wxgate::access=off\" silences the per-request lines)."
)]
struct Cli {
    /// The configuration file.
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// What to do; serving when none is given.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default): proxy and admin listeners until SIGTERM or SIGINT.
    Serve,
    /// Validate the configuration and print the effective one (defaults filled in, secrets
    /// masked); exit 64 with every problem if it is invalid.
    CheckConfig,
    /// Ask the wxgate serving this configuration to read it again (POST /-/reload on its
    /// admin port; `kill -HUP` does the same). Prints what needs a restart, or every problem
    /// of a file it refused; exit 1 if refused or unreachable.
    Reload,
    /// A WeChat stand-in, wxgate in front of it and N s of load, then a table.
    ///
    /// No credentials or internet needed. Port 0 picks a free port. Exits 1 if its numbers do
    /// not add up.
    #[cfg(feature = "demo")]
    Demo(demo_command::DemoArgs),
}

fn main() -> ExitCode {
    let Cli { config, command } = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let config_path = config.as_deref().unwrap_or(Path::new("config.toml"));
    match command.unwrap_or(Command::Serve) {
        Command::Serve => match load(config_path) {
            Some(checked) => {
                init_tracing(&checked.config.log.level, checked.config.log.json);
                serve(checked.config, config_path)
            }
            None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
        },
        Command::Reload => {
            init_tracing("info", false);
            match load(config_path) {
                Some(checked) => reload(checked.config.server.admin_listen),
                None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
            }
        }
        Command::CheckConfig => {
            init_tracing("info", false);
            match load(config_path) {
                Some(checked) => {
                    println!("# {}: valid\n{}", config_path.display(), checked.to_toml());
                    ExitCode::SUCCESS
                }
                None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            if config.is_some() {
                return usage_error(&demo_command::takes_no_config());
            }
            init_tracing(demo_command::LOG_FILTER, false);
            demo_command::run(args.into())
        }
    }
}

/// Parses the command line. Every usage error ends with the usage of the command it is
/// about, as the hand-written parser's did (clap leaves it out after a bad value).
fn parse(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(&args).map_err(|mut error| {
        if error.use_stderr() && error.get(ContextKind::Usage).is_none() {
            let mut cli = Cli::command();
            cli.build();
            let subcommand = args.iter().skip(1).find_map(|arg| {
                let name = arg.to_str()?;
                cli.find_subcommand(name).map(|_| name.to_owned())
            });
            let usage = match subcommand.and_then(|name| cli.find_subcommand_mut(name)) {
                Some(subcommand) => subcommand.render_usage(),
                None => cli.render_usage(),
            };
            error.insert(ContextKind::Usage, ContextValue::StyledStr(usage));
        }
        error
    })
}

/// Prints clap's message (help and version on stdout, exit 0; a usage error on stderr with
/// the usage line, exit 64).
fn usage_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Reads and validates the configuration, printing every problem if it is invalid.
fn load(path: &Path) -> Option<CheckedConfig> {
    CheckedConfig::load(path)
        .map_err(|errors| eprintln!("wxgate: {}: {errors}", path.display()))
        .ok()
}

/// Runs `future` on a multi-threaded runtime (one worker per core the process may use).
fn block_on(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => {
            eprintln!("wxgate: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `wxgate demo` (see `wxgate::demo`): its arguments and its run, together so that the demo
/// can be left out of the binary in one place.
#[cfg(feature = "demo")]
mod demo_command {
    use std::net::SocketAddr;
    use std::process::ExitCode;
    use std::time::Duration;

    use clap::{Args, CommandFactory};
    use wxgate::DemoOptions;

    /// The log filter unless `RUST_LOG` is set: per-request lines would drown the demo's
    /// progress line.
    pub const LOG_FILTER: &str = "warn,wxgate::server=info";

    /// `wxgate demo`'s options; the defaults are [`DemoOptions::default`]'s.
    #[derive(Debug, Args)]
    pub struct DemoArgs {
        /// How long the load runs, in seconds.
        #[arg(long, value_name = "N", default_value_t = DemoOptions::default().duration.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: u64,
        /// Serve on after the table, until Ctrl-C or SIGTERM.
        #[arg(long)]
        keep_running: bool,
        /// wxgate's proxy address.
        #[arg(long, value_name = "ADDR", default_value_t = DemoOptions::default().listen)]
        listen: SocketAddr,
        /// wxgate's admin address (/metrics).
        #[arg(long, value_name = "ADDR", default_value_t = DemoOptions::default().admin_listen)]
        admin_listen: SocketAddr,
    }

    impl From<DemoArgs> for DemoOptions {
        fn from(args: DemoArgs) -> DemoOptions {
            DemoOptions {
                duration: Duration::from_secs(args.seconds),
                keep_running: args.keep_running,
                listen: args.listen,
                admin_listen: args.admin_listen,
                ..DemoOptions::default()
            }
        }
    }

    /// The usage error for `demo --config`: the demo writes its own configuration.
    pub fn takes_no_config() -> clap::Error {
        super::Cli::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            "demo takes no --config: it writes its own configuration",
        )
    }

    /// Runs the demo; exit 1 if it could not run or its numbers do not add up.
    pub fn run(options: DemoOptions) -> ExitCode {
        super::block_on(async move {
            match wxgate::run_demo(options, super::shutdown_signal()).await {
                Ok(report) if report.adds_up() && report.disagreements().is_empty() => {
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("wxgate demo: the numbers do not add up (see the table)");
                    ExitCode::FAILURE
                }
                Err(error) => {
                    eprintln!("wxgate demo: {error}");
                    ExitCode::FAILURE
                }
            }
        })
    }
}

/// `wxgate reload`: one `POST /-/reload` to the admin port, over a plain HTTP/1.1 exchange
/// (the product carries no HTTP client library for this; the admin port is local).
fn reload(admin: std::net::SocketAddr) -> ExitCode {
    use std::io::{Read, Write};
    let target = match admin.ip() {
        ip if ip.is_unspecified() => std::net::SocketAddr::new(
            if ip.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            admin.port(),
        ),
        _ => admin,
    };
    let exchange = || -> std::io::Result<String> {
        let mut stream =
            std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(5))?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        stream.write_all(
            b"POST /-/reload HTTP/1.1\r\nHost: wxgate\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    match exchange() {
        Ok(answer) => {
            let ok = answer.starts_with("HTTP/1.1 200");
            let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
            if ok {
                print!("{body}");
                ExitCode::SUCCESS
            } else {
                eprint!("wxgate reload: {body}");
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("wxgate reload: cannot reach the admin port {target}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, path: &Path) -> ExitCode {
    block_on(async move {
        let listeners = match wxgate::Listeners::bind(&config.server).await {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(%error, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        let path = Some(path.to_path_buf());
        match wxgate::run_reloadable(listeners, config, path, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "wxgate stopped");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; SIGINT only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default`; as one JSON object per line
/// (fields at the top level, for a log shipper) with `json`.
fn init_tracing(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if json {
        log.json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        log.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "demo")]
    use wxgate::DemoOptions;

    fn parse_from(args: &[&str]) -> Result<Cli, clap::Error> {
        parse(
            std::iter::once("wxgate")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect(),
        )
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_before_or_after_the_subcommand() {
        for args in [
            &["check-config", "--config", "a.toml"][..],
            &["--config", "a.toml", "check-config"],
            &["-c", "a.toml", "check-config"],
            &["check-config", "--config=a.toml"],
        ] {
            let cli = parse_from(args).unwrap();
            assert!(
                matches!(cli.command, Some(Command::CheckConfig)),
                "{args:?}"
            );
            assert_eq!(cli.config, Some(PathBuf::from("a.toml")), "{args:?}");
        }
        let serve = parse_from(&["--config", "b.toml"]).unwrap();
        assert!(serve.command.is_none());
        assert!(matches!(
            parse_from(&["serve"]).unwrap().command,
            Some(Command::Serve)
        ));
        assert!(parse_from(&[]).unwrap().config.is_none());
    }

    #[cfg(feature = "demo")]
    #[test]
    fn demo_defaults_are_the_demo_options_defaults() {
        let Some(Command::Demo(args)) = parse_from(&["demo"]).unwrap().command else {
            panic!("not the demo");
        };
        let (options, defaults) = (DemoOptions::from(args), DemoOptions::default());
        assert_eq!(options.duration, defaults.duration);
        assert_eq!(options.keep_running, defaults.keep_running);
        assert_eq!(options.listen, defaults.listen);
        assert_eq!(options.admin_listen, defaults.admin_listen);
        let Some(Command::Demo(args)) = parse_from(&[
            "demo",
            "--seconds",
            "3",
            "--keep-running",
            "--listen=127.0.0.1:0",
        ])
        .unwrap()
        .command
        else {
            panic!("not the demo");
        };
        let options = DemoOptions::from(args);
        assert_eq!(options.duration, std::time::Duration::from_secs(3));
        assert!(options.keep_running);
        assert_eq!(options.listen.port(), 0);
    }

    #[test]
    fn usage_errors_carry_the_usage_of_their_command() {
        let mut cases = vec![
            (
                &["check-config", "--surprise"][..],
                "Usage: wxgate check-config",
            ),
            (&["--surprise"], "Usage: wxgate [OPTIONS] [COMMAND]"),
        ];
        if cfg!(feature = "demo") {
            cases.push((&["demo", "--seconds", "0"], "Usage: wxgate demo [OPTIONS]"));
            cases.push((
                &["demo", "--listen", "localhost"],
                "Usage: wxgate demo [OPTIONS]",
            ));
        }
        for (args, usage) in cases {
            let error = parse_from(args).unwrap_err();
            assert!(error.use_stderr(), "{args:?}");
            let text = error.render().to_string();
            assert!(text.contains(usage), "{args:?}: {text}");
        }
        for args in [&["--help"][..], &["--version"]] {
            assert!(!parse_from(args).unwrap_err().use_stderr(), "{args:?}");
        }
        #[cfg(feature = "demo")]
        assert!(!parse_from(&["demo", "--help"]).unwrap_err().use_stderr());
    }
}
