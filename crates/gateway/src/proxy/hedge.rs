//! Hedged requests: an attempt slower than the route's hedge delay gets a copy sent
//! to another endpoint, and the first good answer wins ("The Tail at Scale"). The
//! other is cancelled: its request dropped, its breaker told nothing. A copy that
//! fails while the other still runs is judged and the other awaited. Hedges spend
//! the route's retry budget, so they add at most its share of load to a cluster
//! that is slow for everyone.

use super::admit::Prepared;
use super::attempt::{Attempts, Launch};
use super::{Attempted, Failure};
use crate::load::RouteHedge;
use crate::route::Route;
use crate::upstream::Upstream;
use std::sync::Arc;

/// Runs the attempt `first`, hedged after the route's delay; the answer that wins
/// (or, when both copies fail, the last failure).
pub(super) async fn race(
    route: &Route,
    up: &Arc<Upstream>,
    hedge: &RouteHedge,
    attempts: &mut Attempts,
    req: &mut Prepared,
    first: Launch,
) -> Result<Attempted, Failure> {
    let first_addr = first.addr();
    let primary = first.send(up, None);
    tokio::pin!(primary);
    tokio::select! {
        biased;
        done = &mut primary => return done.map(|a| recorded(hedge, a)),
        () = tokio::time::sleep(hedge.delay()) => {}
    }
    let Some(second) = attempts.hedge(route, up, req, first_addr) else {
        return primary.await.map(|a| recorded(hedge, a));
    };
    let copy = second.send(up, None);
    tokio::pin!(copy);
    let (mut done, copy_first) = tokio::select! {
        a = &mut primary => (a?, false),
        b = &mut copy => (b?, true),
    };
    // A good answer wins: the other copy is dropped (cancelled) on return.
    let winner = if done.succeeded() {
        Ok((done, copy_first))
    } else {
        done.settle();
        attempts.retrying(done.addr);
        if copy_first {
            primary.await.map(|a| (a, false))
        } else {
            copy.await.map(|a| (a, true))
        }
    };
    let (attempted, copy_won) = winner?;
    let outcome = if copy_won { "won" } else { "lost" };
    metrics::counter!("palisade_route_hedges_total", "route" => route.name.clone(), "outcome" => outcome)
        .increment(1);
    Ok(recorded(hedge, attempted))
}

/// Records a good answer's latency, which an adaptive hedge delay follows.
fn recorded(hedge: &RouteHedge, a: Attempted) -> Attempted {
    if a.succeeded() {
        hedge.record(a.latency);
    }
    a
}
