//! A small etcd v3 client over etcd's JSON API (its gRPC gateway, served on the
//! client port since etcd 3.4): reads, writes, leases and watches, which is what
//! the configuration source, discovery and `palisade register` need. Keys and
//! values travel base64-encoded, 64-bit numbers as strings.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::http_client::Client;

/// A key and its value at a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision that last changed it.
    pub mod_revision: i64,
}

/// A change a watch saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put(Kv),
    /// A key was deleted (its lease expired, or by hand), at `revision`.
    Delete {
        /// The key.
        key: String,
        /// When.
        revision: i64,
    },
}

/// A connection to one etcd member.
#[derive(Debug)]
pub struct Etcd {
    base: Uri,
    timeout: Duration,
    client: Mutex<Client>,
}

impl Etcd {
    /// A client of the etcd at `base` (`http://host:2379`); each call must be
    /// answered within `timeout`.
    pub fn new(base: Uri, timeout: Duration) -> Etcd {
        Etcd {
            client: Mutex::new(Client::new(base.clone(), None, timeout)),
            base,
            timeout,
        }
    }

    /// The member's URL.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// `key`'s value now, and the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), String> {
        let v = self.call("/v3/kv/range", json!({"key": B64.encode(key)})).await?;
        Ok((kvs(&v).into_iter().next(), revision(&v)))
    }

    /// Every key under `prefix` now, and the store's revision.
    pub async fn prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), String> {
        let body = json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))});
        let v = self.call("/v3/kv/range", body).await?;
        Ok((kvs(&v), revision(&v)))
    }

    /// Writes `key`, tied to `lease` when given (it goes when the lease does).
    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), String> {
        let mut body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        if let Some(l) = lease {
            body["lease"] = Value::from(l.to_string());
        }
        self.call("/v3/kv/put", body).await.map(drop)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        self.call("/v3/kv/deleterange", json!({"key": B64.encode(key)}))
            .await
            .map(drop)
    }

    /// A new lease of `ttl` (whole seconds, at least 1); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, String> {
        let v = self
            .call(
                "/v3/lease/grant",
                json!({"TTL": ttl.as_secs().max(1).to_string()}),
            )
            .await?;
        int(&v["ID"]).ok_or_else(|| format!("no lease id in {v}"))
    }

    /// Renews lease `id`: its time left, or `None` when it has expired.
    pub async fn keep_alive(&self, id: i64) -> Result<Option<Duration>, String> {
        let v = self
            .call("/v3/lease/keepalive", json!({"ID": id.to_string()}))
            .await?;
        let ttl = int(&v["result"]["TTL"]).unwrap_or(0);
        Ok((ttl > 0).then(|| Duration::from_secs(ttl.unsigned_abs())))
    }

    /// Ends lease `id` now (its keys are deleted).
    pub async fn revoke(&self, id: i64) -> Result<(), String> {
        self.call("/v3/lease/revoke", json!({"ID": id.to_string()}))
            .await
            .map(drop)
    }

    /// Watches `key` (every key under it, with `prefix`) from `from_revision` on,
    /// on a connection of its own.
    pub async fn watch(&self, key: &str, prefix: bool, from_revision: i64) -> Result<Watch, String> {
        let mut create = json!({"key": B64.encode(key), "start_revision": from_revision.to_string()});
        if prefix {
            create["range_end"] = Value::from(B64.encode(prefix_end(key)));
        }
        let mut client = Client::new(self.base.clone(), None, self.timeout);
        let req = post("/v3/watch", &json!({"create_request": create}))?;
        let resp = tokio::time::timeout(self.timeout, client.send(req))
            .await
            .map_err(|_| format!("{}: no answer within {:?}", self.base, self.timeout))??;
        if !resp.status().is_success() {
            return Err(format!("{}: watch answered {}", self.base, resp.status()));
        }
        Ok(Watch {
            body: resp.into_body(),
            pending: BytesMut::new(),
            _client: client,
        })
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let req = post(path, &body)?;
        let call = async {
            let mut client = self.client.lock().await;
            let resp = client.send(req).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("{}: no answer within {:?}", self.base, self.timeout))??;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{}{path}: {e}", self.base))?;
        if status.is_success() {
            return Ok(v);
        }
        let why = v["message"]
            .as_str()
            .or(v["error"].as_str())
            .unwrap_or("an error");
        Err(format!("{}{path} answered {status}: {why}", self.base))
    }
}

fn post(path: &str, body: &Value) -> Result<Request<Full<Bytes>>, String> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())
}

/// A watch's stream of changes.
pub struct Watch {
    body: Incoming,
    pending: BytesMut,
    _client: Client,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// What a watch's next message said.
#[derive(Debug)]
pub enum Watched {
    /// Changes, in order.
    Events(Vec<Event>),
    /// The revision asked for was compacted away: read the key whole again.
    Compacted,
}

impl Watch {
    /// The next changes; `Err` when the stream ended or failed (watch again).
    pub async fn next(&mut self) -> Result<Watched, String> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line = self.pending.split_to(end + 1);
                let v: Value = serde_json::from_slice(&line).map_err(|e| format!("watch: {e}"))?;
                let r = &v["result"];
                if v.get("error").is_some() {
                    return Err(format!("watch: {}", v["error"]));
                }
                if int(&r["compact_revision"]).unwrap_or(0) > 0 {
                    return Ok(Watched::Compacted);
                }
                if r["canceled"] == true {
                    return Err("watch: cancelled by etcd".into());
                }
                let events = r["events"]
                    .as_array()
                    .map(|a| a.iter().filter_map(event).collect())
                    .unwrap_or_default();
                return Ok(Watched::Events(events));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.pending.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => return Err(format!("watch: {e}")),
                None => return Err("watch: the stream ended".into()),
            }
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: etcd's "\0" end.
    vec![0]
}

fn int(v: &Value) -> Option<i64> {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64())
}

fn revision(v: &Value) -> i64 {
    int(&v["header"]["revision"]).unwrap_or(0)
}

fn kv(v: &Value) -> Option<Kv> {
    let key = B64.decode(v["key"].as_str()?).ok()?;
    let value = v["value"]
        .as_str()
        .map_or(Ok(Vec::new()), |s| B64.decode(s))
        .ok()?;
    Some(Kv {
        key: String::from_utf8(key).ok()?,
        value,
        mod_revision: int(&v["mod_revision"]).unwrap_or(0),
    })
}

fn kvs(v: &Value) -> Vec<Kv> {
    v["kvs"]
        .as_array()
        .map(|a| a.iter().filter_map(kv).collect())
        .unwrap_or_default()
}

fn event(v: &Value) -> Option<Event> {
    let kv = kv(&v["kv"])?;
    Some(if v["type"] == "DELETE" {
        Event::Delete {
            key: kv.key,
            revision: kv.mod_revision,
        }
    } else {
        Event::Put(kv)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end("/services/a/"), b"/services/a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn events_are_read_from_etcds_json() {
        let put = json!({"kv": {"key": B64.encode("/k"), "value": B64.encode("v"), "mod_revision": "7"}});
        assert_eq!(
            event(&put),
            Some(Event::Put(Kv {
                key: "/k".into(),
                value: b"v".to_vec(),
                mod_revision: 7
            }))
        );
        let del = json!({"type": "DELETE", "kv": {"key": B64.encode("/k"), "mod_revision": "8"}});
        assert_eq!(
            event(&del),
            Some(Event::Delete {
                key: "/k".into(),
                revision: 8
            })
        );
    }
}
