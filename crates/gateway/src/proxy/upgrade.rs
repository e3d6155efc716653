//! Protocol upgrades: WebSocket over HTTP/1.1 and over HTTP/2 (extended CONNECT),
//! and the tunnel the two upgraded connections are joined by.

use std::net::SocketAddr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use palisade_resilience::bulkhead::BulkheadPermit;

use crate::Body;
use crate::route::Route;
use crate::runtime::Runtime;

use super::answer::downstream_response;
use super::headers::connection_tokens;

/// A request to leave HTTP for another protocol on the same connection.
pub(super) struct Upgrade {
    /// What `Upgrade` names (`websocket`, ...).
    pub(super) protocol: HeaderValue,
    /// Asked by HTTP/2's extended CONNECT, not by an HTTP/1.1 `Upgrade`.
    pub(super) over_h2: bool,
}

/// Marks an HTTP/2 extended CONNECT (RFC 8441: WebSocket over HTTP/2) and turns its
/// method into the `GET` of the HTTP/1.1 upgrade it is sent upstream as, so routes
/// match both alike. Returns whether `req` was one.
pub(super) fn mark_extended_connect<B>(req: &mut Request<B>) -> bool {
    if req.method() != Method::CONNECT {
        return false;
    }
    let Some(protocol) = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
    else {
        return false;
    };
    *req.method_mut() = Method::GET;
    req.extensions_mut().insert(ExtendedConnect(protocol));
    true
}

/// The protocol an HTTP/2 extended CONNECT asked for.
#[derive(Clone)]
pub(super) struct ExtendedConnect(HeaderValue);

/// The protocol a request asks to switch to: an HTTP/1.1 request's `Upgrade` header
/// when `Connection` names `upgrade`, or what an extended CONNECT asked for.
pub(super) fn upgrade_protocol<B>(req: &Request<B>) -> Option<Upgrade> {
    match req.version() {
        Version::HTTP_11 => {
            let protocol = req.headers().get(header::UPGRADE)?;
            if !connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case(b"upgrade")) {
                return None;
            }
            let protocol = protocol.clone();
            Some(Upgrade {
                protocol,
                over_h2: false,
            })
        }
        Version::HTTP_2 => req.extensions().get::<ExtendedConnect>().map(|e| Upgrade {
            protocol: e.0.clone(),
            over_h2: true,
        }),
        _ => None,
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 section 4.1).
pub(super) fn websocket_key() -> HeaderValue {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bits = fastrand::u128(..);
    let mut key = [b'='; 24];
    // 128 bits are 21 whole sextets and 2 bits, padded to a 22nd sextet.
    for (i, c) in key.iter_mut().take(22).enumerate() {
        let sextet = if i < 21 {
            (bits >> (122 - 6 * i)) & 0x3f
        } else {
            (bits & 0x3) << 4
        };
        *c = B64[sextet as usize];
    }
    HeaderValue::from_bytes(&key).expect("base64 is a valid header value")
}

/// Answers the client with the endpoint's 101 and joins the two upgraded
/// connections, copying bytes both ways until either side closes.
pub(super) fn tunnel(
    rt: &Runtime,
    route: &Route,
    addr: SocketAddr,
    mut resp: Response<Incoming>,
    (upgrade, client_half): (Upgrade, hyper::upgrade::OnUpgrade),
    request_id: &HeaderValue,
    slot: Option<BulkheadPermit>,
) -> Response<Body> {
    let upstream_half = hyper::upgrade::on(&mut resp);
    let proto = resp.headers().get(header::UPGRADE).cloned();
    let mut out = downstream_response(resp, request_id, None);
    if upgrade.over_h2 {
        // HTTP/2 opens the tunnel with a 200 and has no key to accept (RFC 8441).
        *out.status_mut() = StatusCode::OK;
        out.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        if let Some(proto) = proto {
            out.headers_mut().insert(header::UPGRADE, proto);
        }
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let route_name = route.name.clone();
    metrics::counter!("palisade_upgrades_total", "route" => route_name.clone()).increment(1);
    let tunnels = rt.tunnels.clone();
    let idle = rt.config.gateway.tunnel_idle_timeout.get();
    tokio::spawn(async move {
        // The cluster's bulkhead slot is held for as long as the tunnel is open.
        let _slot = slot;
        let (client, upstream) = match tokio::try_join!(client_half, upstream_half) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, route = route_name, %addr, "upgrade failed");
                return;
            }
        };
        let active = metrics::gauge!("palisade_tunnels_active");
        active.increment(1.0);
        let client = hyper_util::rt::TokioIo::new(client);
        let upstream = hyper_util::rt::TokioIo::new(upstream);
        match tunnels.join(client, upstream, idle).await {
            Ok((up, down)) => tracing::debug!(route = route_name, %addr, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(error = %e, route = route_name, %addr, "tunnel ended"),
        }
        active.decrement(1.0);
    });
    out
}
