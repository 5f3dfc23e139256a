//! Why a client request ended: the one vocabulary of every outcome limitlab shows.
//!
//! The decision log, `report.json`, the summary table, the HTML report, the
//! proxy's request log and its `/metrics` labels all spell a reason as
//! [`Reason::as_str`] does (kebab-case), and nothing else.

use serde::{Deserialize, Serialize};

/// Why a client request ended as it did, declared in the order of [`Reason::ALL`]
/// (so `reason as usize` indexes a table of them). Decided by the core alone: a driver
/// reports what happened on the wire, the core names the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Admitted, and the backend's answer (2xx or 3xx) reached the client.
    Ok,
    /// `rate-limit` or `rate-limit-by-key` refused the call: 429.
    RateLimit,
    /// `quota` or `quota-by-key` refused it for its calls: 403.
    Quota,
    /// `quota` or `quota-by-key` refused it for its bandwidth: 403.
    BandwidthQuota,
    /// A token limit's tokens per minute refused it: 429.
    TokenLimit,
    /// A token limit's token quota refused it: 403.
    TokenQuota,
    /// Admitted, and the backend's answer, an error status (4xx or 5xx, after
    /// any retries), reached the client.
    BackendError,
    /// Every candidate backend's circuit breaker was open: 503.
    NoBackend,
    /// The last attempt timed out: 504.
    Timeout,
    /// The last attempt could not connect, or its connection was reset: 500.
    TransportFailure,
    /// The last attempt's answer was not valid HTTP, or its body broke: 502.
    BadResponse,
    /// The client went away before its answer was over.
    ClientGone,
}

impl Reason {
    /// Every reason, in the order tables and plots show them.
    pub const ALL: [Reason; 12] = [
        Reason::Ok,
        Reason::RateLimit,
        Reason::Quota,
        Reason::BandwidthQuota,
        Reason::TokenLimit,
        Reason::TokenQuota,
        Reason::BackendError,
        Reason::NoBackend,
        Reason::Timeout,
        Reason::TransportFailure,
        Reason::BadResponse,
        Reason::ClientGone,
    ];

    /// The reason's one spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::BackendError => "backend-error",
            Reason::RateLimit => "rate-limit",
            Reason::Quota => "quota",
            Reason::BandwidthQuota => "bandwidth-quota",
            Reason::TokenLimit => "token-limit",
            Reason::TokenQuota => "token-quota",
            Reason::NoBackend => "no-backend",
            Reason::Timeout => "timeout",
            Reason::TransportFailure => "transport-failure",
            Reason::BadResponse => "bad-response",
            Reason::ClientGone => "client-gone",
        }
    }

    /// The reason spelled `name`, if any.
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether a limit refused the request before any backend saw it.
    pub const fn is_limit(self) -> bool {
        matches!(
            self,
            Reason::RateLimit | Reason::Quota | Reason::BandwidthQuota | Reason::TokenLimit | Reason::TokenQuota
        )
    }

    /// The reason of a backend answer with `status` that reached the client.
    pub const fn of_backend_status(status: u16) -> Reason {
        if status < 400 {
            Reason::Ok
        } else {
            Reason::BackendError
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn serde_and_as_str_spell_every_reason_alike_and_each_once() {
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            assert_eq!(Reason::from_name(reason.as_str()), Some(reason));
            assert_eq!(reason as usize, i, "ALL lists the reasons in their declared order");
            assert!(reason.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{reason:?}");
        }
        let mut names: Vec<_> = Reason::ALL.map(Reason::as_str).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
