//! What a listener applies to each connection it accepts, as the configuration in force says
//! and a reload changes: who may connect (`server.allow`, proxy port only), the deadlines of
//! connections without a request, and the certificate of `[server.tls]`.
//!
//! The allow-list and the deadlines are one value behind an [`ArcSwap`], replaced whole by a
//! reload and read with one atomic load when a connection is accepted and when its watchdog
//! wakes: never per request. A connection keeps the deadlines it read at its accept until its
//! watchdog next wakes, so a reload reaches open connections at their next deadline.
//!
//! Whether TLS is on, like the addresses listened on, is fixed at start (the listener's
//! sockets and clients' URLs depend on it); a reload that changes it is told so by
//! `super::reload::merge`.

use std::net::IpAddr;

use arc_swap::ArcSwap;

use super::deadlines::Deadlines;
use super::tls::ServerTls;
use crate::config::{AllowList, ServerConfig};

/// The reloadable settings of one listener.
pub(crate) struct PortPolicy {
    /// The proxy port applies `server.allow` and `[server.tls]`; the admin port, bound to an
    /// address of its own for scrapers, only the deadlines.
    proxy_port: bool,
    settings: ArcSwap<PortSettings>,
    /// With `[server.tls]` (proxy port only): the acceptor and its certificate.
    tls: Option<ServerTls>,
}

/// The settings a reload replaces whole.
struct PortSettings {
    allow: AllowList,
    deadlines: Deadlines,
}

impl PortPolicy {
    /// The proxy port's policy under `server`.
    pub(crate) fn proxy(server: &ServerConfig) -> PortPolicy {
        PortPolicy {
            proxy_port: true,
            settings: ArcSwap::from_pointee(PortSettings::of(server, true)),
            tls: server.tls.as_ref().map(ServerTls::new),
        }
    }

    /// The admin port's policy under `server`: every address, plain HTTP.
    pub(crate) fn admin(server: &ServerConfig) -> PortPolicy {
        PortPolicy {
            proxy_port: false,
            settings: ArcSwap::from_pointee(PortSettings::of(server, false)),
            tls: None,
        }
    }

    /// Whether a client at `peer` may connect.
    pub(crate) fn allows(&self, peer: IpAddr) -> bool {
        self.settings.load().allow.allows(peer)
    }

    /// The deadlines of connections without a request in flight.
    pub(crate) fn deadlines(&self) -> Deadlines {
        self.settings.load().deadlines
    }

    /// With `[server.tls]`: the TLS side of the listener.
    pub(crate) fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// Applies a reloaded `[server]`: the allow-list and deadlines for connections accepted
    /// from now on (and the deadlines of open ones at their next check), the certificate for
    /// handshakes from now on. Turning TLS on or off is left to a restart.
    pub(crate) fn reconfigure(&self, server: &ServerConfig) {
        self.settings
            .store(PortSettings::of(server, self.proxy_port).into());
        if let (Some(tls), Some(config)) = (&self.tls, &server.tls) {
            tls.replace(config);
        }
    }
}

impl PortSettings {
    fn of(server: &ServerConfig, proxy_port: bool) -> PortSettings {
        PortSettings {
            allow: if proxy_port {
                server.allow.clone()
            } else {
                AllowList::everyone()
            },
            deadlines: Deadlines {
                head: server.request_head_timeout,
                idle: server.idle_timeout,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_reload_replaces_the_allow_list_and_deadlines_of_the_proxy_port_only() {
        let before = Config::from_toml_str("[server]\nallow = [\"10.0.0.0/8\"]\n").unwrap();
        let after = Config::from_toml_str(
            "[server]\nallow = [\"192.168.0.0/16\"]\nrequest_head_timeout_ms = 1234\n",
        )
        .unwrap();
        let proxy = PortPolicy::proxy(&before.server);
        let admin = PortPolicy::admin(&before.server);
        let (inside, outside) = ("10.1.1.1".parse().unwrap(), "192.168.1.1".parse().unwrap());
        assert!(proxy.allows(inside) && !proxy.allows(outside));
        assert!(admin.allows(outside));
        proxy.reconfigure(&after.server);
        admin.reconfigure(&after.server);
        assert!(!proxy.allows(inside) && proxy.allows(outside));
        assert!(admin.allows(inside));
        assert_eq!(proxy.deadlines().head.as_millis(), 1234);
        assert_eq!(admin.deadlines().head.as_millis(), 1234);
        assert!(proxy.tls().is_none());
    }
}
