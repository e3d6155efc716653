//! Token authentication, access rules and signed URLs against real sockets: an
//! in-test OpenID Connect issuer on loopback (discovery document and JWKS, keys
//! rotated by the test, fetches counted) and an upstream counting what reaches it.
//! Every refusal is checked for its status and for nothing having been sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use palisade_gateway::{Config, Handle};
use serde_json::{Value, json};

mod support;

use support::{Answer, send};

const RSA_DER: &[u8] = include_bytes!("../../edge/tests/keys/rsa.der");
const RSA_PUBLIC_PEM: &[u8] = include_bytes!("../../edge/tests/keys/rsa.pub.pem");
const RSA_JWK: &str = include_str!("../../edge/tests/keys/rsa.jwk.json");

/// A signing key and its JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn es256(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        SigningKey {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk,
        }
    }

    fn rs256(kid: &str) -> SigningKey {
        let mut jwk: Value = serde_json::from_str(RSA_JWK).unwrap();
        jwk["kid"] = json!(kid);
        SigningKey {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(RSA_DER),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// The in-test issuer: its JWKS (replaced by the test), whether it answers, and
/// what it was asked.
struct Issuer {
    addr: SocketAddr,
    jwks: Mutex<Vec<Value>>,
    up: AtomicBool,
    jwks_fetches: AtomicU32,
    paths: Mutex<Vec<String>>,
}

impl Issuer {
    async fn start(keys: &[&SigningKey]) -> Arc<Issuer> {
        let slot: Arc<Mutex<Option<Arc<Issuer>>>> = Arc::default();
        let s = slot.clone();
        let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
            let issuer = s.lock().unwrap().clone().unwrap();
            async move { Ok::<_, std::convert::Infallible>(issuer.answer(req.uri().path())) }
        })
        .await;
        let issuer = Arc::new(Issuer {
            addr,
            jwks: Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect()),
            up: AtomicBool::new(true),
            jwks_fetches: AtomicU32::new(0),
            paths: Mutex::default(),
        });
        *slot.lock().unwrap() = Some(issuer.clone());
        issuer
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        self.paths.lock().unwrap().push(path.to_owned());
        let body = match path {
            _ if !self.up.load(Ordering::SeqCst) => {
                return Response::builder().status(500).body(Full::default()).unwrap();
            }
            "/.well-known/openid-configuration" => {
                json!({ "issuer": self.url(), "jwks_uri": format!("{}/jwks", self.url()) })
            }
            "/jwks" => {
                self.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                json!({ "keys": *self.jwks.lock().unwrap() })
            }
            _ => return Response::builder().status(404).body(Full::default()).unwrap(),
        };
        Response::new(Full::new(Bytes::from(body.to_string())))
    }

    fn rotate(&self, keys: &[&SigningKey]) {
        *self.jwks.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> u32 {
        self.jwks_fetches.load(Ordering::SeqCst)
    }
}

/// An upstream answering 200 with the headers it was sent, counting requests.
async fn upstream() -> (Arc<AtomicU32>, SocketAddr) {
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let addr = support::serve_http1(move |req: Request<hyper::body::Incoming>| {
        s.fetch_add(1, Ordering::SeqCst);
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        async move {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                json!(headers).to_string(),
            ))))
        }
    })
    .await;
    (seen, addr)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(issuer: &Issuer) -> Value {
    json!({ "iss": issuer.url(), "aud": "api", "sub": "alice", "exp": now() + 600, "roles": ["reader"] })
}

/// A gateway with route `api` (to `up`) taking tokens of `issuer`; `provider` and
/// `auth` add to their tables.
async fn gateway(issuer: &Issuer, up: SocketAddr, provider: &str, auth: &str) -> Handle {
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false
max_header_bytes = 1048576

[gateway.jwt.corp]
discovery = "{url}"
issuer = "{url}"
audiences = ["api"]
algorithms = ["ES256", "RS256", "HS256"]
{provider}

[[routes]]
name = "api"
match = {{ path_prefix = "/" }}
cluster = "c"
auth = {{ jwt = "corp", forward_claims = {{ sub = "x-user-id", roles = "x-roles" }} {auth} }}

[clusters.c]
endpoints = ["{up}"]
"#,
        url = issuer.url()
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

async fn call(gw: &Handle, method: &str, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Answer {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    send(gw.addr, req.body(Full::default()).unwrap()).await
}

fn challenge(a: &Answer) -> &str {
    a.headers
        .get("www-authenticate")
        .map_or("", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_passes_with_its_claims_forwarded_and_the_clients_copies_removed() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let (seen, up) = upstream().await;
    let gw = gateway(&issuer, up, "", "").await;
    let token = key.sign(&claims(&issuer));
    let a = call(
        &gw,
        "GET",
        "/orders",
        Some(&token),
        &[("x-user-id", "mallory"), ("x-roles", "admin")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let sent: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(sent["x-user-id"], "alice");
    assert_eq!(sent["x-roles"], "reader");
    // The token is forwarded by default.
    assert!(sent["authorization"].as_str().unwrap().starts_with("Bearer "));
    // Without a token: a 401 with its challenge, nothing sent, and no spoofed
    // header ever passes.
    let none = call(&gw, "GET", "/orders", None, &[("x-user-id", "mallory")]).await;
    assert_eq!(
        (none.status, none.cause()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert_eq!(challenge(&none), "Bearer realm=\"api\"");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    // The second time, the same token is a cache hit: still good.
    assert_eq!(
        call(&gw, "GET", "/orders", Some(&token), &[]).await.status,
        StatusCode::OK
    );
    // RS256 from the same issuer.
    let rsa = SigningKey::rs256("r1");
    issuer.rotate(&[&key, &rsa]);
    let gw = gateway(&issuer, up, "", "").await;
    assert_eq!(
        call(&gw, "GET", "/", Some(&rsa.sign(&claims(&issuer))), &[])
            .await
            .status,
        StatusCode::OK
    );
}

/// `token`'s parts, with `edit` applied to its header and claims, re-encoded
/// without re-signing.
fn forged(token: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut header: Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    edit(&mut header, &mut claims);
    let enc = |v: &Value| B64.encode(v.to_string());
    format!("{}.{}.{}", enc(&header), enc(&claims), parts[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_corpus_is_refused_and_nothing_reaches_upstream() {
    let key = SigningKey::es256("k1");
    let rsa = SigningKey::rs256("r1");
    let issuer = Issuer::start(&[&key, &rsa]).await;
    let (seen, up) = upstream().await;
    let gw = gateway(&issuer, up, "", "").await;
    let good = claims(&issuer);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        key.sign(&c)
    };
    let hs256_with_rsa_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("r1".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(RSA_PUBLIC_PEM).unwrap()).unwrap()
    };
    let alg_none = {
        let enc = |v: Value| B64.encode(v.to_string());
        format!(
            "{}.{}.",
            enc(json!({"alg": "none", "kid": "k1"})),
            enc(good.clone())
        )
    };
    let corpus: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "algorithm"),
        (
            "HS256 signed with the RSA public key",
            hs256_with_rsa_public_key,
            "algorithm",
        ),
        (
            "tampered payload",
            forged(&key.sign(&good), |_, c| c["sub"] = json!("root")),
            "signature",
        ),
        ("expired", with(&|c| c["exp"] = json!(now() - 3600)), "expired"),
        (
            "expired, as a string",
            with(&|c| c["exp"] = json!((now() - 3600).to_string())),
            "expired",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(now() + 3600)),
            "not valid yet",
        ),
        (
            "not yet valid, as a string",
            with(&|c| c["nbf"] = json!((now() + 3600).to_string())),
            "not valid yet",
        ),
        (
            "an exp that is no time",
            with(&|c| c["exp"] = json!("tomorrow")),
            "malformed",
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "expiry",
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://evil.example")),
            "issuer",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!(["other"])),
            "audience",
        ),
        (
            "a kid that is a path",
            forged(&key.sign(&good), |h, _| h["kid"] = json!("../../etc/passwd")),
            "unknown key",
        ),
        ("a 1 MB token", "a".repeat(1_000_000), "over the limit"),
        ("not a JWT", "not-a-token".into(), "malformed"),
    ];
    for (what, token, why) in &corpus {
        let a = call(&gw, "GET", "/", Some(token), &[]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {}", a.body);
        assert!(
            challenge(&a).contains("error=\"invalid_token\""),
            "{what}: {}",
            challenge(&a)
        );
        assert!(a.body.contains(why), "{what}: {}", a.body);
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    // The path-like kid was looked up, never fetched: the issuer saw only its own
    // two documents.
    let paths = issuer.paths.lock().unwrap().clone();
    assert!(
        paths
            .iter()
            .all(|p| p == "/jwks" || p == "/.well-known/openid-configuration"),
        "{paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_costs_the_issuer_at_most_one_fetch_per_interval() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let (seen, up) = upstream().await;
    let gw = gateway(&issuer, up, "min_refetch_interval = \"1h\"", "").await;
    let before = issuer.fetches();
    for i in 0..200 {
        let token = forged(&key.sign(&claims(&issuer)), |h, _| {
            h["kid"] = json!(format!("random-{i}"))
        });
        assert_eq!(
            call(&gw, "GET", "/", Some(&token), &[]).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(
        issuer.fetches() - before <= 1,
        "{} fetches",
        issuer.fetches() - before
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_on_first_sight_and_a_retired_one_stops_working() {
    let (k1, k2) = (SigningKey::es256("k1"), SigningKey::es256("k2"));
    let issuer = Issuer::start(&[&k1]).await;
    let (_, up) = upstream().await;
    let gw = gateway(&issuer, up, "min_refetch_interval = \"1ms\"", "").await;
    let old = k1.sign(&claims(&issuer));
    assert_eq!(
        call(&gw, "GET", "/", Some(&old), &[]).await.status,
        StatusCode::OK
    );
    // The issuer rotates: k2 in, k1 out. A k2 token makes the gateway fetch again.
    issuer.rotate(&[&k2]);
    let new = k2.sign(&claims(&issuer));
    let a = call(&gw, "GET", "/", Some(&new), &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // The k1 token, verified before and cached, is checked against the new set.
    assert_eq!(
        call(&gw, "GET", "/", Some(&old), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_down_at_start_or_later_never_crashes_the_gateway() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    issuer.up.store(false, Ordering::SeqCst);
    let (seen, up) = upstream().await;
    let gw = gateway(&issuer, up, "min_refetch_interval = \"1ms\"", "").await;
    let token = key.sign(&claims(&issuer));
    // No keys yet: the route cannot check tokens.
    let a = call(&gw, "GET", "/", Some(&token), &[]).await;
    assert_eq!(
        (a.status, a.cause()),
        (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable")
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    // The issuer comes back: the next request's refetch brings the keys.
    issuer.up.store(true, Ordering::SeqCst);
    assert_eq!(
        call(&gw, "GET", "/", Some(&token), &[]).await.status,
        StatusCode::OK
    );
    // Down again: a refetch fails, the last good set stays.
    issuer.up.store(false, Ordering::SeqCst);
    let unknown = forged(&token, |h, _| h["kid"] = json!("k9"));
    assert_eq!(
        call(&gw, "GET", "/", Some(&unknown), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let fresh = key.sign(&claims(&issuer));
    assert_eq!(
        call(&gw, "GET", "/", Some(&fresh), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_refuse_valid_tokens_without_the_role_with_a_403() {
    let key = SigningKey::es256("k1");
    let issuer = Issuer::start(&[&key]).await;
    let (seen, up) = upstream().await;
    let rules = r#", rules = [
        { methods = ["DELETE"], roles = ["admin"] },
        { path_prefix = "/orders", scopes = ["orders:read", "orders:write"], need = "all" },
    ], unmatched = "deny""#
        .replace('\n', " ");
    let gw = gateway(&issuer, up, "", &rules).await;
    let reader = key.sign(&claims(&issuer));
    let mut admin = claims(&issuer);
    admin["roles"] = json!(["admin"]);
    admin["scope"] = json!("orders:read orders:write");
    let admin = key.sign(&admin);
    let refused = call(&gw, "DELETE", "/orders/1", Some(&reader), &[]).await;
    assert_eq!(
        (refused.status, refused.cause()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(challenge(&refused).contains("insufficient_scope"));
    assert!(refused.body.contains("admin"), "{}", refused.body);
    assert_eq!(
        call(&gw, "GET", "/orders/1", Some(&reader), &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&gw, "GET", "/health", Some(&admin), &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert_eq!(
        call(&gw, "DELETE", "/orders/1", Some(&admin), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&gw, "GET", "/orders/1", Some(&admin), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_pass_and_every_altered_expired_or_misplaced_link_is_a_403_saying_which() {
    let (seen, up) = upstream().await;
    let dir = std::env::temp_dir().join(format!("palisade-links-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let (old_key, new_key) = ([7u8; 32], [9u8; 40]);
    std::fs::write(dir.join("old"), old_key).unwrap();
    std::fs::write(dir.join("new"), new_key).unwrap();
    let keys = format!(
        "signed_urls = {{ current = \"new\", keys = {{ old = {{ file = \"{}\" }}, new = {{ file = \"{}\" }} }} }}",
        dir.join("old").display(),
        dir.join("new").display(),
    );
    let gw = support::one_route_gateway(up, "files", &keys).await;
    let signer = palisade_edge::UrlSigner::new(
        [("old".into(), old_key.to_vec()), ("new".into(), new_key.to_vec())],
        "new",
    )
    .unwrap();
    let retired = palisade_edge::UrlSigner::new([("old".into(), old_key.to_vec())], "old").unwrap();
    let stranger = palisade_edge::UrlSigner::new([("zz".into(), [1u8; 32].to_vec())], "zz").unwrap();
    let later = now() + 600;
    let link = signer.sign("GET", "/files/report.pdf", later, None);
    let get = |path: String| {
        let gw = gw.addr;
        async move { send(gw, Request::get(path).body(Full::default()).unwrap()).await }
    };
    assert_eq!(get(link.clone()).await.status, StatusCode::OK);
    // A link signed with the previous key still works (rotation).
    assert_eq!(
        get(retired.sign("GET", "/files/a", later, None)).await.status,
        StatusCode::OK
    );
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(
        get(signer.sign("GET", "/files/b", later, Some(localhost)))
            .await
            .status,
        StatusCode::OK
    );
    let before = seen.load(Ordering::SeqCst);
    let refused = [
        ("unsigned", "/files/report.pdf".to_owned()),
        ("tampered", link.replace("report.pdf", "salaries.pdf")),
        (
            "tampered",
            link.replace(
                &format!("expires={later}"),
                &format!("expires={}", later + 86_400),
            ),
        ),
        (
            "unknown_key",
            stranger.sign("GET", "/files/report.pdf", later, None),
        ),
        (
            "expired",
            signer.sign("GET", "/files/report.pdf", now() - 1, None),
        ),
        (
            "wrong_client",
            signer.sign(
                "GET",
                "/files/report.pdf",
                later,
                Some("10.9.8.7".parse().unwrap()),
            ),
        ),
        ("malformed", format!("{link}zz")),
    ];
    for (reason, path) in refused {
        let a = get(path.clone()).await;
        assert_eq!(
            (a.status, a.cause()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}"
        );
        assert_eq!(a.headers["x-palisade-refusal"], reason, "{path}: {}", a.body);
    }
    // A link for a GET is not one for a DELETE.
    let delete = send(gw.addr, Request::delete(link).body(Full::default()).unwrap()).await;
    assert_eq!(delete.headers["x-palisade-refusal"], "tampered");
    assert_eq!(seen.load(Ordering::SeqCst), before);
}

#[test]
fn auth_config_errors_name_their_fields() {
    let text = r#"
[gateway.jwt.a]
jwks_url = "not a url"
algorithms = ["ES256", "none", "HS999"]

[gateway.jwt.b]
keys_file = "/nonexistent/jwks.json"
discovery = "https://id.example"

[[routes]]
name = "r"
cluster = "c"
auth = { jwt = "missing" }

[[routes]]
name = "s"
cluster = "c"
auth = { jwt = "a", rules = [{ methods = ["GE T"] }], forward_claims = { sub = "bad header" } }
signed_urls = { current = "k", keys = { k = { env = "PALISADE_TEST_UNSET_SECRET" } } }

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let errors = match Config::from_toml(text) {
        Err(e) => e.to_string(),
        Ok(c) => palisade_gateway::runtime::Runtime::compile(c)
            .expect_err("refused")
            .to_string(),
    };
    assert!(errors.contains("routes[0] (r).auth.jwt"), "{errors}");
    let text = text.replace("jwt = \"missing\"", "jwt = \"a\"");
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(&text).unwrap())
        .expect_err("refused")
        .to_string();
    for field in [
        "gateway.jwt.a.jwks_url",
        "gateway.jwt.a.algorithms[1]",
        "gateway.jwt.a.algorithms[2]",
        "gateway.jwt.b",
        "routes[1] (s).auth.rules[0].methods[0]",
        "routes[1] (s).auth.forward_claims.sub",
        "routes[1] (s).signed_urls.keys.k.env",
    ] {
        assert!(errors.contains(field), "{field} not named in: {errors}");
    }
}
