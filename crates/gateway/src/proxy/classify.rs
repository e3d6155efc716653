//! What an attempt's result tells the endpoint's breaker, the cluster's outlier
//! detection and the decide phase: its failure cause and the retry conditions it
//! meets.

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use palisade_balance::outlier::CallResult;
use palisade_resilience::breaker::Outcome;

use crate::config::RetryOn;
use crate::pool::SendError;
use crate::upstream::Upstream;

use super::Cause;

pub(super) struct Classified {
    pub(super) breaker: Outcome,
    pub(super) outlier: CallResult,
    pub(super) cause: Option<Cause>,
    pub(super) retry_on: Vec<RetryOn>,
}

pub(super) type AttemptResult = Result<Result<Response<Incoming>, SendError>, tokio::time::error::Elapsed>;

pub(super) fn classify(up: &Upstream, result: &AttemptResult) -> Classified {
    match result {
        Ok(Ok(resp)) => {
            // A gRPC answer with no body ("trailers-only") carries its status in
            // its headers: judged as the HTTP status it stands for.
            let s = match resp.status() {
                StatusCode::OK => grpc_status_as_http(resp.headers()).unwrap_or(StatusCode::OK),
                other => other,
            };
            let (breaker, outlier) = judge_status(up, s, resp.headers());
            let mut retry_on = Vec::new();
            if s.is_server_error() {
                retry_on.push(RetryOn::Status5xx);
            }
            if outlier == CallResult::GatewayFailure {
                retry_on.push(RetryOn::GatewayError);
            }
            Classified {
                breaker,
                outlier,
                cause: None,
                retry_on,
            }
        }
        Ok(Err(e)) => {
            let (cause, on) = if matches!(e, SendError::Connect(_)) {
                (Cause::ConnectError, RetryOn::ConnectFailure)
            } else if is_reset(e) {
                (Cause::Reset, RetryOn::Reset)
            } else {
                (Cause::ProtocolError, RetryOn::Reset)
            };
            Classified {
                breaker: Outcome::Failure,
                outlier: CallResult::GatewayFailure,
                cause: Some(cause),
                retry_on: vec![on],
            }
        }
        Err(_) => Classified {
            breaker: Outcome::Failure,
            outlier: CallResult::GatewayFailure,
            cause: Some(Cause::Timeout),
            retry_on: vec![RetryOn::Timeout],
        },
    }
}

/// What an answer with status `s` and headers `h` tells the endpoint's breaker
/// (5xx, and 429 when configured, are failures) and outlier detection (502-504 are
/// gateway failures, other 5xx server errors). The cluster's `failure_statuses` and
/// `failure_headers` make an answer a failure for both, as a 5xx.
pub(super) fn judge_status(up: &Upstream, s: StatusCode, h: &HeaderMap) -> (Outcome, CallResult) {
    let declared = (!up.failure_statuses.is_empty() && up.failure_statuses.contains(&s.as_u16()))
        || (!up.failure_headers.is_empty() && up.failure_headers.iter().any(|n| h.contains_key(n)));
    let breaker = if (s.is_server_error() && up.breaker_counts_5xx)
        || (s == StatusCode::TOO_MANY_REQUESTS && up.breaker_counts_429)
        || declared
    {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    let outlier = if matches!(s.as_u16(), 502..=504) {
        CallResult::GatewayFailure
    } else if s.is_server_error() || declared {
        CallResult::ServerError
    } else {
        CallResult::Success
    };
    (breaker, outlier)
}

pub(super) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The HTTP status a `grpc-status` in `h` stands for (the mapping Envoy uses):
/// `14` (unavailable) is a 503, `4` (deadline exceeded) a 504, `13` (internal) a
/// 500, `8` (resource exhausted) a 429, `0` a 200; client-side codes map to 4xx.
pub(super) fn grpc_status_as_http(h: &HeaderMap) -> Option<StatusCode> {
    let code: u16 = h.get(&GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()?;
    let http = match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        // 2 unknown, 13 internal, 15 data loss, and codes not yet defined.
        _ => 500,
    };
    StatusCode::from_u16(http).ok()
}

/// Whether the connection broke (reset, closed mid-answer) rather than the
/// endpoint breaking the protocol.
pub(super) fn is_reset(e: &SendError) -> bool {
    matches!(e, SendError::Http(h) if crate::pool::broke_before_answer(h))
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(super) fn body_is_empty(parts: &http::request::Parts) -> bool {
    !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        )
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn grpc(code: &'static str) -> Option<u16> {
        let mut h = HeaderMap::new();
        h.insert(GRPC_STATUS, HeaderValue::from_static(code));
        grpc_status_as_http(&h).map(|s| s.as_u16())
    }

    #[test]
    fn grpc_statuses_stand_for_the_http_statuses_envoy_maps_them_to() {
        let table = [
            ("0", 200),
            ("1", 499),
            ("3", 400),
            ("4", 504),
            ("5", 404),
            ("7", 403),
            ("8", 429),
            ("12", 501),
            ("13", 500),
            ("14", 503),
            ("16", 401),
            ("99", 500),
        ];
        for (code, http) in table {
            assert_eq!(grpc(code), Some(http), "grpc-status {code}");
        }
    }

    #[test]
    fn a_missing_or_unreadable_grpc_status_stands_for_nothing() {
        assert_eq!(grpc_status_as_http(&HeaderMap::new()), None);
        assert_eq!(grpc("unavailable"), None);
        assert_eq!(grpc(" 14 "), Some(503));
    }
}
