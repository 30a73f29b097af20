//! `wxgate demo`'s launcher (only with the `demo` feature): the demo itself lives in the
//! `wxgate-demo` crate, which cannot depend on wxgate (this binary runs it), so wxgate hands
//! it a [`Launch`] that starts wxgate the way `wxgate serve` does, on the listeners and with
//! the configuration text the demo prepared.

use std::future::Future;

pub use wxgate_demo::{DemoError, DemoOptions, DemoReport};
use wxgate_demo::{Launch, LaunchError, ProxyStart};

use crate::config::Config;
use crate::server::{run, Listeners};

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

/// Runs `wxgate demo` with this wxgate: see [`wxgate_demo::run`].
pub async fn run_demo(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    wxgate_demo::run(options, launcher(), shutdown).await
}
