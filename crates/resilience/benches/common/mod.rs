//! Helpers shared by the benches: polling ready futures without a runtime, and
//! running a closure on two threads at once.

#![allow(dead_code)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::Criterion;
use tower::{Service, ServiceExt};

/// Polls a future that the benched services complete at once.
#[inline]
pub fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("bench service did not complete at once"),
    }
}

/// One request through a service: poll_ready, call, poll the future.
#[inline]
pub fn call<S: Service<u64>>(svc: &mut S, req: u64) -> Result<S::Response, S::Error> {
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("bench service not ready"),
    }
    now_or_never(svc.call(black_box(req)))
}

/// Runs `op` `iters` times on each of two threads at once; returns the wall time,
/// so the per-iteration figure is the cost of one call while another thread calls too.
pub fn two_threads<T: Send>(iters: u64, make: impl Fn() -> T + Sync, op: impl Fn(&mut T) + Sync) -> Duration {
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut state = make();
                barrier.wait();
                for _ in 0..iters {
                    op(&mut state);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

/// Short runs: these machines are shared; quote medians and ratios.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// Runs `iters` requests through `svc` inside one `block_on`, so the figure is the
/// per-request cost of the middleware, not of entering the runtime.
pub fn drive<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64) -> Duration
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let r = svc.ready().await.unwrap().call(std::hint::black_box(i)).await;
            std::hint::black_box(r.unwrap());
        }
        start.elapsed()
    })
}

/// A current-thread runtime with timers, for the layer benches.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}
