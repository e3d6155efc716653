//! Signed URLs (the valet key pattern): a link that grants one request, to one
//! path, until a time, optionally to one client, without an account.
//!
//! A signed link is the URL with `expires` (Unix seconds), `kid` (the key's id),
//! optionally `ip` (the only client address it works for) and last `sig`: the
//! HMAC-SHA256, in hex, of the method, a space, and everything of the path and
//! query before `&sig=`. Changing the method, the path, any query parameter, the
//! expiry or the client constraint breaks the signature. Keys have ids so they can
//! rotate: sign with the current key, keep verifying with the old ones until the
//! links they signed have expired.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use palisade_core::{ConfigError, ConfigErrors};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest key accepted: 32 bytes, the hash's own size.
pub const MIN_KEY_BYTES: usize = 32;

/// Why a link is refused (each a 403 that says which).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It carries no signature at all.
    #[error("the link is not signed")]
    Unsigned,
    /// Its signing parameters are not as signed links write them.
    #[error("the link's {0} parameter is malformed")]
    Malformed(&'static str),
    /// It was signed with a key this gateway does not have (retired, or never).
    #[error("the link was signed with an unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not match: the method, path, query, expiry or client
    /// constraint was changed, or the key is wrong.
    #[error("the link's signature does not match: it was altered")]
    Tampered,
    /// It was valid until then.
    #[error("the link expired at {0} (Unix seconds)")]
    Expired(u64),
    /// It is for another client address.
    #[error("the link is for another client")]
    WrongClient,
}

/// Signs and verifies links with a set of keys, one of them current.
#[derive(Clone)]
pub struct UrlSigner {
    keys: BTreeMap<String, Vec<u8>>,
    current: String,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("UrlSigner")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

impl UrlSigner {
    /// A signer with `keys` (id to secret), signing with `current`. Every problem
    /// is named: an empty or odd key id, a key shorter than 32 bytes, a current key
    /// that is not among them.
    pub fn new(
        keys: impl IntoIterator<Item = (String, Vec<u8>)>,
        current: &str,
    ) -> Result<Self, ConfigErrors> {
        let keys: BTreeMap<String, Vec<u8>> = keys.into_iter().collect();
        let mut errors = Vec::new();
        for (id, key) in &keys {
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                errors.push(ConfigError::new(
                    format!("keys.{id}"),
                    "a key id is letters, digits, '-' and '_'",
                ));
            }
            if key.len() < MIN_KEY_BYTES {
                errors.push(ConfigError::new(
                    format!("keys.{id}"),
                    format!("is {} bytes; at least {MIN_KEY_BYTES} are needed", key.len()),
                ));
            }
        }
        if !keys.contains_key(current) {
            errors.push(ConfigError::new(
                "current",
                format!("{current:?} is not one of the keys"),
            ));
        }
        ConfigErrors::result(errors)?;
        Ok(UrlSigner {
            keys,
            current: current.to_string(),
        })
    }

    /// `path_and_query` signed for `method` until `expires` (Unix seconds), for
    /// `client` only if given, with the current key.
    pub fn sign(&self, method: &str, path_and_query: &str, expires: u64, client: Option<IpAddr>) -> String {
        let mut url = path_and_query.to_string();
        url.push(if url.contains('?') { '&' } else { '?' });
        let _ = write!(url, "expires={expires}&kid={}", self.current);
        if let Some(ip) = client {
            let _ = write!(url, "&ip={ip}");
        }
        let sig = hex(&self.mac(&self.keys[&self.current], method, &url));
        url.push_str("&sig=");
        url.push_str(&sig);
        url
    }

    /// Checks a request for `path_and_query` by `method` from `client` at `now`
    /// (Unix seconds): the signature first (so only an authentic link is told it
    /// expired), then the expiry, then the client.
    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        now: u64,
        client: IpAddr,
    ) -> Result<(), Refusal> {
        let Some((signed, sig)) = path_and_query.rsplit_once("&sig=") else {
            return Err(Refusal::Unsigned);
        };
        let sig = unhex(sig).ok_or(Refusal::Malformed("sig"))?;
        let query = signed.split_once('?').map_or("", |(_, q)| q);
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .next_back()
        };
        let kid = param("kid").ok_or(Refusal::Malformed("kid"))?;
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| Refusal::UnknownKey(kid.to_string()))?;
        let mut mac = HmacSha256::new_from_slice(key).map_err(|_| Refusal::Tampered)?;
        feed(&mut mac, method, signed);
        mac.verify_slice(&sig).map_err(|_| Refusal::Tampered)?;
        let expires: u64 = param("expires")
            .and_then(|e| e.parse().ok())
            .ok_or(Refusal::Malformed("expires"))?;
        if now >= expires {
            return Err(Refusal::Expired(expires));
        }
        match param("ip") {
            None => Ok(()),
            Some(ip) => match ip.parse::<IpAddr>() {
                Ok(allowed) if allowed == client => Ok(()),
                Ok(_) => Err(Refusal::WrongClient),
                Err(_) => Err(Refusal::Malformed("ip")),
            },
        }
    }

    fn mac(&self, key: &[u8], method: &str, signed: &str) -> Vec<u8> {
        // Keys were checked to be at least 32 bytes; HMAC takes keys of any length.
        let mut mac = match HmacSha256::new_from_slice(key) {
            Ok(m) => m,
            Err(e) => unreachable!("HMAC accepts keys of any length: {e}"),
        };
        feed(&mut mac, method, signed);
        mac.finalize().into_bytes().to_vec()
    }
}

fn feed(mac: &mut HmacSha256, method: &str, signed: &str) {
    mac.update(method.as_bytes());
    mac.update(b" ");
    mac.update(signed.as_bytes());
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn signer(current: &str) -> UrlSigner {
        UrlSigner::new(
            [
                ("k1".to_string(), vec![1u8; 32]),
                ("k2".to_string(), vec![2u8; 48]),
            ],
            current,
        )
        .unwrap()
    }

    fn client() -> IpAddr {
        "203.0.113.7".parse().unwrap()
    }

    #[test]
    fn a_signed_link_works_for_its_request_until_it_expires() {
        let s = signer("k1");
        let url = s.sign("GET", "/downloads/report.pdf?v=3", NOW + 60, None);
        assert!(url.starts_with("/downloads/report.pdf?v=3&expires=1800000060&kid=k1&sig="));
        assert_eq!(s.verify("GET", &url, NOW, client()), Ok(()));
        assert_eq!(
            s.verify("GET", &url, NOW + 60, client()),
            Err(Refusal::Expired(NOW + 60))
        );
        assert_eq!(s.verify("DELETE", &url, NOW, client()), Err(Refusal::Tampered));
    }

    #[test]
    fn any_change_to_the_link_is_tampering() {
        let s = signer("k1");
        let url = s.sign("GET", "/files/a.txt", NOW + 60, None);
        for changed in [
            url.replace("/files/a.txt", "/files/b.txt"),
            url.replace("expires=1800000060", "expires=1900000060"),
            url.replace("?expires", "?x=1&expires"),
        ] {
            assert_eq!(
                s.verify("GET", &changed, NOW, client()),
                Err(Refusal::Tampered),
                "{changed}"
            );
        }
        let mut flipped = url.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(s.verify("GET", &flipped, NOW, client()), Err(Refusal::Tampered));
    }

    #[test]
    fn keys_rotate_and_an_unknown_or_missing_key_is_named() {
        let old = signer("k1").sign("GET", "/x", NOW + 60, None);
        let rotated = signer("k2");
        assert_eq!(
            rotated.verify("GET", &old, NOW, client()),
            Ok(()),
            "the old key still verifies"
        );
        let retired = UrlSigner::new([("k2".to_string(), vec![2u8; 48])], "k2").unwrap();
        assert_eq!(
            retired.verify("GET", &old, NOW, client()),
            Err(Refusal::UnknownKey("k1".into()))
        );
        let forged = old.replace("kid=k1", "kid=k2");
        assert_eq!(
            rotated.verify("GET", &forged, NOW, client()),
            Err(Refusal::Tampered)
        );
        assert_eq!(
            rotated.verify("GET", "/x?expires=1", NOW, client()),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            rotated.verify("GET", "/x?expires=1&sig=zz", NOW, client()),
            Err(Refusal::Malformed("sig"))
        );
    }

    #[test]
    fn a_link_for_one_client_refuses_the_others() {
        let s = signer("k1");
        let url = s.sign("GET", "/x", NOW + 60, Some(client()));
        assert_eq!(s.verify("GET", &url, NOW, client()), Ok(()));
        assert_eq!(
            s.verify("GET", &url, NOW, "198.51.100.1".parse().unwrap()),
            Err(Refusal::WrongClient)
        );
    }

    #[test]
    fn short_keys_odd_ids_and_a_missing_current_key_are_named() {
        let e = UrlSigner::new([("k 1".to_string(), vec![0u8; 16])], "k9").unwrap_err();
        assert_eq!(e.fields(), ["keys.k 1", "keys.k 1", "current"]);
        let debug = format!("{:?}", signer("k1"));
        assert!(!debug.contains("[1, 1"), "keys printed: {debug}");
    }
}
