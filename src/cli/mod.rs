//! The command line: what `wxgate` is asked to do ([`Cli`], read by clap) and each command's
//! body, so that the binary only parses and hands over: serve (the default), check-config,
//! reload ([`reload`]), quota ([`quota`]) and demo ([`demo`], with the `demo` feature);
//! [`admin`] is how reload and quota reach a running wxgate.
//!
//! Every command that reads the configuration reads it first, and exits 64 with every
//! problem before anything else happens (no port bound, nothing sent).

mod admin;
#[cfg(feature = "demo")]
pub mod demo;
mod quota;
mod reload;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue};
use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{CheckedConfig, Config, EXIT_INVALID_CONFIG};
use crate::server::{run_reloadable, Listeners};

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
pub struct Cli {
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
    CheckConfig {
        /// Also connect to the Redis of the cluster section (its TLS, password and PING,
        /// within 2 s) and say why it cannot be used if it cannot: exit 1 then.
        #[arg(long)]
        connect: bool,
    },
    /// Ask the wxgate serving this configuration to read it again (POST /-/reload on its
    /// admin port; `kill -HUP` does the same). Prints what needs a restart, or every problem
    /// of a file it refused; exit 1 if refused or unreachable.
    Reload,
    /// Print the quota table of the wxgate serving this configuration (GET /quota on its
    /// admin port): every (appid, API) with recent traffic, the limit in force and its
    /// source (config, wechat, learned, default), the window, the calls this window, callers
    /// waiting, a 45011 pause, the daily quota where WeChat stated one; exit 1 if
    /// unreachable.
    Quota,
    /// A WeChat stand-in, wxgate in front of it and N s of load, then a table.
    ///
    /// No credentials or internet needed. Port 0 picks a free port. Exits 1 if its numbers do
    /// not add up.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

impl Cli {
    /// Reads the command line. Every usage error ends with the usage of the command it is
    /// about (clap leaves it out after a bad value).
    pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
        let args: Vec<OsString> = args.into_iter().collect();
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

    /// Runs the command; its exit status.
    pub fn run(self) -> ExitCode {
        let config_path = self.config.as_deref().unwrap_or(Path::new("config.toml"));
        match self.command.unwrap_or(Command::Serve) {
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
                    Some(checked) => reload::reload(checked.config.server.admin_listen),
                    None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
                }
            }
            Command::Quota => {
                init_tracing("info", false);
                match load(config_path) {
                    Some(checked) => quota::quota(checked.config.server.admin_listen),
                    None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
                }
            }
            Command::CheckConfig { connect } => {
                init_tracing("info", false);
                match load(config_path) {
                    Some(checked) => {
                        println!("# {}: valid", config_path.display());
                        if let Some(cluster) = &checked.config.cluster {
                            println!("# [cluster]: {}", cluster.redis.describe());
                        }
                        println!("{}", checked.to_toml());
                        if connect {
                            connect_to_redis(&checked.config)
                        } else {
                            ExitCode::SUCCESS
                        }
                    }
                    None => ExitCode::from(EXIT_INVALID_CONFIG as u8),
                }
            }
            #[cfg(feature = "demo")]
            Command::Demo(args) => {
                if self.config.is_some() {
                    return usage_error(&demo::takes_no_config());
                }
                init_tracing(demo::LOG_FILTER, false);
                demo::run_command(args.into())
            }
        }
    }
}

/// Prints clap's message (help and version on stdout, exit 0; a usage error on stderr with
/// the usage line, exit 64).
pub fn usage_error(error: &clap::Error) -> ExitCode {
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

/// How long `check-config --connect` gives Redis to set a connection up and answer.
const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// `check-config --connect`: tries `[cluster]`'s Redis on a connection of its own. Exit 0 when
/// it answers (or there is no `[cluster]`), 1 with the cause when it cannot be used.
fn connect_to_redis(config: &Config) -> ExitCode {
    let Some(cluster) = &config.cluster else {
        println!("# no [cluster]: no Redis to connect to");
        return ExitCode::SUCCESS;
    };
    let target = &cluster.redis;
    let form = target.describe();
    block_on(async move {
        match crate::cluster::try_connection(target, CONNECT_WITHIN).await {
            Ok(took) => {
                println!("# Redis answered: {form} (PING in {} ms)", took.as_millis());
                ExitCode::SUCCESS
            }
            Err(cause) => {
                eprintln!("wxgate: cannot use Redis ({form}): {}", cause.describe());
                ExitCode::FAILURE
            }
        }
    })
}

/// `wxgate serve`: binds the configured listeners and serves until SIGTERM or SIGINT,
/// reading the file again on `SIGHUP` and `POST /-/reload`.
fn serve(config: Config, path: &Path) -> ExitCode {
    block_on(async move {
        let listeners = match Listeners::bind(&config.server).await {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(%error, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        let path = Some(path.to_path_buf());
        match run_reloadable(listeners, config, path, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "wxgate stopped");
                ExitCode::FAILURE
            }
        }
    })
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
    use crate::cli::demo::DemoOptions;

    fn parse_from(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_args(
            std::iter::once("wxgate")
                .chain(args.iter().copied())
                .map(OsString::from),
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
                matches!(cli.command, Some(Command::CheckConfig { connect: false })),
                "{args:?}"
            );
            assert_eq!(cli.config, Some(PathBuf::from("a.toml")), "{args:?}");
        }
        assert!(matches!(
            parse_from(&["check-config", "--connect"]).unwrap().command,
            Some(Command::CheckConfig { connect: true })
        ));
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
