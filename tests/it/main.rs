//! wxgate's integration tests, one binary (the crate links once for all of them): each
//! module drives one surface over real HTTP on loopback, against the WeChat stand-in, with
//! `support` to start wxgates, stand-ins, Redis servers and clients.

mod support;

mod allow;
mod binary;
mod cluster_codes;
mod cluster_forgery;
mod cluster_quota;
mod cluster_topologies;
mod cluster_unusable;
mod code_exchange;
mod connections;
#[cfg(feature = "demo")]
mod demo;
mod hardening;
mod limits;
mod passthrough;
mod quota;
mod reload;
mod server_tls;
mod token_cache;
mod token_cache_cluster;
mod upstream_answers;
mod upstream_limits;
mod upstream_pool;
mod upstream_tls;
