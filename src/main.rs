//! The `wxgate` binary: reads the command line, sets up logging, loads the configuration
//! (exit 64 if it is invalid, before any port is bound), and runs the proxy until SIGTERM or
//! SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use wxgate::config::{Config, EXIT_INVALID_CONFIG};

const USAGE: &str = "\
usage:
  wxgate [--config PATH]                serve (default config: ./config.toml)
  wxgate check-config [--config PATH]   validate, print the effective configuration (secrets masked)
  wxgate --help | --version

Logging: RUST_LOG (default \"info\"; \"wxgate::access=off\" silences the per-request lines).";

enum Command {
    Serve(PathBuf),
    CheckConfig(PathBuf),
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut command = None;
    let mut config = PathBuf::from("config.toml");
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--config needs a path")?;
            }
            _ if arg.starts_with("--config=") => {
                config = PathBuf::from(&arg["--config=".len()..]);
            }
            "check-config" if command.is_none() => command = Some("check-config"),
            "serve" if command.is_none() => command = Some("serve"),
            "--help" | "-h" => return Err(String::new()),
            "--version" | "-V" => {
                println!("wxgate {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(match command {
        Some("check-config") => Command::CheckConfig(config),
        _ => Command::Serve(config),
    })
}

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(problem) if problem.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("wxgate: {problem}\n{USAGE}");
            return ExitCode::from(EXIT_INVALID_CONFIG as u8);
        }
    };
    init_tracing();
    match command {
        Command::CheckConfig(path) => match Config::load(&path) {
            Ok(config) => {
                println!("# {}: valid\n{}", path.display(), config.to_toml_masked());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("wxgate: {}: {errors}", path.display());
                ExitCode::from(EXIT_INVALID_CONFIG as u8)
            }
        },
        Command::Serve(path) => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("wxgate: {}: {errors}", path.display());
                    return ExitCode::from(EXIT_INVALID_CONFIG as u8);
                }
            };
            serve(config)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wxgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listeners = match wxgate::Listeners::bind(&config.server).await {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(%error, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        match wxgate::run(listeners, config, shutdown_signal()).await {
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
