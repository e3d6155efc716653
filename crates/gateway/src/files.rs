//! Static content hosting (`static_files = { root = ... }`): a route that answers
//! from a directory. `GET` and `HEAD` only; `ETag` and `Last-Modified` with
//! conditional requests (`If-None-Match`, `If-Modified-Since`, `If-Range`); one
//! byte `Range` (a `206`, or a `416`); precompressed `.br` / `.gz` files when the
//! client accepts them; `Cache-Control` from the configuration.
//!
//! No request escapes the directory: the path is the one the gateway normalised
//! (dot segments resolved, climbing above the root refused), its prefix taken off,
//! each segment percent-decoded once and refused if it is then `.`, `..`, holds a
//! `/`, `\` or NUL, or (unless `hidden`) starts with a dot. Symbolic links follow
//! the route's policy: `deny` (the default: a link anywhere on the way is a `404`),
//! `within-root`, or `follow`. A directory without its index is a `404`: nothing
//! is ever listed.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use crate::config::{ConfigError, StaticFilesConfig, SymlinkPolicy};
use crate::conn::ActiveGuard;
use crate::{Body, BoxError, empty, full};

/// A route's directory, compiled.
#[derive(Debug)]
pub struct StaticFiles {
    root: PathBuf,
    strip_prefix: String,
    index: Option<String>,
    cache_control: Option<HeaderValue>,
    precompressed: bool,
    symlinks: SymlinkPolicy,
    hidden: bool,
}

/// A file found for a request: where, its metadata, its encoding.
struct Found {
    path: PathBuf,
    len: u64,
    modified: SystemTime,
    encoding: Option<&'static str>,
    content_type: &'static str,
}

impl StaticFiles {
    /// Compiles a route's `static_files` table (`at`: its path); `prefix`: the
    /// route's `match.path_prefix`.
    pub(crate) fn compile(
        c: &StaticFilesConfig,
        prefix: Option<&str>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<StaticFiles> {
        let root = match std::fs::canonicalize(&c.root) {
            Ok(root) if root.is_dir() => root,
            Ok(_) => {
                p.push(ConfigError::new(
                    format!("{at}.root"),
                    format!("{} is not a directory", c.root.display()),
                ));
                return None;
            }
            Err(e) => {
                p.push(ConfigError::new(
                    format!("{at}.root"),
                    format!("{}: {e}", c.root.display()),
                ));
                return None;
            }
        };
        let cache_control = match &c.cache_control {
            Some(v) => match HeaderValue::from_str(v) {
                Ok(v) => Some(v),
                Err(_) => {
                    p.push(ConfigError::new(
                        format!("{at}.cache_control"),
                        "is not a header value",
                    ));
                    return None;
                }
            },
            None => None,
        };
        if c.index
            .as_deref()
            .is_some_and(|i| i.is_empty() || i.contains(['/', '\\']))
        {
            p.push(ConfigError::new(format!("{at}.index"), "must be a file name"));
            return None;
        }
        let strip = c.strip_prefix.as_deref().or(prefix).unwrap_or("");
        Some(StaticFiles {
            root,
            strip_prefix: strip.trim_end_matches('/').to_owned(),
            index: c.index.clone(),
            cache_control,
            precompressed: c.precompressed,
            symlinks: c.symlinks,
            hidden: c.hidden,
        })
    }

    /// Answers `req` from the directory; `active` (the request's mark on its
    /// connection) is held until the file's body has been sent.
    pub async fn serve<B>(&self, req: &Request<B>, active: Option<ActiveGuard>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            let mut resp = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served here",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let Some(relative) = self.relative(req.uri().path()) else {
            return plain(StatusCode::NOT_FOUND, "no such file");
        };
        let accepted = accepted_encodings(req.headers());
        let ranged = req.headers().contains_key(header::RANGE);
        let found = match self.find(&relative, if ranged { &[] } else { &accepted }).await {
            Some(f) => f,
            None => return plain(StatusCode::NOT_FOUND, "no such file"),
        };
        self.answer(req.headers(), found, head, active).await
    }

    /// The path under the root: the prefix taken off, each segment decoded once and
    /// checked; `None` for anything that could leave the root or name a hidden file.
    fn relative(&self, path: &str) -> Option<PathBuf> {
        let rest = path.strip_prefix(self.strip_prefix.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let mut out = PathBuf::new();
        for segment in rest.split('/').filter(|s| !s.is_empty()) {
            let decoded = percent_decode(segment)?;
            let bad = decoded == "." || decoded == ".." || decoded.contains(['/', '\\', '\0']);
            if bad || (!self.hidden && decoded.starts_with('.')) {
                return None;
            }
            out.push(decoded);
        }
        // Only plain names are left.
        out.components()
            .all(|c| matches!(c, Component::Normal(_)))
            .then_some(out)
    }

    /// The file for `relative` (a directory's index), preferring an accepted
    /// precompressed twin.
    async fn find(&self, relative: &Path, accepted: &[&'static str]) -> Option<Found> {
        let mut path = self.allowed(&self.root.join(relative)).await?;
        let mut meta = tokio::fs::metadata(&path).await.ok()?;
        if meta.is_dir() {
            path = self.allowed(&path.join(self.index.as_ref()?)).await?;
            meta = tokio::fs::metadata(&path).await.ok()?;
        }
        if !meta.is_file() {
            return None;
        }
        let content_type = content_type(&path);
        if self.precompressed {
            for (encoding, ext) in [("br", "br"), ("gzip", "gz")] {
                if !accepted.contains(&encoding) {
                    continue;
                }
                let mut twin = path.clone().into_os_string();
                twin.push(".");
                twin.push(ext);
                if let Some(twin) = self.allowed(Path::new(&twin)).await
                    && let Ok(m) = tokio::fs::metadata(&twin).await
                    && m.is_file()
                {
                    return Some(Found {
                        path: twin,
                        len: m.len(),
                        modified: m.modified().ok()?,
                        encoding: Some(encoding),
                        content_type,
                    });
                }
            }
        }
        Some(Found {
            len: meta.len(),
            modified: meta.modified().ok()?,
            path,
            encoding: None,
            content_type,
        })
    }

    /// `path` if the symlink policy lets it be read.
    async fn allowed(&self, path: &Path) -> Option<PathBuf> {
        match self.symlinks {
            SymlinkPolicy::Follow => Some(path.to_path_buf()),
            SymlinkPolicy::WithinRoot => {
                let real = tokio::fs::canonicalize(path).await.ok()?;
                real.starts_with(&self.root).then_some(real)
            }
            SymlinkPolicy::Deny => {
                // Every component below the root must be no link.
                let below = path.strip_prefix(&self.root).ok()?;
                let mut at = self.root.clone();
                for c in below.components() {
                    at.push(c);
                    if tokio::fs::symlink_metadata(&at)
                        .await
                        .ok()?
                        .file_type()
                        .is_symlink()
                    {
                        return None;
                    }
                }
                Some(at)
            }
        }
    }

    async fn answer(
        &self,
        asked: &HeaderMap,
        f: Found,
        head: bool,
        active: Option<ActiveGuard>,
    ) -> Response<Body> {
        let etag = etag(&f);
        let modified = f.modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(f.modified)) {
            h.insert(header::LAST_MODIFIED, v);
        }
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(f.content_type));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
        if let Some(cc) = &self.cache_control {
            h.insert(header::CACHE_CONTROL, cc.clone());
        }
        if self.precompressed {
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        if let Some(e) = f.encoding {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
        }
        if not_modified(asked, &etag, modified) {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = h;
            return resp;
        }
        let range = match range(asked, &etag, modified, f.len) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = plain(StatusCode::RANGE_NOT_SATISFIABLE, "the range is outside the file");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", f.len)) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return resp;
            }
        };
        let (status, start, len) = match range {
            Some((start, end)) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", f.len)) {
                    h.insert(header::CONTENT_RANGE, v);
                }
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
            None => (StatusCode::OK, 0, f.len),
        };
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let body = if head {
            empty()
        } else {
            match open(&f.path, start).await {
                Some(file) => FileBody::new(file, len, active).boxed(),
                None => return plain(StatusCode::NOT_FOUND, "no such file"),
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = h;
        resp
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn open(path: &Path, start: u64) -> Option<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await.ok()?;
    }
    Some(file)
}

/// A strong validator from the file's length, modification time and encoding.
fn etag(f: &Found) -> String {
    let nanos = f.modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    match f.encoding {
        Some(e) => format!("\"{:x}-{nanos:x}-{e}\"", f.len),
        None => format!("\"{:x}-{nanos:x}\"", f.len),
    }
}

/// Whether a `304` answers: `If-None-Match` decides when present (weak
/// comparison), else `If-Modified-Since`.
fn not_modified(asked: &HeaderMap, etag: &str, modified: u64) -> bool {
    if let Some(inm) = asked.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        return inm
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag);
    }
    asked
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .is_some_and(|since| modified <= since.as_secs())
}

/// The one byte range asked for, inclusive; `Ok(None)` for the whole file (no
/// `Range`, several ranges, another unit, or an `If-Range` the file no longer
/// matches); `Err` when the range lies outside the file.
fn range(asked: &HeaderMap, etag: &str, modified: u64, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = asked.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(cond) = asked.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let current = if cond.starts_with('"') {
            cond == etag
        } else {
            httpdate::parse_http_date(cond)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .is_some_and(|t| t.as_secs() == modified)
        };
        if !current {
            return Ok(None);
        }
    }
    let Some(one) = spec.trim().strip_prefix("bytes=").filter(|r| !r.contains(',')) else {
        return Ok(None);
    };
    let Some((first, last)) = one.trim().split_once('-') else {
        return Ok(None);
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match (first.trim().is_empty(), parse(first), parse(last)) {
        // The last n bytes.
        (true, _, Some(n)) if n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
        (false, Some(a), Some(b)) if a <= b => (a, b.min(len.saturating_sub(1))),
        (false, Some(a), None) if last.trim().is_empty() => (a, len.saturating_sub(1)),
        _ => return Ok(None),
    };
    if len == 0 || start >= len {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The encodings the client accepts (`br`, `gzip`), by `Accept-Encoding`.
fn accepted_encodings(h: &HeaderMap) -> Vec<&'static str> {
    let mut out = Vec::new();
    for v in h
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in v.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            let known = match name {
                n if n.eq_ignore_ascii_case("br") => "br",
                n if n.eq_ignore_ascii_case("gzip") => "gzip",
                _ => continue,
            };
            if !refused {
                out.push(known);
            }
        }
    }
    out
}

/// `%XX` decoded (once); `None` for a malformed escape or text that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The content type a file's extension names.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// A file's bytes as a body: `len` of them from where the file stands, read 64 KiB
/// at a time.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
    /// The request stays in progress on its connection while its file is sent
    /// (a long download is not an idle connection).
    _active: Option<ActiveGuard>,
}

impl FileBody {
    fn new(file: tokio::fs::File, len: u64, active: Option<ActiveGuard>) -> Self {
        FileBody {
            file,
            remaining: len,
            buf: BytesMut::new(),
            _active: active,
        }
    }
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining.min(64 << 10)).unwrap_or(64 << 10);
        this.buf.resize(want, 0);
        let mut read = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    // The file shrank since its length was read.
                    return Poll::Ready(Some(Err("the file ended early".into())));
                }
                this.remaining -= n as u64;
                let chunk = this.buf.split_to(n).freeze();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}
