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

#[cfg(test)]
mod tests {
    use crate::metrics::{Outcome, RetryReason};

    /// The demo reads wxgate's metrics by their label values and wxgate's cache header by its
    /// name, spelled in its own crate: they must be wxgate's.
    #[test]
    fn the_demo_reads_the_labels_and_header_wxgate_writes() {
        let ours: Vec<&str> = Outcome::ALL.iter().map(|o| o.label()).collect();
        let demo: Vec<&str> = wxgate_demo::Outcome::ALL
            .iter()
            .map(|o| o.label())
            .collect();
        assert_eq!(demo, ours);
        let ours: Vec<&str> = RetryReason::ALL.iter().map(|r| r.label()).collect();
        let demo: Vec<&str> = wxgate_demo::RetryReason::ALL
            .iter()
            .map(|r| r.label())
            .collect();
        assert_eq!(demo, ours);
        assert_eq!(
            wxgate_demo::contract::CACHE_HEADER,
            crate::proxy::CACHE_HEADER.as_str()
        );
        assert_eq!(
            wxgate_demo::contract::MINUTE_QUOTA,
            crate::wechat::MINUTE_QUOTA
        );
        assert_eq!(
            wxgate_demo::contract::SYSTEM_BUSY,
            crate::wechat::SYSTEM_BUSY
        );
    }
}
