//! # palisade-edge
//!
//! Edge security for the gateway, without I/O of its own:
//!
//! - [`jwt`]: JWT validation (issuer, audience, `exp` / `nbf` with leeway, an
//!   algorithm allow-list, the algorithm taken from the key, never from the token)
//!   against a key set read from a JWKS document.
//! - [`auth`]: a provider's key ring (the last good set, refetches for unknown keys
//!   rate limited) and a route's token check with a cache of verified tokens.
//! - [`rbac`]: rules on a token's roles and scopes, by method and path.
//! - [`signed_url`]: signed URLs (the valet key pattern): HMAC-SHA256 over the
//!   method, path, query, expiry and an optional client address, with key ids so
//!   keys rotate; a refusal says why (unsigned, altered, expired, unknown key,
//!   another client).
//!
//! The gateway fetches key sets (JWKS URLs, OIDC discovery) and applies these per
//! route.

pub mod auth;
pub mod jwt;
pub mod rbac;
pub mod signed_url;

pub use auth::{JwtAuth, KeyRing};
pub use jwt::{Claims, KeySet, Rejection, Rules, Verified};
pub use rbac::{Need, Policy, Rule};
pub use signed_url::{Refusal, UrlSigner};
