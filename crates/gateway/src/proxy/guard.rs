//! The gatekeeper phase, for routes with `signed_urls` or `auth`: before a request
//! is read further or anything is sent, its signed link is checked (a `403` that
//! says which: unsigned, malformed, unknown key, altered, expired, another client),
//! then its bearer token (a `401` with a `WWW-Authenticate` challenge when missing
//! or bad, a `403` when valid but refused by the route's rules), and the claims the
//! route forwards are set as headers, the client's own copies removed first.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request};
use palisade_edge::{Refusal, Rejection, Verified};

use super::Failure;
use crate::cause::Cause;
use crate::guard::{RouteGuard, RouteJwt};

/// Which check refused a request (`x-palisade-refusal`).
const REFUSAL: &str = "x-palisade-refusal";

/// Checks `req` against `guard`; on success its head is as it goes upstream.
pub(super) async fn check<B>(
    guard: &RouteGuard,
    req: &mut Request<B>,
    client: IpAddr,
) -> Result<(), Failure> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(signer) = &guard.signed {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Err(r) = signer.verify(req.method().as_str(), target, now, client) {
            metrics::counter!("palisade_signed_url_refusals_total", "reason" => refusal_name(&r))
                .increment(1);
            let mut f = Failure::new(Cause::Forbidden, r.to_string());
            f.headers.push((REFUSAL, refusal_name(&r).to_owned()));
            return Err(f);
        }
    }
    let Some(jwt) = &guard.jwt else {
        return Ok(());
    };
    // Whatever comes next, the client's copies of forwarded claims never pass.
    for (_, name) in &jwt.forward {
        req.headers_mut().remove(name);
    }
    let verified = authenticate(jwt, req.headers(), now).await?;
    if let Err(lack) = jwt
        .policy
        .allows(&verified.claims, req.method(), req.uri().path())
    {
        metrics::counter!("palisade_auth_total", "route" => jwt.realm.clone(), "outcome" => "forbidden")
            .increment(1);
        let mut f = Failure::new(Cause::Forbidden, lack.clone());
        let challenge = jwt.challenge(Some(("insufficient_scope", &lack)));
        f.headers.push(("www-authenticate", challenge));
        return Err(f);
    }
    forward(jwt, req.headers_mut(), &verified);
    Ok(())
}

/// The request's bearer token checked; an unknown key (or no keys at all yet)
/// sends for the issuer's keys again (at most once per `min_refetch_interval`)
/// and checks once more.
async fn authenticate(jwt: &RouteJwt, headers: &HeaderMap, now: u64) -> Result<Verified, Failure> {
    // No keys yet (the issuer has not answered since start): ask it now, within
    // the same bound on refetches.
    if jwt.provider.ring.generation() == 0 && !Box::pin(jwt.provider.refetch_for_unknown_key()).await {
        return Err(Failure::new(
            Cause::AuthUnavailable,
            format!(
                "the keys of issuer {} have not been fetched yet",
                jwt.provider.name
            ),
        ));
    }
    let Some(token) = bearer(headers) else {
        return Err(unauthenticated(jwt, &Rejection::Missing));
    };
    let mut checked = jwt.auth.check(token, now);
    if checked.as_ref().is_err_and(|r| *r == Rejection::UnknownKey)
        && Box::pin(jwt.provider.refetch_for_unknown_key()).await
    {
        checked = jwt.auth.check(token, now);
    }
    checked.map_err(|r| unauthenticated(jwt, &r))
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthenticated(jwt: &RouteJwt, r: &Rejection) -> Failure {
    metrics::counter!("palisade_auth_total", "route" => jwt.realm.clone(), "outcome" => "unauthenticated")
        .increment(1);
    let mut f = Failure::new(Cause::Unauthenticated, r.description());
    let challenge = match r {
        Rejection::Missing => jwt.challenge(None),
        other => jwt.challenge(Some(("invalid_token", &other.description()))),
    };
    f.headers.push(("www-authenticate", challenge));
    f
}

/// Sets the forwarded claims' headers (an array's values joined by `,`); drops the
/// token when the route keeps it.
fn forward(jwt: &RouteJwt, headers: &mut HeaderMap, verified: &Verified) {
    for (claim, name) in &jwt.forward {
        if let Some(v) = palisade_edge::jwt::claim_text(&verified.claims, claim)
            .and_then(|text| HeaderValue::from_str(&text).ok())
        {
            headers.insert(name.clone(), v);
        }
    }
    if !jwt.forward_token {
        headers.remove(header::AUTHORIZATION);
    }
}

fn refusal_name(r: &Refusal) -> &'static str {
    match r {
        Refusal::Unsigned => "unsigned",
        Refusal::Malformed(_) => "malformed",
        Refusal::UnknownKey(_) => "unknown_key",
        Refusal::Tampered => "tampered",
        Refusal::Expired(_) => "expired",
        Refusal::WrongClient => "wrong_client",
    }
}
