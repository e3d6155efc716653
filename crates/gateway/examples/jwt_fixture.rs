//! Writes what `bench/gateway.sh edge` needs to measure token checks: a JWKS with
//! an ES256 key (made now) and an RS256 key (the tests' fixture), and a token of
//! each, valid for a day, for issuer `bench` and audience `bench`; and, given a
//! number of users, an ES256 token for each (`sub` `u0`, `u1`, ...), for
//! `bench/flash-sale.sh`.
//!
//! ```text
//! cargo run --release -p palisade-gateway --example jwt_fixture -- DIR [USERS]
//! ```
//! writes `DIR/jwks.json`, `DIR/es256.token`, `DIR/rs256.token` (and
//! `DIR/users.tokens`, one per line).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const RSA_DER: &[u8] = include_bytes!("../../edge/tests/keys/rsa.der");
const RSA_JWK: &str = include_str!("../../edge/tests/keys/rsa.jwk.json");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: jwt_fixture DIR [USERS]")?);
    let users: usize = std::env::args().nth(2).map_or(Ok(0), |n| n.parse())?;
    std::fs::create_dir_all(&dir)?;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let point = pair.public_key_raw();
    let ec = json!({ "kty": "EC", "crv": "P-256", "kid": "es", "alg": "ES256", "use": "sig",
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]) });
    let mut rsa: serde_json::Value = serde_json::from_str(RSA_JWK)?;
    rsa["kid"] = json!("rs");
    rsa["alg"] = json!("RS256");
    std::fs::write(dir.join("jwks.json"), json!({ "keys": [ec, rsa] }).to_string())?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 86_400;
    let claims = json!({ "iss": "bench", "aud": "bench", "sub": "load", "exp": exp });
    for (name, alg, kid, key) in [
        (
            "es256",
            Algorithm::ES256,
            "es",
            EncodingKey::from_ec_der(&pair.serialize_der()),
        ),
        (
            "rs256",
            Algorithm::RS256,
            "rs",
            EncodingKey::from_rsa_der(RSA_DER),
        ),
    ] {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        std::fs::write(
            dir.join(format!("{name}.token")),
            jsonwebtoken::encode(&header, &claims, &key)?,
        )?;
    }
    if users > 0 {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("es".into());
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut lines = String::new();
        for u in 0..users {
            let claims = json!({ "iss": "bench", "aud": "bench", "sub": format!("u{u}"), "exp": exp });
            lines.push_str(&jsonwebtoken::encode(&header, &claims, &key)?);
            lines.push('\n');
        }
        std::fs::write(dir.join("users.tokens"), lines)?;
    }
    Ok(())
}
