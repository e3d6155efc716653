//! JWT validation (token authentication), without I/O: a token checked against a
//! key set and a provider's rules.
//!
//! What it holds to, in this order: the token's size (a bound, so a megabyte of
//! header costs nothing), its form (three base64url parts, a JSON header and
//! claims), its algorithm (on the provider's allow-list, and one the key it names
//! is for: the algorithm comes from the key, never from the token, so an `HS256`
//! token "signed" with an RSA public key is refused, and `none` is no algorithm at
//! all), its key (looked up by `kid` in the set, never used as anything else), its
//! signature, then its claims: `exp` and `nbf` with the leeway (numbers, or numeric
//! strings), `iss` and `aud` when the provider names them.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// A token's claims.
pub type Claims = Map<String, Value>;

/// Why a token is refused (each a `401`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No token came.
    #[error("no bearer token")]
    Missing,
    /// It is longer than the provider accepts.
    #[error("the token is {0} bytes, over the limit")]
    TooLarge(usize),
    /// It is not a JWT.
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    /// Its algorithm is not allowed, or not the one its key is for.
    #[error("the token's algorithm {0:?} is not accepted")]
    Algorithm(String),
    /// It names a key the set does not hold.
    #[error("the token names an unknown key")]
    UnknownKey,
    /// Its signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// It has expired.
    #[error("the token has expired")]
    Expired,
    /// It is not valid yet.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// It has no `exp`, which the provider requires.
    #[error("the token has no expiry")]
    NoExpiry,
    /// Its issuer is not the provider's.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// It is not for this audience.
    #[error("the token is not for this audience")]
    Audience,
}

impl Rejection {
    /// The `error_description` of the `WWW-Authenticate` challenge.
    pub fn description(&self) -> String {
        self.to_string()
    }
}

/// Why a key set could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// Not a JWKS document.
    #[error("not a JWKS document: {0}")]
    Format(String),
    /// It holds no key this provider can verify with.
    #[error("no usable signing key ({0} skipped)")]
    Empty(usize),
}

/// One verification key and the algorithms it verifies.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// A set of verification keys by id (a JWKS).
#[derive(Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without an id: used for tokens without a `kid` when there is one.
    anonymous: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

impl KeySet {
    /// The signing keys of a JWKS document that verify one of `allowed`; keys for
    /// encryption, of other types or curves, or that do not parse are skipped.
    pub fn from_jwks(json: &[u8], allowed: &[Algorithm]) -> Result<KeySet, KeySetError> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| KeySetError::Format(e.to_string()))?;
        let mut keys = KeySet::default();
        let mut skipped = 0;
        for jwk in &set.keys {
            match usable(jwk, allowed) {
                Some(key) => match &jwk.common.key_id {
                    Some(kid) => {
                        keys.by_kid.insert(kid.clone(), key);
                    }
                    None => keys.anonymous.push(key),
                },
                None => skipped += 1,
            }
        }
        if keys.is_empty() {
            return Err(KeySetError::Empty(skipped));
        }
        Ok(keys)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds key `kid`.
    pub fn has(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    fn key(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            // Without a kid, only an unambiguous set.
            None if self.len() == 1 => self.anonymous.first().or_else(|| self.by_kid.values().next()),
            None => None,
        }
    }
}

/// The key of `jwk`, and the algorithms of `allowed` it verifies; `None` when it
/// is for encryption, of a type or curve not supported, or verifies none of them.
fn usable(jwk: &Jwk, allowed: &[Algorithm]) -> Option<Key> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let of_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        _ => return None,
    };
    // A key that names its algorithm is for that one alone.
    let named = match jwk.common.key_algorithm {
        Some(a) => Some(Algorithm::from_str(&format!("{a:?}")).ok()?),
        None => None,
    };
    let algorithms: Vec<Algorithm> = of_type
        .iter()
        .copied()
        .filter(|a| allowed.contains(a) && named.is_none_or(|n| n == *a))
        .collect();
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { key, algorithms })
}

/// A provider's rules for the tokens it accepts.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// A token's `aud` must name one of these, when any is set.
    pub audiences: Vec<String>,
    /// The algorithms accepted (never `none`, which is not one).
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway: u64,
    /// Whether a token without `exp` is refused.
    pub require_exp: bool,
    /// The longest token accepted, in bytes.
    pub max_token_bytes: usize,
}

/// A token that passed: its claims, and its expiry (Unix seconds) if it has one.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Its claims.
    pub claims: Arc<Claims>,
    /// Its `exp`.
    pub expires: Option<u64>,
    /// Its `nbf`.
    pub not_before: Option<u64>,
}

impl Verified {
    /// Checks its times again at `now` (a cached token's).
    pub fn still_valid(&self, rules: &Rules, now: u64) -> Result<(), Rejection> {
        times(self.expires, self.not_before, rules, now)
    }
}

/// The header fields that matter.
#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The key id a token names (for a refetch on an unknown one), if it has a
/// well-formed header.
pub fn kid_of(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice::<Header>(&bytes).ok()?.kid
}

/// Checks `token` with `keys` under `rules` at `now` (Unix seconds).
pub fn verify(token: &str, keys: &KeySet, rules: &Rules, now: u64) -> Result<Verified, Rejection> {
    if token.len() > rules.max_token_bytes {
        return Err(Rejection::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed("not three parts"));
    };
    let header: Header = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Rejection::Malformed("header"))?;
    let alg = Algorithm::from_str(&header.alg)
        .ok()
        .filter(|a| rules.algorithms.contains(a))
        .ok_or_else(|| Rejection::Algorithm(shown(&header.alg)))?;
    let key = keys.key(header.kid.as_deref()).ok_or(Rejection::UnknownKey)?;
    if !key.algorithms.contains(&alg) {
        return Err(Rejection::Algorithm(shown(&header.alg)));
    }
    let message = &token[..token.len() - signature.len() - 1];
    if !jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.key, alg).unwrap_or(false) {
        return Err(Rejection::Signature);
    }
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Rejection::Malformed("claims"))?;
    let expires = time_claim(&claims, "exp")?;
    let not_before = time_claim(&claims, "nbf")?;
    if expires.is_none() && rules.require_exp {
        return Err(Rejection::NoExpiry);
    }
    times(expires, not_before, rules, now)?;
    if let Some(iss) = &rules.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
    {
        return Err(Rejection::Issuer);
    }
    if !rules.audiences.is_empty() && !audience_matches(claims.get("aud"), &rules.audiences) {
        return Err(Rejection::Audience);
    }
    Ok(Verified {
        claims: Arc::new(claims),
        expires,
        not_before,
    })
}

/// A token's own text as a refusal may repeat it: visible ASCII, at most 32
/// characters (it ends up in a response header).
fn shown(text: &str) -> String {
    text.chars().filter(char::is_ascii_graphic).take(32).collect()
}

fn times(expires: Option<u64>, not_before: Option<u64>, rules: &Rules, now: u64) -> Result<(), Rejection> {
    if expires.is_some_and(|exp| now >= exp.saturating_add(rules.leeway)) {
        return Err(Rejection::Expired);
    }
    if not_before.is_some_and(|nbf| now.saturating_add(rules.leeway) < nbf) {
        return Err(Rejection::NotYetValid);
    }
    Ok(())
}

/// A time claim: a number of seconds, or a string of one; anything else is a
/// malformed token (never a claim silently skipped).
fn time_claim(claims: &Claims, name: &'static str) -> Result<Option<u64>, Rejection> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let secs = match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    secs.map(Some).ok_or(Rejection::Malformed(name))
}

fn audience_matches(aud: Option<&Value>, accepted: &[String]) -> bool {
    match aud {
        Some(Value::String(a)) => accepted.iter().any(|x| x == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| accepted.iter().any(|x| x == a)),
        _ => false,
    }
}

/// The values of claim `path` (dots go into objects: `realm_access.roles`): the
/// strings of an array, a string's space-separated words (OAuth's `scope`), a
/// number or boolean as text.
pub fn claim_values<'a>(claims: &'a Claims, path: &str) -> Vec<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    match claim(claims, path) {
        Some(Value::String(s)) => s.split_whitespace().map(Cow::Borrowed).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| match i {
                Value::String(s) => Some(Cow::Borrowed(s.as_str())),
                Value::Number(n) => Some(Cow::Owned(n.to_string())),
                _ => None,
            })
            .collect(),
        Some(Value::Number(n)) => vec![Cow::Owned(n.to_string())],
        Some(Value::Bool(b)) => vec![Cow::Owned(b.to_string())],
        _ => Vec::new(),
    }
}

/// Claim `path`, dots going into objects.
fn claim<'a>(claims: &'a Claims, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = claims.get(parts.next()?);
    for p in parts {
        v = v?.get(p);
    }
    v
}

/// Claim `path` as one header-ready text: a string as it is, an array's items
/// joined by `,`, a number or boolean as text; `None` for anything else.
pub fn claim_text(claims: &Claims, path: &str) -> Option<String> {
    match claim(claims, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(_) => {
            let items = claim_values(claims, path);
            (!items.is_empty()).then(|| items.join(","))
        }
        _ => None,
    }
}

/// An algorithm by its JOSE name; `none` and unknown names are errors.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    Algorithm::from_str(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn oct(kid: Option<&str>, extra: Value) -> Value {
        let mut k = json!({ "kty": "oct", "k": URL_SAFE_NO_PAD.encode(SECRET) });
        if let Some(kid) = kid {
            k["kid"] = json!(kid);
        }
        for (name, v) in extra.as_object().unwrap() {
            k[name] = v.clone();
        }
        k
    }

    fn set(keys: Vec<Value>) -> Result<KeySet, KeySetError> {
        KeySet::from_jwks(
            json!({ "keys": keys }).to_string().as_bytes(),
            &[Algorithm::HS256, Algorithm::ES256],
        )
    }

    fn rules() -> Rules {
        Rules {
            issuer: None,
            audiences: Vec::new(),
            algorithms: vec![Algorithm::HS256],
            leeway: 30,
            require_exp: true,
            max_token_bytes: 4096,
        }
    }

    fn token(kid: Option<&str>, claims: Value) -> String {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn encryption_keys_and_keys_for_other_algorithms_are_skipped() {
        assert_eq!(
            set(vec![oct(Some("e"), json!({ "use": "enc" }))]).unwrap_err(),
            KeySetError::Empty(1)
        );
        assert_eq!(
            set(vec![oct(Some("a"), json!({ "alg": "HS512" }))]).unwrap_err(),
            KeySetError::Empty(1)
        );
        let keys = set(vec![
            oct(Some("a"), json!({ "alg": "HS256" })),
            oct(Some("e"), json!({ "use": "enc" })),
        ])
        .unwrap();
        assert!(keys.has("a") && !keys.has("e"));
        assert!(matches!(
            KeySet::from_jwks(b"[]", &[Algorithm::HS256]),
            Err(KeySetError::Format(_))
        ));
    }

    #[test]
    fn times_hold_within_the_leeway_and_as_strings() {
        let keys = set(vec![oct(Some("a"), json!({}))]).unwrap();
        let now = 1_000_000;
        let check = |claims: Value| verify(&token(Some("a"), claims), &keys, &rules(), now);
        assert!(check(json!({ "exp": now - 10 })).is_ok(), "within the leeway");
        assert_eq!(check(json!({ "exp": now - 30 })).unwrap_err(), Rejection::Expired);
        assert_eq!(
            check(json!({ "exp": (now - 31).to_string() })).unwrap_err(),
            Rejection::Expired
        );
        assert!(check(json!({ "exp": (now + 60).to_string() })).is_ok());
        assert_eq!(
            check(json!({ "exp": now + 60, "nbf": now + 31 })).unwrap_err(),
            Rejection::NotYetValid
        );
        assert!(check(json!({ "exp": now + 60, "nbf": now + 30 })).is_ok());
        assert_eq!(
            check(json!({ "exp": [1] })).unwrap_err(),
            Rejection::Malformed("exp")
        );
        assert_eq!(check(json!({})).unwrap_err(), Rejection::NoExpiry);
    }

    #[test]
    fn a_refusal_repeats_a_tokens_algorithm_only_as_short_visible_text() {
        let keys = set(vec![oct(Some("a"), json!({}))]).unwrap();
        let header = URL_SAFE_NO_PAD
            .encode(json!({ "alg": format!("x\r\nSet-Cookie: a=b{}", "y".repeat(100)) }).to_string());
        let token = format!("{header}.{}.sig", URL_SAFE_NO_PAD.encode("{}"));
        let Err(Rejection::Algorithm(shown)) = verify(&token, &keys, &rules(), 0) else {
            panic!("refused for its algorithm");
        };
        assert_eq!(shown.len(), 32);
        assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown:?}");
    }

    #[test]
    fn a_token_without_a_kid_needs_a_set_of_one() {
        let claims = json!({ "exp": 2_000_000 });
        let one = set(vec![oct(None, json!({}))]).unwrap();
        assert!(verify(&token(None, claims.clone()), &one, &rules(), 0).is_ok());
        let two = set(vec![oct(Some("a"), json!({})), oct(Some("b"), json!({}))]).unwrap();
        assert_eq!(
            verify(&token(None, claims), &two, &rules(), 0).unwrap_err(),
            Rejection::UnknownKey
        );
    }

    #[test]
    fn claims_read_as_values_and_as_text() {
        let c: Claims = serde_json::from_value(json!({
            "scope": "a b", "roles": ["x", "y"], "org": { "id": 7 }, "admin": true
        }))
        .unwrap();
        assert_eq!(claim_values(&c, "scope"), ["a", "b"]);
        assert_eq!(claim_text(&c, "scope").as_deref(), Some("a b"));
        assert_eq!(claim_text(&c, "roles").as_deref(), Some("x,y"));
        assert_eq!(claim_text(&c, "org.id").as_deref(), Some("7"));
        assert_eq!(claim_text(&c, "admin").as_deref(), Some("true"));
        assert_eq!(claim_text(&c, "org"), None);
        assert_eq!(kid_of(&token(Some("k9"), json!({}))).as_deref(), Some("k9"));
    }
}
