//! The process's open-file limit, which bounds how many connections can be held.

use crate::config::{ConfigError, ConnectionLimits};

/// Open files kept back from client connections: the listener, the database pool, outbound
/// HTTP (JWKS, Stripe, Twilio, OTLP), the runtime's own descriptors, logs and the TLS files.
pub const RESERVED_FILES: u64 = 128;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, then checks that the connection cap plus
/// [`RESERVED_FILES`] fit under it: a cap left at its default is lowered to fit (with a
/// warning: nothing is required to start), one set by `HTTP_MAX_CONNECTIONS` that does not fit
/// is a configuration error. Returns the limit now in force.
pub fn raise_file_limit(limits: &mut ConnectionLimits) -> Result<u64, ConfigError> {
    let limit = raise_soft_limit();
    let needed = (limits.max_connections as u64).saturating_add(RESERVED_FILES);
    match limit {
        Some(limit) if limit < needed && !limits.max_connections_set && limit > RESERVED_FILES => {
            let fits = usize::try_from(limit - RESERVED_FILES).unwrap_or(usize::MAX);
            tracing::warn!(
                "the open-file limit (RLIMIT_NOFILE) of {limit} holds {fits} connections, not \
                 the default {}, with {RESERVED_FILES} files kept for the database and outbound \
                 clients: serving at most {fits} (raise the limit with ulimit -n, or set \
                 HTTP_MAX_CONNECTIONS)",
                limits.max_connections
            );
            limits.max_connections = fits;
            Ok(limit)
        }
        Some(limit) if limit < needed => Err(ConfigError::new(
            "HTTP_MAX_CONNECTIONS",
            format!(
                "must be at most {} under this process's open-file limit (RLIMIT_NOFILE) of \
                 {limit}, which also keeps {RESERVED_FILES} files for the database and outbound \
                 clients: lower HTTP_MAX_CONNECTIONS or raise the limit (ulimit -n)",
                limit.saturating_sub(RESERVED_FILES)
            ),
        )),
        Some(limit) => Ok(limit),
        // No limit known (or none at all): nothing to check against.
        None => Ok(u64::MAX),
    }
}

#[cfg(unix)]
fn raise_soft_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    // `None` is unlimited (RLIM_INFINITY).
    let mut limit = getrlimit(Resource::Nofile);
    let below_hard = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // A refusal (macOS caps the soft limit below an unlimited hard one) leaves the old
        // limit, which is then what is checked.
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current
}

#[cfg(not(unix))]
fn raise_soft_limit() -> Option<u64> {
    None
}
