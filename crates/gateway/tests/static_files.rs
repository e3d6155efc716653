//! Static content hosting against real sockets: a directory of files (with
//! precompressed twins, a hidden file and symbolic links in and out of it) behind a
//! route with `static_files`, and every encoding of `..` a client might try.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use palisade_gateway::{Config, Handle};

mod support;

use support::{Answer, send};

/// A fresh directory: `index.html`, `a.txt` (and `.br` / `.gz` twins with other
/// contents, so the test can tell them apart), `big.bin`, `docs/index.html`,
/// `.env`, a link to `a.txt`, a link out to a file beside the root.
fn site() -> PathBuf {
    let base = std::env::temp_dir().join(format!("palisade-static-{:016x}", fastrand::u64(..)));
    let root = base.join("www");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("a.txt"), "plain text").unwrap();
    std::fs::write(root.join("a.txt.br"), "brotli bytes").unwrap();
    std::fs::write(root.join("a.txt.gz"), "gzip bytes").unwrap();
    std::fs::write(
        root.join("big.bin"),
        (0..=255u8).cycle().take(100_000).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(root.join("docs/index.html"), "docs").unwrap();
    std::fs::write(root.join(".env"), "SECRET=1").unwrap();
    std::fs::write(base.join("secret.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(root.join("a.txt"), root.join("inside-link.txt")).unwrap();
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("outside-link.txt")).unwrap();
    root
}

async fn gateway(root: &std::path::Path, extra: &str) -> Handle {
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch_config = false
escaped_slashes = "keep"

[[routes]]
name = "site"
match = {{ path_prefix = "/static" }}
static_files = {{ root = "{}", cache_control = "public, max-age=60" {extra} }}
"#,
        root.display()
    );
    palisade_gateway::start(Config::from_toml(&text).unwrap(), None)
        .await
        .unwrap()
}

async fn get(gw: &Handle, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(gw.addr, req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_their_type_validators_and_cache_headers() {
    let root = site();
    let gw = gateway(&root, "").await;
    let a = get(&gw, "/static/a.txt", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "plain text"));
    assert_eq!(a.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(a.headers["cache-control"], "public, max-age=60");
    assert_eq!(a.headers["content-length"], "10");
    assert!(a.headers.contains_key("etag") && a.headers.contains_key("last-modified"));
    // A directory is its index; the root too.
    assert_eq!(get(&gw, "/static/docs/", &[]).await.body, "docs");
    assert_eq!(get(&gw, "/static", &[]).await.body, "<h1>home</h1>");
    // HEAD: the same head, no body.
    let head = send(
        gw.addr,
        Request::head("/static/a.txt").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!((head.status, head.body.as_str()), (StatusCode::OK, ""));
    assert_eq!(head.headers["content-length"], "10");
    // Other methods are not served.
    let post = send(
        gw.addr,
        Request::post("/static/a.txt")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    assert_eq!(
        get(&gw, "/static/missing.txt", &[]).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_are_answered_304_and_if_range_guards_ranges() {
    let root = site();
    let gw = gateway(&root, "").await;
    let first = get(&gw, "/static/a.txt", &[]).await;
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    let modified = first.headers["last-modified"].to_str().unwrap().to_owned();
    let again = get(&gw, "/static/a.txt", &[("if-none-match", &etag)]).await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (StatusCode::NOT_MODIFIED, "")
    );
    assert_eq!(again.headers["etag"], etag.as_str());
    let weak = format!("\"other\", W/{etag}");
    assert_eq!(
        get(&gw, "/static/a.txt", &[("if-none-match", &weak)])
            .await
            .status,
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(
        get(&gw, "/static/a.txt", &[("if-none-match", "\"other\"")])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gw, "/static/a.txt", &[("if-modified-since", &modified)])
            .await
            .status,
        StatusCode::NOT_MODIFIED
    );
    // If-Range with a stale validator: the whole file, not the range.
    let stale = get(
        &gw,
        "/static/a.txt",
        &[("range", "bytes=0-4"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!(
        (stale.status, stale.body.as_str()),
        (StatusCode::OK, "plain text")
    );
    let fresh = get(
        &gw,
        "/static/a.txt",
        &[("range", "bytes=0-4"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(
        (fresh.status, fresh.body.as_str()),
        (StatusCode::PARTIAL_CONTENT, "plain")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_served_206_and_those_outside_the_file_416() {
    let root = site();
    let gw = gateway(&root, "").await;
    let all: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let r = send(
        gw.addr,
        Request::get("/static/big.bin")
            .header("range", "bytes=1000-1999")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers["content-range"], "bytes 1000-1999/100000");
    assert_eq!(r.headers["content-length"], "1000");
    assert_eq!(
        r.body.as_bytes(),
        String::from_utf8_lossy(&all[1000..2000]).as_bytes()
    );
    let tail = get(&gw, "/static/a.txt", &[("range", "bytes=-4")]).await;
    assert_eq!(
        (tail.status, tail.body.as_str()),
        (StatusCode::PARTIAL_CONTENT, "text")
    );
    let open = get(&gw, "/static/a.txt", &[("range", "bytes=6-")]).await;
    assert_eq!(open.body, "text");
    let outside = get(&gw, "/static/a.txt", &[("range", "bytes=50-60")]).await;
    assert_eq!(outside.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(outside.headers["content-range"], "bytes */10");
    // Several ranges: the whole file.
    assert_eq!(
        get(&gw, "/static/a.txt", &[("range", "bytes=0-1,4-5")])
            .await
            .status,
        StatusCode::OK
    );
    // The whole big file streams through.
    let whole = send(
        gw.addr,
        Request::get("/static/big.bin").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(whole.headers["content-length"], "100000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompressed_twins_are_served_to_clients_that_accept_them() {
    let root = site();
    let gw = gateway(&root, "").await;
    let br = get(&gw, "/static/a.txt", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(
        (br.body.as_str(), br.headers["content-encoding"].to_str().unwrap()),
        ("brotli bytes", "br")
    );
    assert_eq!(br.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(br.headers["vary"], "accept-encoding");
    let gz = get(&gw, "/static/a.txt", &[("accept-encoding", "gzip, br;q=0")]).await;
    assert_eq!(
        (gz.body.as_str(), gz.headers["content-encoding"].to_str().unwrap()),
        ("gzip bytes", "gzip")
    );
    // Each representation its own validator.
    assert_ne!(br.headers["etag"], gz.headers["etag"]);
    let plain = get(&gw, "/static/a.txt", &[("accept-encoding", "identity")]).await;
    assert_eq!(plain.body, "plain text");
    assert!(!plain.headers.contains_key("content-encoding"));
    let off = gateway(&root, ", precompressed = false").await;
    assert_eq!(
        get(&off, "/static/a.txt", &[("accept-encoding", "br")])
            .await
            .body,
        "plain text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_encoding_of_dot_dot_hidden_names_or_links_leaves_the_directory() {
    let root = site();
    let gw = gateway(&root, "").await;
    let refused = [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E/secret.txt",
        "/static/.%2e/secret.txt",
        "/static/..%2fsecret.txt",
        "/static/..%2Fsecret.txt",
        "/static/..%5csecret.txt",
        "/static/%252e%252e/secret.txt",
        "/static/a.txt%00.html",
        "/static/.env",
        "/static/%2eenv",
        "/static/outside-link.txt",
        "/static/inside-link.txt",
        "/staticx/a.txt",
    ];
    for path in refused {
        let a = get(&gw, path, &[]).await;
        assert!(
            a.status == StatusCode::NOT_FOUND || a.status == StatusCode::BAD_REQUEST,
            "{path}: {} {}",
            a.status,
            a.body
        );
        assert!(
            !a.body.contains("outside") && !a.body.contains("SECRET"),
            "{path}: {}",
            a.body
        );
    }
    // `within-root` follows the link inside and still refuses the one out; `follow`
    // follows both; `hidden` serves dot files.
    let within = gateway(&root, ", symlinks = \"within-root\"").await;
    assert_eq!(
        get(&within, "/static/inside-link.txt", &[]).await.body,
        "plain text"
    );
    assert_eq!(
        get(&within, "/static/outside-link.txt", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let follow = gateway(&root, ", symlinks = \"follow\", hidden = true").await;
    assert_eq!(
        get(&follow, "/static/outside-link.txt", &[]).await.body,
        "outside"
    );
    assert_eq!(get(&follow, "/static/.env", &[]).await.body, "SECRET=1");
}

#[test]
fn static_config_errors_name_their_fields() {
    let text = r#"
[[routes]]
name = "s"
cluster = "c"
static_files = { root = "/nonexistent/www" }

[[routes]]
name = "t"
mode = "async"
static_files = { root = "/nonexistent/www", index = "a/b", cache_control = "bad\nvalue" }

[clusters.c]
endpoints = ["127.0.0.1:1"]
"#;
    let errors = Config::from_toml(text).expect_err("refused").to_string();
    assert!(errors.contains("routes[0] (s).cluster"), "{errors}");
    assert!(errors.contains("routes[1] (t).mode"), "{errors}");
    let text = text
        .replace("cluster = \"c\"\nstatic", "static")
        .replace("mode = \"async\"\n", "");
    let errors = palisade_gateway::runtime::Runtime::compile(Config::from_toml(&text).unwrap())
        .expect_err("refused")
        .to_string();
    assert!(errors.contains("routes[0] (s).static_files.root"), "{errors}");
}
