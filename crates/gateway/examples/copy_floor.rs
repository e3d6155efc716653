//! The ceiling over any proxy built on tokio and sockets, for the load harness
//! (`bench/gateway.sh`): it does the least a proxy can do per request and nothing an
//! HTTP proxy must. Each client connection gets its own upstream connection; a
//! request's bytes are copied there as they came and the answer's bytes copied back.
//! No parsing beyond finding the end of the headers and the answer's
//! `content-length`, no pool, no header rewriting, no policies. It only speaks the
//! load harness's workload (`GET` without a body, answers with a `content-length`).
//!
//! What it costs per request is about the system calls alone: a proxy that does the
//! work HTTP asks for cannot be cheaper, so its throughput bounds every real proxy's
//! from above on the same machine.
//!
//! `cargo run --release -p palisade-gateway --example copy_floor -- LISTEN UPSTREAM [WORKERS]`

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

fn main() {
    common::run("copy_floor", worker);
}

fn worker(listener: std::net::TcpListener, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = relay(client, upstream).await;
            });
        }
    });
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let mut request = vec![0u8; 16 * 1024];
    let mut answer = vec![0u8; 16 * 1024];
    loop {
        let mut n = 0;
        while head_len(&request[..n]).is_none() {
            match client.read(&mut request[n..]).await? {
                0 => return Ok(()),
                k => n += k,
            }
        }
        up.write_all(&request[..n]).await?;
        let mut m = 0;
        let total = loop {
            match up.read(&mut answer[m..]).await? {
                0 => return Ok(()),
                k => m += k,
            }
            if let Some(head) = head_len(&answer[..m]) {
                break head + content_length(&answer[..head]);
            }
        };
        while m < total {
            match up.read(&mut answer[m..total]).await? {
                0 => return Ok(()),
                k => m += k,
            }
        }
        client.write_all(&answer[..m]).await?;
    }
}

/// The length of a message's head, up to and including the blank line, once whole.
fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .filter_map(|line| {
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok())?
        })
        .next()
        .unwrap_or(0)
}
