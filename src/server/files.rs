//! The process's open-file limit, which bounds how many connections can be held.

use crate::config::{ConfigError, ConnectionLimits};

/// Open files kept back from client connections: the listener, the database pool, outbound
/// HTTP (JWKS, Stripe, Twilio, OTLP), the runtime's own descriptors, logs and the TLS files.
pub const RESERVED_FILES: u64 = 128;

/// What an open-file limit leaves of the connection cap.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    /// The cap and [`RESERVED_FILES`] fit under the limit (or there is none).
    Holds,
    /// The default cap does not fit: this many connections do.
    Lowered(usize),
}

/// The rule `serve` applies to its connection cap under the open-file `limit` (`None`: none
/// known): the cap plus [`RESERVED_FILES`] must fit; a cap left at its default is lowered to
/// fit (nothing is required to start), one set by `HTTP_MAX_CONNECTIONS` that does not fit is a
/// configuration error, and so is a limit that leaves no file for any connection.
/// `edgegate check` applies it too.
pub fn fit_connections(limits: &ConnectionLimits, limit: Option<u64>) -> Result<Fit, ConfigError> {
    let needed = (limits.max_connections as u64).saturating_add(RESERVED_FILES);
    match limit {
        Some(limit) if limit < needed && !limits.max_connections_set && limit > RESERVED_FILES => {
            Ok(Fit::Lowered(
                usize::try_from(limit - RESERVED_FILES).unwrap_or(usize::MAX),
            ))
        }
        // Nothing to lower a default cap to: the limit is at fault, not a variable never set.
        Some(limit) if limit < needed && !limits.max_connections_set => Err(ConfigError::new(
            "RLIMIT_NOFILE",
            format!(
                "(the open-file limit) of {limit} leaves no file for connections: \
                 {RESERVED_FILES} are kept for the database and outbound clients; raise it \
                 (ulimit -n)"
            ),
        )),
        Some(limit) if limit < needed => Err(ConfigError::new(
            "HTTP_MAX_CONNECTIONS",
            format!(
                "must be at most {} under this process's open-file limit (RLIMIT_NOFILE) of \
                 {limit}, which also keeps {RESERVED_FILES} files for the database and outbound \
                 clients: lower HTTP_MAX_CONNECTIONS or raise the limit (ulimit -n)",
                limit.saturating_sub(RESERVED_FILES)
            ),
        )),
        _ => Ok(Fit::Holds),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, then applies [`fit_connections`]: a
/// default cap that does not fit is lowered, with a warning. Returns the limit now in force.
pub fn raise_file_limit(limits: &mut ConnectionLimits) -> Result<u64, ConfigError> {
    let limit = raise_soft_limit();
    if let Fit::Lowered(fits) = fit_connections(limits, limit)? {
        tracing::warn!(
            "the open-file limit (RLIMIT_NOFILE) of {} holds {fits} connections, not the \
             default {}, with {RESERVED_FILES} files kept for the database and outbound \
             clients: serving at most {fits} (raise the limit with ulimit -n, or set \
             HTTP_MAX_CONNECTIONS)",
            limit.unwrap_or(u64::MAX),
            limits.max_connections
        );
        limits.max_connections = fits;
    }
    // No limit known (or none at all): nothing to check against.
    Ok(limit.unwrap_or(u64::MAX))
}

/// The open-file limit `serve` would run under (it raises the soft limit to the hard one), read
/// without changing anything. `None`: unlimited, or not known.
#[cfg(unix)]
pub fn serve_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum
}

#[cfg(not(unix))]
pub fn serve_file_limit() -> Option<u64> {
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, set: bool) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_connections_set: set,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn a_default_cap_is_lowered_and_a_set_one_is_refused() {
        assert_eq!(fit_connections(&limits(4096, false), None), Ok(Fit::Holds));
        assert_eq!(
            fit_connections(&limits(4096, false), Some(4096 + RESERVED_FILES)),
            Ok(Fit::Holds)
        );
        assert_eq!(
            fit_connections(&limits(4096, false), Some(1024)),
            Ok(Fit::Lowered(1024 - 128))
        );
        let err = fit_connections(&limits(4096, true), Some(1024)).unwrap_err();
        assert_eq!(err.variable, "HTTP_MAX_CONNECTIONS");
        assert!(err.rule.contains("at most 896"), "{err}");
    }

    /// With `HTTP_MAX_CONNECTIONS` unset, a limit that holds no connection at all is the limit's
    /// fault: the message must not send the operator to a variable they never set.
    #[test]
    fn a_limit_too_low_for_any_connection_is_named_when_the_cap_is_the_default() {
        for limit in [64, RESERVED_FILES] {
            let err = fit_connections(&limits(4096, false), Some(limit)).unwrap_err();
            assert_eq!(err.variable, "RLIMIT_NOFILE", "{err}");
            assert!(err.rule.contains(&limit.to_string()), "{err}");
            assert!(!err.to_string().contains("HTTP_MAX_CONNECTIONS"), "{err}");
        }
    }
}
