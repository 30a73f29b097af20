//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/quota`, on a port of their own so
//! that a backend never reaches them through the proxy port.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::{Encoder, Registry, TextEncoder};

use super::reload::{Reloaded, Reloader, MAX_HUNG_READS, READ_DEADLINE};
use crate::cluster::{Cluster, ReplicaMode};
use crate::proxy::Proxy;

/// The most keys `GET /quota` lists (the busiest); it says how many more there are.
const MOST_KEYS: usize = 1000;

/// What the admin endpoints report.
pub struct Admin {
    registry: Registry,
    ready: AtomicBool,
    /// With `[cluster]`: `/readyz` says whether the replica counts with the others.
    cluster: Option<Arc<Cluster>>,
    /// Serving from a file: `POST /-/reload` reads it again.
    reloader: Option<Arc<Reloader>>,
    /// What `GET /quota` shows.
    proxy: Arc<Proxy>,
}

impl Admin {
    /// Admin endpoints over `registry` and `proxy`'s quotas; not ready until
    /// [`Admin::set_ready`].
    pub fn new(
        registry: Registry,
        cluster: Option<Arc<Cluster>>,
        reloader: Option<Arc<Reloader>>,
        proxy: Arc<Proxy>,
    ) -> Admin {
        Admin {
            registry,
            ready: AtomicBool::new(false),
            cluster,
            reloader,
            proxy,
        }
    }

    /// `GET /quota`: every (appid, API) with recent traffic, as JSON: `{"keys": [...],
    /// "omitted": N}` (see `quota::KeyRow`). Appids are shown as they are: the admin port is
    /// the operator's.
    fn quota(&self) -> Response<Full<Bytes>> {
        let (keys, omitted) = self.proxy.quota_table(MOST_KEYS);
        let body = serde_json::json!({ "keys": keys, "omitted": omitted });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    /// `/readyz`'s body when ready: a degraded replica still serves, so it stays ready (a
    /// load balancer must not take every replica out because Redis is down), and says so.
    fn ready_text(&self) -> &'static str {
        match self.cluster.as_ref().map(|cluster| cluster.mode()) {
            None | Some(ReplicaMode::Shared) => "ready\n",
            Some(ReplicaMode::Degraded { .. } | ReplicaMode::Resuming { .. }) => {
                "ready (degraded: Redis unavailable, quotas limited locally with this replica's share)\n"
            }
        }
    }

    /// `/readyz` answers 200 while `ready`, 503 otherwise (before serving, and while draining,
    /// so that a load balancer stops sending).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Answers one admin request.
    pub async fn handle<B>(
        self: Arc<Self>,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.uri().path() == "/-/reload" {
            return Ok(self.reload(request.method()).await);
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"));
        }
        Ok(match request.uri().path() {
            "/metrics" => {
                let mut body = Vec::with_capacity(16 * 1024);
                let encoder = TextEncoder::new();
                match encoder.encode(&self.registry.gather(), &mut body) {
                    Ok(()) => {
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static(prometheus::TEXT_FORMAT),
                        );
                        response
                    }
                    Err(error) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("metrics could not be encoded: {error}\n"),
                    ),
                }
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/quota" => self.quota(),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                text(StatusCode::OK, self.ready_text())
            }
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz, /quota\n",
            ),
        })
    }
}

impl Admin {
    /// `POST /-/reload` (Prometheus's habit): 200 and what needs a restart, or 400 and every
    /// problem of the file (the running configuration stays); 409 while another reload waits
    /// for its files, 503 when the files were not read in time.
    async fn reload(&self, method: &Method) -> Response<Full<Bytes>> {
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        }
        let Some(reloader) = &self.reloader else {
            return text(
                StatusCode::NOT_FOUND,
                "not serving from a file: nothing to reload\n",
            );
        };
        match reloader.reload().await {
            Reloaded::Applied { needs_restart } if needs_restart.is_empty() => {
                text(StatusCode::OK, "reloaded\n")
            }
            Reloaded::Applied { needs_restart } => text(
                StatusCode::OK,
                &format!(
                    "reloaded; kept until a restart: {}\n",
                    needs_restart.join(", ")
                ),
            ),
            Reloaded::Refused { problems } => text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "refused, the running configuration stays:\n  - {}\n",
                    problems.join("\n  - ")
                ),
            ),
            Reloaded::InProgress => text(
                StatusCode::CONFLICT,
                "a reload is in progress: this one did nothing; try again once it is answered\n",
            ),
            Reloaded::TimedOut => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "timed out: the configuration's files were not read within {} s (a FIFO, or a hung mount?); the running configuration stays\n",
                    READ_DEADLINE.as_secs()
                ),
            ),
            Reloaded::Hung => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "refused: {MAX_HUNG_READS} earlier reads of the configuration's files still hang (a FIFO, or a hung mount?); the running configuration stays; restart wxgate to reload\n"
                ),
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
