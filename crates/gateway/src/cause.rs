//! Why the gateway answered a request itself: the workspace's one vocabulary
//! ([`Cause`], shared with the tower layers' `PolicyError::cause`) for the
//! `x-palisade-cause` header, the JSON error body, the access log, metrics and a
//! route's `fallback.on`, and the status each is answered with.

use http::StatusCode;

pub use palisade_core::Cause;

/// The status the gateway answers `cause` with.
pub fn status(cause: Cause) -> StatusCode {
    StatusCode::from_u16(cause.http_status()).unwrap_or(StatusCode::BAD_GATEWAY)
}
