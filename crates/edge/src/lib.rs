//! # palisade-edge
//!
//! Edge security for the gateway, without I/O:
//!
//! - [`signed_url`]: signed URLs (the valet key pattern): HMAC-SHA256 over the
//!   method, path, query, expiry and an optional client address, with key ids so
//!   keys rotate; a refusal says why (unsigned, altered, expired, unknown key,
//!   another client).

pub mod signed_url;

pub use signed_url::{Refusal, UrlSigner};
