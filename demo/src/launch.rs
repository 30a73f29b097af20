//! How the demo starts wxgate without linking it: the caller passes a [`Launch`], a function
//! that takes a [`ProxyStart`] (the configuration as TOML text, the two listeners the demo
//! already bound, and a shutdown signal) and returns the future that serves until the signal.
//!
//! The demo binds the ports itself so that it knows the real addresses (port 0 picks a free
//! one) before wxgate starts, and can put them in the configuration and in what it prints.
//! wxgate's binary passes a launcher that parses the text with its own configuration loader
//! and calls its `run`; a test could pass one that starts a wxgate binary instead.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::DemoError;

/// Starts wxgate. Called once, from inside the demo's tokio runtime; the future it returns is
/// spawned on that runtime, must serve on the given listeners until
/// [`ProxyStart::shutdown`] completes, then drain and complete with how wxgate ended.
///
/// wxgate's own launcher (the `wxgate` crate's `demo` feature) validates the text with its
/// configuration loader and calls its `run`.
pub type Launch = Box<dyn FnOnce(ProxyStart) -> Serve + Send>;

/// The future of a launched wxgate: serves, and ends once shut down and drained.
pub type Serve = Pin<Box<dyn Future<Output = Result<(), LaunchError>> + Send>>;

/// Completes when the demo wants wxgate to stop accepting, drain and return.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a [`Launch`] gets: everything wxgate needs to serve in the demo.
pub struct ProxyStart {
    /// wxgate's configuration as `config.toml` text: the two addresses (those the listeners
    /// are bound to), the stand-in as upstream, and the demo's quotas, wait and hold limits.
    pub config_toml: String,
    /// The proxy listener, already bound (`server.listen` names its address).
    pub proxy: TcpListener,
    /// The admin listener (`/metrics`, `/readyz`), already bound (`server.admin_listen`).
    pub admin: TcpListener,
    /// Completes when wxgate should stop: after the table, or on the caller's shutdown with
    /// `--keep-running`, or when the demo fails.
    pub shutdown: Shutdown,
}

/// How a launched wxgate ended badly.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The configuration the demo built was refused (a bug, or impossible options).
    #[error("{0}")]
    Config(String),
    /// wxgate could not run, or stopped with an error.
    #[error("wxgate stopped: {0}")]
    Run(String),
}

/// wxgate running in a task of its own. Aborted if dropped before [`Serving::stop`] (an
/// error path), so that it never outlives the demo.
pub(crate) struct Serving {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), LaunchError>>,
}

impl Serving {
    /// Hands wxgate its configuration and listeners through `launch` and runs it in a task.
    pub(crate) fn start(
        launch: Launch,
        config_toml: String,
        proxy: TcpListener,
        admin: TcpListener,
    ) -> Serving {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(launch(ProxyStart {
            config_toml,
            proxy,
            admin,
            shutdown,
        }));
        Serving {
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting, drains, and returns how wxgate ended.
    pub(crate) async fn stop(mut self) -> Result<(), DemoError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.ended().await
    }

    async fn ended(&mut self) -> Result<(), DemoError> {
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(error) => Err(DemoError::Task(error.to_string())),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until wxgate's `/readyz` answers 200, or fails if wxgate stopped.
pub(crate) async fn wait_until_ready(
    client: &reqwest::Client,
    admin: SocketAddr,
    wxgate: &mut Serving,
) -> Result<(), DemoError> {
    let url = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if wxgate.task.is_finished() {
            wxgate.ended().await?;
            return Err(DemoError::Task("wxgate stopped at once".into()));
        }
        let ready = client
            .get(&url)
            .send()
            .await
            .is_ok_and(|answer| answer.status() == StatusCode::OK);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Metrics(format!("{url} never answered 200")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
