//! Active health probes: one task per cluster probes every endpoint each interval
//! (HTTP GET of a path that must answer 2xx, or a TCP connect) with a timeout, and
//! tells the cluster, which applies the thresholds.

use std::sync::Arc;

use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::config::ClusterSection;
use crate::upstream::Upstream;

/// Starts the probe task of `upstream`, if its cluster has health checks.
pub fn spawn(upstream: &Arc<Upstream>, section: &ClusterSection) -> Option<JoinHandle<()>> {
    let h = section.health.clone()?;
    let up = Arc::downgrade(upstream);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(h.interval.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(up) = up.upgrade() else { return };
            let probes = up.cluster.endpoints().into_iter().map(|ep| {
                let up = up.clone();
                let h = h.clone();
                async move {
                    let addr = ep.addr();
                    let passed = tokio::time::timeout(h.timeout.get(), async {
                        if h.kind == crate::config::HealthKind::Tcp {
                            tokio::net::TcpStream::connect(addr).await.is_ok()
                        } else {
                            probe_http(&up, addr, &h.path).await
                        }
                    })
                    .await
                    .unwrap_or(false);
                    up.cluster.record_probe(&ep, passed);
                }
            });
            join_all(probes).await;
            up.events.send_modify(|e| e.probe_rounds += 1);
        }
    }))
}

async fn probe_http(up: &Upstream, addr: std::net::SocketAddr, path: &str) -> bool {
    // HTTP/2 takes the authority from the URI; HTTP/1.1 from `Host`.
    let req = if up.version == http::Version::HTTP_2 {
        http::Request::get(format!("http://{addr}{path}"))
    } else {
        http::Request::get(path).header(http::header::HOST, addr.to_string())
    };
    let Ok(req) = req
        .version(up.version)
        .header(http::header::USER_AGENT, "palisade-health")
        .body(crate::empty())
    else {
        return false;
    };
    match up.pool().send(addr, req).await {
        Ok((resp, lease)) => {
            let ok = resp.status().is_success();
            // Read the body, then the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            drop(lease);
            ok
        }
        Err(_) => false,
    }
}

/// Runs futures concurrently on this task and waits for all of them.
async fn join_all<F: std::future::Future<Output = ()>>(futs: impl IntoIterator<Item = F>) {
    let mut set = Vec::from_iter(futs.into_iter().map(Box::pin));
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}
