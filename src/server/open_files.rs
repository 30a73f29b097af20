//! The process's open-files limit (`RLIMIT_NOFILE`) and the cap on client connections it
//! allows.
//!
//! Every client connection, every upstream connection and every admin connection is a file
//! descriptor. When the process runs out, `accept` fails for every new client, however well
//! behaved, until some descriptor is freed: the cap on client connections must sit below the
//! limit, with room left for what the process needs besides them. The soft limit is raised
//! to the hard one at start (many systems start services at a soft 1024 under a hard limit
//! far above it).

/// Descriptors kept for everything but client and upstream connections: stdio, the two
/// listeners, the runtime's epoll and wakers, the admin port's connections (at most
/// [`super::ADMIN_MAX_CONNECTIONS`]), Redis, and the `/proc` files read for the process
/// metrics.
const RESERVED: u64 = 64;

/// Raises the soft open-files limit to the hard one and returns the soft limit in force
/// (`None`: no limit, or none that could be read). Logs what it found.
pub(crate) fn raise_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        // RLIM_INFINITY (or a platform without the limit).
        Ok(u64::MAX) => {
            tracing::info!("open files: no limit");
            None
        }
        Ok(limit) => {
            tracing::info!(limit, "open files limit");
            Some(limit)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the open-files limit");
            None
        }
    }
}

/// The cap on client connections: the configured one, or less when the open-files limit
/// could not hold it. Half of what the reserve leaves goes to client connections, half to
/// upstream connections: each client connection with a request in flight may hold one
/// upstream connection, so clients alone must not be able to take every descriptor.
pub(crate) fn connection_limit(configured: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return configured;
    };
    let fits = open_files.saturating_sub(RESERVED) / 2;
    configured
        .min(usize::try_from(fits).unwrap_or(usize::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_upstream_and_the_reserve() {
        assert_eq!(connection_limit(10_000, None), 10_000);
        assert_eq!(connection_limit(10_000, Some(1_048_576)), 10_000);
        assert_eq!(connection_limit(10_000, Some(1024)), 480);
        assert_eq!(connection_limit(10_000, Some(256)), 96);
        assert_eq!(connection_limit(50, Some(256)), 50);
        // Even a limit below the reserve admits a client.
        assert_eq!(connection_limit(10_000, Some(16)), 1);
    }
}
