//! Why a call was answered by a policy rather than by what it called: one
//! vocabulary for the gateway's `x-palisade-cause` header and JSON error body, its
//! routes' `fallback.on`, the tower layers' `PolicyError::cause`, logs and metric
//! labels.

/// Why a call was answered by a policy rather than by what it called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Cause {
    /// No route matched (404).
    NoRoute,
    /// A rate limit refused (429).
    RateLimited,
    /// The request body is larger than allowed (413).
    BodyTooLarge,
    /// The request could not be read, or is ambiguous: a malformed or truncated
    /// body, two `Host` headers, a path that climbs above the root (400).
    BadRequest,
    /// The client was too slow to send its request body (408).
    ClientTimeout,
    /// The circuit breaker refused: every candidate endpoint's is open (503).
    CircuitOpen,
    /// No endpoint is healthy, or the cluster is empty (503).
    NoHealthyEndpoint,
    /// The bulkhead is full (503).
    BulkheadFull,
    /// Load shedding refused it, to keep the work already accepted in time: an
    /// adaptive concurrency limit reached, or a load level that serves only more
    /// important requests (503).
    Shed,
    /// The total or per-attempt timeout passed (504).
    Timeout,
    /// The endpoint could not be connected to (502).
    ConnectError,
    /// The connection was reset or closed before an answer (502).
    #[cfg_attr(feature = "serde", serde(rename = "upstream_reset"))]
    Reset,
    /// The endpoint broke the protocol (502).
    ProtocolError,
    /// What was called failed with an error of its own, which the policy passes on
    /// (502 where an HTTP status stands for it).
    Upstream,
    /// A fault injected on purpose, by a chaos drill (503 unless the drill names
    /// another status).
    FaultInjected,
    /// The durable queue a request was to be stored in could not be reached (503).
    QueueUnavailable,
    /// A request with the same idempotency key is still running (409).
    IdempotencyConflict,
    /// The idempotency key was used with a different request (422).
    IdempotencyMismatch,
    /// The store of idempotency keys could not be reached; the request was not
    /// run (503).
    IdempotencyUnavailable,
    /// The request carries no valid credentials: no token, or a token that is
    /// malformed, expired, for another audience or badly signed (401).
    Unauthenticated,
    /// The request's credentials are valid but do not allow it: a token without
    /// the role or scope a rule needs, or a signed link that is altered, expired
    /// or for another client (403).
    Forbidden,
    /// The keys to check credentials with are not at hand yet (the issuer has not
    /// answered since start) (503).
    AuthUnavailable,
}

impl Cause {
    /// Every cause.
    pub const ALL: [Cause; 22] = [
        Cause::NoRoute,
        Cause::RateLimited,
        Cause::BodyTooLarge,
        Cause::BadRequest,
        Cause::ClientTimeout,
        Cause::CircuitOpen,
        Cause::NoHealthyEndpoint,
        Cause::BulkheadFull,
        Cause::Shed,
        Cause::Timeout,
        Cause::ConnectError,
        Cause::Reset,
        Cause::ProtocolError,
        Cause::Upstream,
        Cause::FaultInjected,
        Cause::QueueUnavailable,
        Cause::IdempotencyConflict,
        Cause::IdempotencyMismatch,
        Cause::IdempotencyUnavailable,
        Cause::Unauthenticated,
        Cause::Forbidden,
        Cause::AuthUnavailable,
    ];

    /// Its stable name: the value of `x-palisade-cause`, the name `fallback.on`
    /// takes, a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Cause::NoRoute => "no_route",
            Cause::RateLimited => "rate_limited",
            Cause::BodyTooLarge => "body_too_large",
            Cause::BadRequest => "bad_request",
            Cause::ClientTimeout => "client_timeout",
            Cause::CircuitOpen => "circuit_open",
            Cause::NoHealthyEndpoint => "no_healthy_endpoint",
            Cause::BulkheadFull => "bulkhead_full",
            Cause::Shed => "shed",
            Cause::Timeout => "timeout",
            Cause::ConnectError => "connect_error",
            Cause::Reset => "upstream_reset",
            Cause::ProtocolError => "protocol_error",
            Cause::Upstream => "upstream",
            Cause::FaultInjected => "fault_injected",
            Cause::QueueUnavailable => "queue_unavailable",
            Cause::IdempotencyConflict => "idempotency_conflict",
            Cause::IdempotencyMismatch => "idempotency_mismatch",
            Cause::IdempotencyUnavailable => "idempotency_unavailable",
            Cause::Unauthenticated => "unauthenticated",
            Cause::Forbidden => "forbidden",
            Cause::AuthUnavailable => "auth_unavailable",
        }
    }

    /// The HTTP status that answers it.
    pub const fn http_status(self) -> u16 {
        match self {
            Cause::NoRoute => 404,
            Cause::RateLimited => 429,
            Cause::BodyTooLarge => 413,
            Cause::BadRequest => 400,
            Cause::ClientTimeout => 408,
            Cause::CircuitOpen
            | Cause::NoHealthyEndpoint
            | Cause::BulkheadFull
            | Cause::Shed
            | Cause::FaultInjected
            | Cause::QueueUnavailable
            | Cause::IdempotencyUnavailable
            | Cause::AuthUnavailable => 503,
            Cause::Unauthenticated => 401,
            Cause::Forbidden => 403,
            Cause::IdempotencyConflict => 409,
            Cause::IdempotencyMismatch => 422,
            Cause::Timeout => 504,
            Cause::ConnectError | Cause::Reset | Cause::ProtocolError | Cause::Upstream => 502,
        }
    }

    /// Whether the client's side of the exchange caused it (its request is
    /// malformed, too large or too slow). Such failures are never held against an
    /// endpoint, and a gateway fallback answers them only when named in
    /// `fallback.on`.
    pub const fn is_client(self) -> bool {
        matches!(
            self,
            Cause::NoRoute
                | Cause::BodyTooLarge
                | Cause::BadRequest
                | Cause::ClientTimeout
                | Cause::IdempotencyConflict
                | Cause::IdempotencyMismatch
                | Cause::Unauthenticated
                | Cause::Forbidden
        )
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(all(test, not(loom), feature = "toml"))]
mod tests {
    use super::*;

    #[test]
    fn config_names_are_the_stable_names() {
        for c in Cause::ALL {
            let text = format!("v = \"{c}\"");
            #[derive(serde::Deserialize)]
            struct V {
                v: Cause,
            }
            let parsed: V = toml::from_str(&text).unwrap();
            assert_eq!(parsed.v, c);
            assert_eq!(c.to_string(), c.as_str());
        }
    }

    #[test]
    fn statuses_are_4xx_for_the_clients_causes_and_5xx_for_the_rest() {
        for c in Cause::ALL {
            let client = (400..500).contains(&c.http_status()) && c != Cause::RateLimited;
            assert_eq!(client, c.is_client(), "{c}");
        }
    }
}
