//! A pipelined connection to Redis for one Lua script whose reply is three integers
//! (the global rate limit's GCRA). redis-rs's multiplexed connection cost some 16k
//! instructions per call in the gateway (its command builder, its generic pipeline
//! and a combinator-based RESP parser); this one writes each `EVALSHA` from a
//! template made once (only the key changes between calls) and reads replies with
//! a parser of a few lines.
//!
//! Calls go over a channel to a task that owns the socket: it writes every call
//! waiting (one `write` for a burst), then reads replies in order, answering each
//! caller. Each proxy worker has a connection of its own, driven on its own
//! runtime, so a call never wakes another thread. The script is loaded
//! (`SCRIPT LOAD`) when the connection opens and again after a `NOSCRIPT`.
//!
//! The connection bounds its calls itself: a call not answered within the timeout
//! means Redis is stuck, so every call waiting fails and the connection closes
//! (the next call opens a new one). One timer per connection does this, re-armed
//! only when it fires, instead of a timer per call. A socket that fails fails
//! every call waiting the same way.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Where a call's reply goes.
type ReplyTo = oneshot::Sender<Result<[i64; 3], String>>;

/// One call: its command, and where its reply goes.
struct Call {
    command: Vec<u8>,
    reply: ReplyTo,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    script: &'static str,
    timeouts: Timeouts,
}

/// How long a call and a connection attempt may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From a call's write to its reply.
    pub call: Duration,
    /// To connect, authenticate and load the script.
    pub connect: Duration,
}

/// The script to run and its fixed arguments (`ARGV`); each call gives its key.
#[derive(Clone, Copy, Debug)]
pub struct Script {
    /// The Lua source.
    pub text: &'static str,
    /// `ARGV`, the same for every call.
    pub args: [u64; 2],
}

/// The connection (opened on first use, again after a failure).
pub struct ScriptConn {
    target: Target,
    /// `EVALSHA <sha> 1`, encoded; the key follows.
    head: Vec<u8>,
    /// The arguments, encoded; they follow the key.
    tail: Vec<u8>,
    /// Per worker (see [`crate::upstream::worker_slot`]): the running
    /// connection's channel.
    calls: Box<[Mutex<Option<mpsc::UnboundedSender<Call>>>]>,
}

impl std::fmt::Debug for ScriptConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptConn")
            .field("host", &self.target.host)
            .field("port", &self.target.port)
            .finish_non_exhaustive()
    }
}

impl ScriptConn {
    /// A connection per worker (`workers` of them, and one for other threads) to
    /// the Redis at `url` (`redis://[user:password@]host:port[/db]`) for `script`;
    /// the error says why the URL cannot be used.
    pub fn new(url: &str, script: Script, timeouts: Timeouts, workers: usize) -> Result<ScriptConn, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let info = client.get_connection_info();
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err("must be a redis://host:port/db URL (plain TCP)".into());
        };
        let settings = info.redis_settings();
        let sha = redis::Script::new(script.text).get_hash().to_owned();
        let mut head = b"*6\r\n".to_vec();
        for part in [b"EVALSHA".as_slice(), sha.as_bytes(), b"1"] {
            bulk(&mut head, &[part]);
        }
        let mut tail = Vec::new();
        for arg in script.args {
            bulk(&mut tail, &[itoa::Buffer::new().format(arg).as_bytes()]);
        }
        Ok(ScriptConn {
            target: Target {
                host: host.clone(),
                port: *port,
                username: settings.username().map(str::to_owned),
                password: settings.password().map(str::to_owned),
                db: settings.db(),
                script: script.text,
                timeouts,
            },
            head,
            tail,
            calls: (0..=workers).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// Runs the script with the key made of `key`'s parts; its three integers.
    pub async fn call(&self, key: [&[u8]; 2]) -> Result<[i64; 3], String> {
        let mut command =
            Vec::with_capacity(self.head.len() + self.tail.len() + 32 + key[0].len() + key[1].len());
        command.extend_from_slice(&self.head);
        bulk(&mut command, &key);
        command.extend_from_slice(&self.tail);
        let (reply, answer) = oneshot::channel();
        self.sender()
            .send(Call { command, reply })
            .map_err(|_| "the connection ended".to_owned())?;
        answer.await.map_err(|_| "the connection ended".to_owned())?
    }

    /// The calling worker's connection's channel, or a new connection's.
    fn sender(&self) -> mpsc::UnboundedSender<Call> {
        let mut slot = self.calls[crate::upstream::worker_slot(self.calls.len())]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(self.target.clone(), rx));
        *slot = Some(tx.clone());
        tx
    }
}

/// One bulk string made of `parts`, in RESP.
fn bulk(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// `parts` as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(parts.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for p in parts {
        bulk(out, &[p]);
    }
}

/// One reply, as far as these commands need: a status, an error, a bulk string
/// (its text), an integer, or an array of three integers.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok(String),
    Error(String),
    Ints([i64; 3]),
}

/// A line ending at `\r\n` from `buf` at `at`: the line and where the next begins.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
    Some((&buf[at..end], end + 2))
}

/// The next reply in `buf` and its length, `Ok(None)` when it is not all there
/// yet; `Err` for bytes that are no reply of these commands.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some((first, mut at)) = line(buf, 0) else {
        return Ok(None);
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let int = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|s| s.parse::<i64>().ok());
    match first.split_first() {
        Some((b'+', rest)) => Ok(Some((Reply::Ok(text(rest)), at))),
        Some((b'-', rest)) => Ok(Some((Reply::Error(text(rest)), at))),
        Some((b'$', len)) => {
            let len = int(len)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or("a bad bulk length")?;
            if buf.len() < at + len + 2 {
                return Ok(None);
            }
            Ok(Some((Reply::Ok(text(&buf[at..at + len])), at + len + 2)))
        }
        Some((b'*', b"3")) => {
            let mut ints = [0i64; 3];
            for slot in &mut ints {
                let Some((item, next)) = line(buf, at) else {
                    return Ok(None);
                };
                match item.split_first() {
                    Some((b':', n)) => *slot = int(n).ok_or("a bad integer")?,
                    _ => return Err(format!("an unexpected reply item {:?}", text(item))),
                }
                at = next;
            }
            Ok(Some((Reply::Ints(ints), at)))
        }
        _ => Err(format!("an unexpected reply {:?}", text(first))),
    }
}

/// Reads replies until `wanted` have come, for the connection's setup.
async fn setup_replies(stream: &mut TcpStream, buf: &mut BytesMut, wanted: usize) -> Result<(), String> {
    let mut got = 0;
    while got < wanted {
        while let Some((reply, used)) = parse(buf)? {
            buf.advance(used);
            if let Reply::Error(e) = reply {
                return Err(e);
            }
            got += 1;
        }
        if got < wanted && stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("Redis closed the connection".into());
        }
    }
    Ok(())
}

/// Opens the connection: authenticates, selects the database, loads the script.
async fn open(t: &Target) -> Result<(TcpStream, BytesMut), String> {
    let timeout = t.timeouts.connect;
    let connect = TcpStream::connect((t.host.as_str(), t.port));
    let mut stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("no connection within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut wanted = 1;
    match (&t.username, &t.password) {
        (Some(u), Some(p)) => encode(&mut out, &[b"AUTH", u.as_bytes(), p.as_bytes()]),
        (None, Some(p)) => encode(&mut out, &[b"AUTH", p.as_bytes()]),
        _ => wanted -= 1,
    }
    if t.db != 0 {
        encode(&mut out, &[b"SELECT", t.db.to_string().as_bytes()]);
        wanted += 1;
    }
    encode(&mut out, &[b"SCRIPT", b"LOAD", t.script.as_bytes()]);
    wanted += 1;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(4096);
    let setup = setup_replies(&mut stream, &mut buf, wanted);
    tokio::time::timeout(timeout, setup)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    Ok((stream, buf))
}

/// The calls written and not answered yet, oldest first, each with the time its
/// reply is due by.
type Waiting = VecDeque<(ReplyTo, Instant)>;

/// The connection's task: writes the calls, reads their replies in order, until
/// the socket fails, a reply is late, or every sender is gone.
async fn run(t: Target, mut rx: mpsc::UnboundedReceiver<Call>) {
    let (mut stream, mut buf) = match open(&t).await {
        Ok(opened) => opened,
        Err(e) => return fail_all(&mut rx, Waiting::new(), &e),
    };
    let mut waiting = Waiting::new();
    let mut out = Vec::new();
    let mut reload = false;
    // Due at the oldest call's time or earlier; when it fires early it is set to
    // the oldest call's time then, so it is re-armed about once per timeout.
    let timer = tokio::time::sleep(t.timeouts.call);
    tokio::pin!(timer);
    let mut armed = false;
    loop {
        tokio::select! {
            call = rx.recv() => {
                let Some(first) = call else { return };
                let due = Instant::now() + t.timeouts.call;
                // Every call already waiting goes in the same write.
                if reload {
                    encode(&mut out, &[b"SCRIPT", b"LOAD", t.script.as_bytes()]);
                    waiting.push_back((oneshot::channel().0, due));
                    reload = false;
                }
                let mut next = Some(first);
                while let Some(c) = next {
                    out.extend_from_slice(&c.command);
                    waiting.push_back((c.reply, due));
                    next = rx.try_recv().ok();
                }
                if !armed {
                    timer.as_mut().reset(due);
                    armed = true;
                }
                if let Err(e) = write_out(&mut stream, &out, due).await {
                    return fail_all(&mut rx, waiting, &e);
                }
                out.clear();
            }
            () = &mut timer, if armed => match waiting.front() {
                None => armed = false,
                Some((_, due)) if *due <= Instant::now() => {
                    let why = format!("no reply within {:?}", t.timeouts.call);
                    return fail_all(&mut rx, waiting, &why);
                }
                Some((_, due)) => timer.as_mut().reset(*due),
            },
            read = stream.read_buf(&mut buf), if !waiting.is_empty() => {
                let read = match read {
                    Ok(0) => Err("Redis closed the connection".to_owned()),
                    Ok(_) => answer(&mut buf, &mut waiting, &mut reload),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = read {
                    return fail_all(&mut rx, waiting, &e);
                }
            }
        }
    }
}

/// Writes `out`, without a timer when the socket takes it all at once (the usual
/// case), else by `due`.
async fn write_out(stream: &mut TcpStream, out: &[u8], due: Instant) -> Result<(), String> {
    let written = match stream.try_write(out) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e.to_string()),
    };
    if written < out.len() {
        tokio::time::timeout_at(due, stream.write_all(&out[written..]))
            .await
            .map_err(|_| "Redis stopped reading".to_owned())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Answers the callers whose replies are whole in `buf`, oldest first; `reload`
/// set when the script must be loaded again.
fn answer(buf: &mut BytesMut, waiting: &mut Waiting, reload: &mut bool) -> Result<(), String> {
    while let Some((reply, used)) = parse(buf)? {
        buf.advance(used);
        let Some((to, _)) = waiting.pop_front() else {
            return Err("a reply no call asked for".into());
        };
        let answer = match reply {
            Reply::Ints(v) => Ok(v),
            Reply::Error(e) => {
                *reload |= e.starts_with("NOSCRIPT");
                Err(e)
            }
            Reply::Ok(s) => Err(format!("an unexpected reply {s:?}")),
        };
        let _ = to.send(answer);
    }
    Ok(())
}

/// Fails every call waiting and every call still queued.
fn fail_all(rx: &mut mpsc::UnboundedReceiver<Call>, waiting: Waiting, why: &str) {
    rx.close();
    for (to, _) in waiting {
        let _ = to.send(Err(why.to_owned()));
    }
    while let Ok(c) = rx.try_recv() {
        let _ = c.reply.send(Err(why.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_whole_or_not_at_all() {
        let r = b"*3\r\n:1\r\n:-5\r\n:120\r\n+OK\r\n";
        assert_eq!(parse(r).unwrap(), Some((Reply::Ints([1, -5, 120]), 19)));
        assert_eq!(parse(&r[19..]).unwrap(), Some((Reply::Ok("OK".into()), 5)));
        for cut in 0..19 {
            assert_eq!(parse(&r[..cut]).unwrap(), None, "{cut}");
        }
        assert_eq!(
            parse(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Ok("abc".into()), 9))
        );
        assert_eq!(parse(b"$3\r\nab").unwrap(), None);
        assert!(
            matches!(parse(b"-NOSCRIPT x\r\n").unwrap(), Some((Reply::Error(e), 13)) if e.starts_with("NOSCRIPT"))
        );
        assert!(parse(b"*2\r\n:1\r\n:2\r\n").is_err());
        assert!(parse(b"*3\r\n$1\r\nx\r\n").is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"EVALSHA", b"ab", b"1", b"k"]);
        assert_eq!(out, b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n");
    }
}
