//! Why the gateway answered a request itself: one vocabulary for the
//! `x-palisade-cause` header, the JSON error body, the access log, metrics and a
//! route's `fallback.on`.

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Why the gateway answered a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// No route matched (404).
    NoRoute,
    /// The route's rate limit refused (429).
    RateLimited,
    /// The request body is larger than allowed (413).
    BodyTooLarge,
    /// The request could not be read, or is ambiguous: a malformed or truncated
    /// body, two `Host` headers, a path that climbs above the root (400).
    BadRequest,
    /// The client was too slow to send its request body (408).
    ClientTimeout,
    /// Every candidate endpoint's breaker is open (503).
    CircuitOpen,
    /// No endpoint is healthy, or the cluster is empty (503).
    NoHealthyEndpoint,
    /// The cluster's bulkhead is full (503).
    BulkheadFull,
    /// The total or per-attempt timeout passed (504).
    Timeout,
    /// The endpoint could not be connected to (502).
    ConnectError,
    /// The connection was reset or closed before an answer (502).
    #[serde(rename = "upstream_reset")]
    Reset,
    /// The endpoint broke the protocol (502).
    ProtocolError,
}

impl Cause {
    /// The value of `x-palisade-cause`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NoRoute => "no_route",
            Cause::RateLimited => "rate_limited",
            Cause::BodyTooLarge => "body_too_large",
            Cause::BadRequest => "bad_request",
            Cause::ClientTimeout => "client_timeout",
            Cause::CircuitOpen => "circuit_open",
            Cause::NoHealthyEndpoint => "no_healthy_endpoint",
            Cause::BulkheadFull => "bulkhead_full",
            Cause::Timeout => "timeout",
            Cause::ConnectError => "connect_error",
            Cause::Reset => "upstream_reset",
            Cause::ProtocolError => "protocol_error",
        }
    }

    /// The status the gateway answers with.
    pub fn status(self) -> StatusCode {
        match self {
            Cause::NoRoute => StatusCode::NOT_FOUND,
            Cause::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Cause::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Cause::BadRequest => StatusCode::BAD_REQUEST,
            Cause::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Cause::CircuitOpen | Cause::NoHealthyEndpoint | Cause::BulkheadFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Cause::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Cause::ConnectError | Cause::Reset | Cause::ProtocolError => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the client's side of the exchange caused it (its request is
    /// malformed, too large or too slow). Such failures are never held against an
    /// endpoint, and a fallback answers them only when named in `fallback.on`.
    pub fn is_client(self) -> bool {
        matches!(
            self,
            Cause::NoRoute | Cause::BodyTooLarge | Cause::BadRequest | Cause::ClientTimeout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_are_header_values() {
        for c in [
            Cause::NoRoute,
            Cause::RateLimited,
            Cause::BodyTooLarge,
            Cause::BadRequest,
            Cause::ClientTimeout,
            Cause::CircuitOpen,
            Cause::NoHealthyEndpoint,
            Cause::BulkheadFull,
            Cause::Timeout,
            Cause::ConnectError,
            Cause::Reset,
            Cause::ProtocolError,
        ] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<Cause>(&json).unwrap(), c);
        }
    }
}
