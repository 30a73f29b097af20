//! The `wxgate` binary: reads the command line, sets up logging, loads the configuration
//! (exit 64 if it is invalid, before any port is bound), and runs the proxy until SIGTERM or
//! SIGINT; or runs `wxgate demo` (see `wxgate::demo`).

use std::path::PathBuf;
use std::process::ExitCode;

use wxgate::config::{CheckedConfig, Config, EXIT_INVALID_CONFIG};
use wxgate::demo::DemoOptions;

/// jemalloc, not the system allocator: a request allocates a few dozen short-lived blocks
/// while the code cache keeps millions of small long-lived ones, and glibc's malloc spends a
/// tenth of a request's CPU on that mix (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const USAGE: &str = "\
usage:
  wxgate [--config PATH]                serve (default config: ./config.toml)
  wxgate check-config [--config PATH]   validate, print the effective configuration (secrets masked)
  wxgate demo [--seconds N] [--keep-running] [--listen ADDR] [--admin-listen ADDR]
                                        a WeChat stand-in, wxgate in front of it and N s of load
                                        (default 20), then a table; no credentials or internet
                                        needed. Default ports 127.0.0.1:8080 and :9090 (port 0
                                        picks a free one). --keep-running serves until Ctrl-C.
                                        Exits 1 if its numbers do not add up.
  wxgate --help | --version

Logging: RUST_LOG (default \"info\", for demo \"warn,wxgate::server=info\";
\"wxgate::access=off\" silences the per-request lines).";

enum Command {
    Serve(PathBuf),
    CheckConfig(PathBuf),
    Demo(DemoOptions),
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut command = None;
    let mut config = PathBuf::from("config.toml");
    let mut config_given = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--config needs a path")?;
                config_given = true;
            }
            _ if arg.starts_with("--config=") => {
                config = PathBuf::from(&arg["--config=".len()..]);
                config_given = true;
            }
            "check-config" if command.is_none() => command = Some("check-config"),
            "demo" if command.is_none() && !config_given => return parse_demo_args(args),
            "demo" if command.is_none() => return Err("demo takes no --config".into()),
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
    init_tracing(match command {
        // The per-request log lines would drown the demo's progress line.
        Command::Demo(_) => "warn,wxgate::server=info",
        _ => "info",
    });
    match command {
        Command::CheckConfig(path) => match CheckedConfig::load(&path) {
            Ok(checked) => {
                println!("# {}: valid\n{}", path.display(), checked.to_toml());
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
        Command::Demo(options) => demo(options),
    }
}

/// The arguments after `demo`.
fn parse_demo_args(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut options = DemoOptions::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag.as_str() {
            "--seconds" => {
                let text = value("a number of seconds")?;
                let seconds = text
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .ok_or_else(|| {
                        format!(
                            "--seconds: {text:?} is not a whole number of seconds from 1 to 86400"
                        )
                    })?;
                options.duration = std::time::Duration::from_secs(seconds);
            }
            "--listen" => options.listen = socket_addr(&flag, &value("an address")?)?,
            "--admin-listen" => options.admin_listen = socket_addr(&flag, &value("an address")?)?,
            "--keep-running" if inline.is_none() => options.keep_running = true,
            "--help" | "-h" => return Err(String::new()),
            _ => return Err(format!("demo: unexpected argument {flag:?}")),
        }
    }
    Ok(Command::Demo(options))
}

fn socket_addr(flag: &str, text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not an address such as 127.0.0.1:8080"))
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

fn demo(options: DemoOptions) -> ExitCode {
    block_on(async move {
        match wxgate::demo::run(options, shutdown_signal()).await {
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

fn serve(config: Config) -> ExitCode {
    block_on(async move {
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

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
