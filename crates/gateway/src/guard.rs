//! A route's gatekeeping, compiled: signed URLs (`signed_urls`) and token
//! authentication with access rules (`auth`). The request side is `proxy::guard`.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;
use palisade_edge::{JwtAuth, Need, Policy, Rule, UrlSigner};

use crate::config::{
    AuthConfig, ConfigError, ConfigErrors, NeedConfig, SecretSource, SignedUrlConfig, Unmatched, header_name,
};
use crate::keys::Provider;

/// What a route checks before anything else.
#[derive(Debug)]
pub struct RouteGuard {
    /// Its signed URLs' keys, when it takes signed links.
    pub signed: Option<UrlSigner>,
    /// Its token check, when it takes tokens.
    pub jwt: Option<RouteJwt>,
}

/// A route's token check.
#[derive(Debug)]
pub struct RouteJwt {
    /// The issuer.
    pub provider: Arc<Provider>,
    /// Tokens checked with its keys, verified ones cached.
    pub auth: JwtAuth,
    /// The access rules.
    pub policy: Policy,
    /// Claims forwarded, claim to header.
    pub forward: Vec<(String, HeaderName)>,
    /// Whether `Authorization` goes upstream.
    pub forward_token: bool,
    /// The `WWW-Authenticate` challenge's realm (the route's name).
    pub realm: String,
}

impl RouteGuard {
    /// Compiles route `route`'s `auth` and `signed_urls` tables (`at`: its path),
    /// problems to `p`; `None` when it has neither.
    pub(crate) fn compile(
        route: &str,
        auth: Option<&AuthConfig>,
        signed: Option<&SignedUrlConfig>,
        providers: &HashMap<String, Arc<Provider>>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteGuard> {
        if auth.is_none() && signed.is_none() {
            return None;
        }
        let signed = signed.and_then(|s| {
            url_signer(s, &format!("{at}.signed_urls"))
                .map_err(|e| p.extend(e.0))
                .ok()
        });
        let jwt = auth.and_then(|a| RouteJwt::compile(route, a, providers, &format!("{at}.auth"), p));
        Some(RouteGuard { signed, jwt })
    }
}

impl RouteJwt {
    fn compile(
        route: &str,
        a: &AuthConfig,
        providers: &HashMap<String, Arc<Provider>>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteJwt> {
        let before = p.len();
        let mut rules = Vec::new();
        for (i, r) in a.rules.iter().enumerate() {
            let mut methods = Vec::new();
            for (j, m) in r.methods.iter().enumerate() {
                match http::Method::from_bytes(m.as_bytes()) {
                    Ok(m) => methods.push(m),
                    Err(_) => p.push(ConfigError::new(
                        format!("{at}.rules[{i}].methods[{j}]"),
                        format!("`{m}` is not a method"),
                    )),
                }
            }
            rules.push(Rule {
                methods,
                path_prefix: r.path_prefix.clone(),
                roles: r.roles.clone(),
                scopes: r.scopes.clone(),
                need: match r.need {
                    NeedConfig::Any => Need::Any,
                    NeedConfig::All => Need::All,
                },
            });
        }
        let mut forward = Vec::new();
        for (claim, header) in &a.forward_claims {
            if let Some(h) = header_name(header, &format!("{at}.forward_claims.{claim}"), p) {
                forward.push((claim.clone(), h));
            }
        }
        // A missing provider is the file's error (`Config::validate`).
        let provider = providers.get(&a.jwt)?.clone();
        if p.len() > before {
            return None;
        }
        let auth = JwtAuth::new(
            provider.rules.clone(),
            provider.ring.clone(),
            provider.cached_tokens,
        );
        Some(RouteJwt {
            provider,
            auth,
            policy: Policy {
                rules,
                allow_unmatched: a.unmatched == Unmatched::Allow,
                roles_claim: a.roles_claim.clone(),
                scopes_claim: a.scopes_claim.clone(),
            },
            forward,
            forward_token: a.forward_token,
            realm: route.to_owned(),
        })
    }

    /// The `WWW-Authenticate` challenge for a refusal (`error` as RFC 6750 names it).
    pub fn challenge(&self, error: Option<(&str, &str)>) -> String {
        let realm = self.realm.replace(['"', '\\'], "");
        match error {
            None => format!("Bearer realm=\"{realm}\""),
            Some((error, description)) => {
                let description = description.replace(['"', '\\'], "'");
                format!("Bearer realm=\"{realm}\", error=\"{error}\", error_description=\"{description}\"")
            }
        }
    }
}

/// The signer `s` describes (`at`: its path in the file), its secrets read now:
/// what the gateway checks links with and `palisade sign-url` signs them with.
pub fn url_signer(s: &SignedUrlConfig, at: &str) -> Result<UrlSigner, ConfigErrors> {
    let mut p = Vec::new();
    let mut keys = Vec::new();
    for (id, source) in &s.keys {
        if let Some(secret) = secret(source, &format!("{at}.keys.{id}"), &mut p) {
            keys.push((id.clone(), secret));
        }
    }
    ConfigErrors::result(p)?;
    UrlSigner::new(keys, &s.current).map_err(|e| e.under(at))
}

/// A secret's bytes: a file's (a final newline dropped) or an environment
/// variable's.
pub fn secret(s: &SecretSource, at: &str, p: &mut Vec<ConfigError>) -> Option<Vec<u8>> {
    match (&s.file, &s.env) {
        (Some(path), None) => match std::fs::read(path) {
            Ok(mut bytes) => {
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Some(bytes)
            }
            Err(e) => {
                p.push(ConfigError::new(
                    format!("{at}.file"),
                    format!("{}: {e}", path.display()),
                ));
                None
            }
        },
        (None, Some(name)) => match std::env::var_os(name) {
            Some(v) => Some(v.into_encoded_bytes()),
            None => {
                p.push(ConfigError::new(
                    format!("{at}.env"),
                    format!("${name} is not set"),
                ));
                None
            }
        },
        _ => {
            p.push(ConfigError::new(at, "name exactly one of file, env"));
            None
        }
    }
}
