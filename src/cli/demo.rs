//! `wxgate demo` (only with the `demo` feature): its options, its run, and the launcher
//! through which the demo starts this wxgate. The demo itself lives in the `wxgate-demo`
//! crate, which cannot depend on wxgate (this binary runs it), so wxgate hands it a
//! [`Launch`] that starts wxgate the way `wxgate serve` does, on the listeners and with the
//! configuration text the demo prepared.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory};
pub use wxgate_demo::{DemoError, DemoOptions, DemoReport};
use wxgate_demo::{Launch, LaunchError, ProxyStart};

use crate::config::Config;
use crate::server::{run, Listeners};

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
pub fn run_command(options: DemoOptions) -> ExitCode {
    super::block_on(async move {
        match run_demo(options, super::shutdown_signal()).await {
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

/// Runs `wxgate demo` with this wxgate: see [`wxgate_demo::run`].
pub async fn run_demo(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    wxgate_demo::run(options, launcher(), shutdown).await
}

/// Starts wxgate for the demo: parses [`ProxyStart::config_toml`] with the same loader as a
/// `config.toml` (every problem reported), serves on the demo's listeners until its shutdown
/// signal, then drains.
pub fn launcher() -> Launch {
    Box::new(|start: ProxyStart| {
        Box::pin(async move {
            let config = Config::from_toml_str(&start.config_toml)
                .map_err(|errors| LaunchError::Config(errors.to_string()))?;
            let listeners = Listeners {
                proxy: start.proxy,
                admin: start.admin,
            };
            run(listeners, config, start.shutdown)
                .await
                .map_err(|error| LaunchError::Run(error.to_string()))
        })
    })
}
