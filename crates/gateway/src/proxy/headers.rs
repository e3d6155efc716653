//! The request as sent upstream: hop-by-hop headers removed, `x-forwarded-*` and
//! `x-request-id` set, the target in the form the endpoint's protocol wants.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

use super::{Downstream, REQUEST_ID, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1).
pub(super) static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
];

/// The tokens of every `Connection` header, trimmed. Tokens are ASCII (RFC 9110
/// section 5.6.2): bytes are split and trimmed, without decoding text.
pub(super) fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds which hop-by-hop ones are here (most messages
    // carry none, or only `Connection`); only those are removed, each removal being
    // a hash and a probe.
    const TE: u16 = 1 << 7; // after HOP_BY_HOP's bits
    const TRANSFER_ENCODING: u16 = TE << 1;
    let mut present = 0u16;
    for k in h.keys() {
        // Matched as text: a length test rules out almost every name at once, where
        // comparing `HeaderName`s costs a call per candidate.
        present |= match k.as_str() {
            "connection" => 1,
            "keep-alive" => 1 << 1,
            "proxy-connection" => 1 << 2,
            "proxy-authenticate" => 1 << 3,
            "proxy-authorization" => 1 << 4,
            "trailer" => 1 << 5,
            "upgrade" => 1 << 6,
            "te" => TE,
            "transfer-encoding" => TRANSFER_ENCODING,
            _ => 0,
        };
    }
    if present == 0 {
        return;
    }
    // Headers the Connection header names are hop-by-hop too. The usual tokens
    // (`keep-alive`, `close`, `upgrade`) name none beyond the fixed list, and then
    // nothing is allocated.
    let fixed = |t: &[u8]| {
        let same = |n: &str| n.len() == t.len() && n.as_bytes().eq_ignore_ascii_case(t);
        same("close") || HOP_BY_HOP.iter().any(|n| same(n.as_str()))
    };
    let named: Vec<HeaderName> = if present & 1 == 0 {
        Vec::new()
    } else {
        connection_tokens(h)
            .filter(|t| !fixed(t))
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect()
    };
    for n in &named {
        h.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if present & TRANSFER_ENCODING != 0 {
        h.remove(header::TRANSFER_ENCODING);
    }
    // TE: only "trailers" may pass (gRPC needs it).
    if present & TE != 0
        && let Some(te) = h.get(header::TE)
    {
        let trailers = te
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

/// Turns the client's headers into those sent upstream: hop-by-hop headers removed,
/// `Host` kept for HTTP/1.1 (HTTP/2 carries the authority), `x-forwarded-*` and
/// `x-request-id` set. `host` is the request's `Host` as admitted.
pub(super) fn prepare_headers(
    parts: &mut http::request::Parts,
    version: Version,
    from: Downstream,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
) {
    let authority = parts.uri.authority().map(|a| a.as_str());
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    // HTTP/2 carries the authority instead of `Host`; HTTP/1.1 needs one.
    if version != Version::HTTP_11 && host.is_some() {
        h.remove(header::HOST);
    }
    let sent = host;
    let host = match sent {
        Some(host) => Some(host),
        None => authority
            .and_then(|a| HeaderValue::from_str(a).ok())
            .inspect(|host| {
                if version == Version::HTTP_11 {
                    h.insert(header::HOST, host.clone());
                }
            }),
    };
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST, host);
    }
    let mut xff = Vec::with_capacity(16);
    if let Some(prev) = h.get(&X_FORWARDED_FOR) {
        xff.extend_from_slice(prev.as_bytes());
        xff.extend_from_slice(b", ");
    }
    write_ip(&mut xff, from.addr.ip());
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    let proto = if from.tls { "https" } else { "http" };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    h.insert(REQUEST_ID, request_id.clone());
}

/// The request target sent upstream: the path and query alone for HTTP/1.1
/// (origin-form; `Host` says the rest), the whole URI for HTTP/2, whose `:scheme`
/// (`https` over TLS) and `:authority` come from it.
pub(super) fn upstream_uri(addr: SocketAddr, original: &Uri, version: Version, tls: bool) -> Uri {
    let mut parts = http::uri::Parts::default();
    if version == Version::HTTP_2 {
        parts.scheme = Some(if tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        let mut text = Vec::with_capacity(24);
        write_addr(&mut text, addr);
        parts.authority = http::uri::Authority::from_maybe_shared(Bytes::from(text)).ok();
    }
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Appends `ip` as text: IPv4 by hand (this runs on every request, and the
/// formatting machinery costs more than the rest of building the upstream URI).
pub(super) fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_decimal(out, u16::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// Appends `addr` as `ip:port` (`[ip]:port` for IPv6).
pub(super) fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    if addr.is_ipv6() {
        out.push(b'[');
        write_ip(out, addr.ip());
        out.push(b']');
    } else {
        write_ip(out, addr.ip());
    }
    out.push(b':');
    write_decimal(out, addr.port());
}

pub(super) fn write_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use http::{Uri, Version};

    use super::super::upgrade::websocket_key;
    use super::*;

    fn addr_text(addr: &str) -> String {
        let mut out = Vec::new();
        write_addr(&mut out, addr.parse().unwrap());
        String::from_utf8(out).unwrap()
    }

    fn stripped(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        left.sort();
        left
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let own = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            stripped(&[("content-type", "text/plain"), ("x-a", "1")]),
            [own("content-type", "text/plain"), own("x-a", "1")]
        );
        assert_eq!(
            stripped(&[
                ("connection", "keep-alive, X-Secret"),
                ("connection", "close"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authorization", "Basic eA=="),
                ("trailer", "x-t"),
                ("upgrade", "websocket"),
                ("transfer-encoding", "chunked"),
                ("x-secret", "hop"),
                ("x-kept", "end to end"),
            ]),
            [own("x-kept", "end to end")]
        );
        // TE passes only as `trailers` (gRPC needs it), and not at all without it.
        assert_eq!(stripped(&[("te", "trailers, deflate")]), [own("te", "trailers")]);
        assert_eq!(stripped(&[("te", "gzip")]), []);
        assert_eq!(stripped(&[("connection", "te"), ("te", "trailers")]), []);
        // Each name alone: the pass that finds them and the removal agree on which is which.
        for name in HOP_BY_HOP
            .iter()
            .map(HeaderName::as_str)
            .chain(["te", "transfer-encoding"])
        {
            assert_eq!(
                stripped(&[(name, "x"), ("x-kept", "1")]),
                [own("x-kept", "1")],
                "{name}"
            );
        }
    }

    #[test]
    fn websocket_keys_are_16_random_bytes_in_base64() {
        const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for seed in [1, 2, 3, 0xdead_beef] {
            fastrand::seed(seed);
            let key = websocket_key();
            fastrand::seed(seed);
            let bits = fastrand::u128(..);
            let text = key.to_str().unwrap();
            assert_eq!(text.len(), 24, "{text}");
            assert!(text.ends_with("=="), "{text}");
            // 21 sextets hold the first 126 bits; the 22nd the last 2 and 4 zeros.
            let sextet = |i: usize| B64.find(text.as_bytes()[i] as char).unwrap() as u128;
            let head = (0..21).fold(0u128, |acc, i| (acc << 6) | sextet(i));
            assert_eq!(head, bits >> 2, "{text}");
            assert_eq!(sextet(21), (bits & 0x3) << 4, "{text}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_would() {
        for a in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:9",
            "[::1]:443",
            "[2001:db8::7]:10",
        ] {
            assert_eq!(addr_text(a), a.parse::<SocketAddr>().unwrap().to_string());
        }
        let ep: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let uri = upstream_uri(ep, &"/a/b?c=d".parse().unwrap(), Version::HTTP_2, false);
        assert_eq!(uri.to_string(), "http://10.0.0.2:81/a/b?c=d");
        let uri = upstream_uri(
            ep,
            &Uri::from_static("http://example.com"),
            Version::HTTP_2,
            false,
        );
        assert_eq!(uri.to_string(), "http://10.0.0.2:81/");
        let uri = upstream_uri(ep, &"/a".parse().unwrap(), Version::HTTP_2, true);
        assert_eq!(uri.to_string(), "https://10.0.0.2:81/a");
    }

    #[test]
    fn http1_upstreams_get_the_origin_form() {
        let ep: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let uri = upstream_uri(
            ep,
            &"http://example.com/a?b=c".parse().unwrap(),
            Version::HTTP_11,
            true,
        );
        assert_eq!(uri.to_string(), "/a?b=c");
        let uri = upstream_uri(
            ep,
            &Uri::from_static("http://example.com"),
            Version::HTTP_11,
            false,
        );
        assert_eq!(uri.to_string(), "/");
    }
}
