//! What the load harness's floor proxies share: `NAME LISTEN UPSTREAM [WORKERS]` on
//! the command line, and the gateway's worker model: `WORKERS` threads, each running
//! its own single-threaded runtime and accepting from the same listening socket.

use std::net::SocketAddr;

/// Parses the command line and runs `worker(listener, upstream)` on each worker
/// thread until they all end.
pub fn run(name: &str, worker: fn(std::net::TcpListener, SocketAddr)) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: {name} LISTEN UPSTREAM [WORKERS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN is ip:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM is ip:port");
    let workers = args.get(2).map_or(1, |w| w.parse().expect("WORKERS is a number"));
    let listener = std::net::TcpListener::bind(listen).expect("bind LISTEN");
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone().expect("a listener handle");
            std::thread::spawn(move || worker(listener, upstream))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
