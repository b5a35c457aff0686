//! Queue length on Redis, as kombu's Redis transport stores it:
//!
//! - a queue is a list named after it; with message priorities, kombu keeps one list per
//!   priority step, `<queue><sep><step>` for steps other than 0 (default separator
//!   `\x06\x16`, steps 0, 3, 6, 9);
//! - a message delivered to a worker and not acknowledged yet is kept in the `unacked` hash
//!   (delivery tag -> JSON `[message, exchange, routing_key]`) and indexed in the
//!   `unacked_index` sorted set;
//! - the `global_keyprefix` transport option prefixes every key.
//!
//! All queues of a probe are read in one pipelined round trip.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;

use super::{ProbeError, QueueSample};

/// kombu's default separator between a queue name and its priority step.
pub const DEFAULT_SEPARATOR: &str = "\x06\x16";
/// kombu's default priority steps.
pub const DEFAULT_PRIORITY_STEPS: [u32; 4] = [0, 3, 6, 9];
/// kombu's hash of unacknowledged messages.
pub const UNACKED_KEY: &str = "unacked";

/// How kombu names its keys (its Redis transport options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `global_keyprefix`.
    pub prefix: String,
    /// `sep`.
    pub separator: String,
    /// `priority_steps`.
    pub priority_steps: Vec<u32>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            prefix: String::new(),
            separator: DEFAULT_SEPARATOR.into(),
            priority_steps: DEFAULT_PRIORITY_STEPS.to_vec(),
        }
    }
}

impl From<crate::crd::RedisTransport> for Layout {
    fn from(t: crate::crd::RedisTransport) -> Self {
        let default = Layout::default();
        Layout {
            prefix: t.global_keyprefix.unwrap_or(default.prefix),
            separator: t.sep.unwrap_or(default.separator),
            priority_steps: t.priority_steps.unwrap_or(default.priority_steps),
        }
    }
}

impl Layout {
    /// The lists holding `queue`'s waiting messages, one per priority step.
    pub fn list_keys(&self, queue: &str) -> Vec<(u32, String)> {
        self.priority_steps
            .iter()
            .map(|&step| {
                let key = match step {
                    0 => format!("{}{queue}", self.prefix),
                    _ => format!("{}{queue}{}{step}", self.prefix, self.separator),
                };
                (step, key)
            })
            .collect()
    }

    /// The key of the hash of unacknowledged messages.
    pub fn unacked_key(&self) -> String {
        format!("{}{UNACKED_KEY}", self.prefix)
    }
}

/// Counts unacknowledged messages per queue of `queues`. kombu stores each with its exchange
/// and routing key; with Celery's defaults both are the queue's name. The routing key is
/// tried first, then the exchange; messages of other queues are not counted.
pub fn reserved_per_queue<'a>(
    unacked: impl IntoIterator<Item = &'a [u8]>,
    queues: &[String],
) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = queues.iter().map(|q| (q.clone(), 0)).collect();
    for raw in unacked {
        let Ok(serde_json::Value::Array(entry)) = serde_json::from_slice(raw) else {
            continue;
        };
        let name = |i: usize| entry.get(i).and_then(|v| v.as_str());
        let queue = [name(2), name(1)]
            .into_iter()
            .flatten()
            .find(|n| counts.contains_key(*n));
        if let Some(q) = queue {
            *counts.get_mut(q).expect("found above") += 1;
        }
    }
    counts
}

/// The `published_at` header (Unix seconds) of a kombu message as it lies in a Redis list:
/// JSON with the message's `headers`. `None` for anything else.
pub fn published_at(raw: &[u8]) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct Message {
        headers: Headers,
    }
    #[derive(serde::Deserialize)]
    struct Headers {
        published_at: f64,
    }
    let m: Message = serde_json::from_slice(raw).ok()?;
    Some(m.headers.published_at).filter(|t| t.is_finite() && *t > 0.0)
}

/// How long a message published at `published_at` (Unix seconds) has waited at `now_ms`.
pub fn waited_ms(published_at: f64, now_ms: u64) -> u64 {
    (now_ms as f64 - published_at * 1000.0).max(0.0) as u64
}

/// A probe of one Redis broker. The connection is shared and reconnects by itself.
#[derive(Clone)]
pub struct RedisProbe {
    connection: ConnectionManager,
    layout: Layout,
}

impl RedisProbe {
    /// Connects to `url` (`redis://` or `rediss://`, with password and database index).
    pub async fn connect(url: &str, layout: Layout) -> Result<Self, ProbeError> {
        let client = redis::Client::open(url).map_err(|e| ProbeError::Url(redacted(e)))?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(|e| ProbeError::Broker(redacted(e)))?;
        Ok(RedisProbe { connection, layout })
    }

    /// Reads every queue of `queues` in one pipelined round trip: each list's length and its
    /// oldest message (kombu pushes on the left and pops on the right), for its age.
    pub async fn sample(&self, queues: &[String]) -> Result<Vec<QueueSample>, ProbeError> {
        let mut pipe = redis::pipe();
        for queue in queues {
            for (_, key) in self.layout.list_keys(queue) {
                pipe.llen(&key).lindex(key, -1);
            }
        }
        pipe.hvals(self.layout.unacked_key());
        let mut connection = self.connection.clone();
        let (lengths, oldest, unacked): (Vec<u64>, Vec<Option<f64>>, Vec<Vec<u8>>) = {
            let mut replies: Vec<redis::Value> = pipe
                .query_async(&mut connection)
                .await
                .map_err(|e| ProbeError::Broker(redacted(e)))?;
            let unacked = replies.pop().unwrap_or(redis::Value::Nil);
            let unacked =
                redis::from_redis_value(unacked).map_err(|e| ProbeError::Broker(e.to_string()))?;
            let (mut lengths, mut oldest) = (Vec::new(), Vec::new());
            let mut replies = replies.into_iter();
            while let (Some(length), Some(head)) = (replies.next(), replies.next()) {
                lengths.push(
                    redis::from_redis_value(length)
                        .map_err(|e| ProbeError::Broker(e.to_string()))?,
                );
                let head: Option<Vec<u8>> = redis::from_redis_value(head).unwrap_or(None);
                oldest.push(head.as_deref().and_then(published_at));
            }
            (lengths, oldest, unacked)
        };
        let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        let reserved = reserved_per_queue(unacked.iter().map(Vec::as_slice), queues);
        let steps = self.layout.priority_steps.len();
        Ok(queues
            .iter()
            .zip(lengths.chunks(steps).zip(oldest.chunks(steps)))
            .map(|(queue, (lengths, oldest))| QueueSample {
                name: queue.clone(),
                // The longest wait over the priority lists.
                oldest_wait_ms: oldest.iter().flatten().map(|t| waited_ms(*t, now_ms)).max(),
                ready: lengths.iter().sum(),
                reserved: reserved[queue],
                by_priority: self
                    .layout
                    .priority_steps
                    .iter()
                    .copied()
                    .zip(lengths.iter().copied())
                    .collect(),
            })
            .collect())
    }
}

/// A redis error as text, without the URL (it may hold a password).
/// A subscription to the worker events kombu fans out on Redis: `PUBLISH` to
/// `<global_keyprefix>/<db>.celeryev/<routing key>` (kombu's default `fanout_prefix` and
/// `fanout_patterns`; Pub/Sub channels span databases, hence the `/<db>.`).
pub struct RedisEvents {
    sink: redis::aio::PubSubSink,
    messages: redis::aio::PubSubStream,
}

impl RedisEvents {
    /// Subscribes to the `worker.*` events of the database `url` names.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, ProbeError> {
        let client = redis::Client::open(url).map_err(|e| ProbeError::Url(redacted(e)))?;
        let db = client.get_connection_info().redis_settings().db();
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .map_err(|e| ProbeError::Broker(redacted(e)))?;
        pubsub
            .psubscribe(format!("{prefix}/{db}.celeryev/worker.*"))
            .await
            .map_err(|e| ProbeError::Broker(redacted(e)))?;
        let (sink, messages) = pubsub.split();
        Ok(RedisEvents { sink, messages })
    }

    /// The next worker event; `None` when the connection is lost.
    pub async fn next(&mut self) -> Option<crate::broker::events::WorkerEvent> {
        use futures::StreamExt;
        loop {
            let message = self.messages.next().await?;
            if let Some(event) = crate::broker::events::from_redis(message.get_payload_bytes()) {
                return Some(event);
            }
        }
    }

    /// Whether the server still answers on the subscription's connection.
    pub async fn ping(&mut self) -> bool {
        // In subscriber mode the answer is an array, not `PONG`: any answer will do.
        self.sink.ping::<redis::Value>().await.is_ok()
    }
}

fn redacted(e: redis::RedisError) -> String {
    let text = e.to_string();
    match text.find("redis://").or_else(|| text.find("rediss://")) {
        Some(i) => format!("{}<url redacted>", &text[..i]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keys_follow_kombu_priority_naming() {
        let keys: Vec<String> = Layout::default()
            .list_keys("emails")
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "emails",
                "emails\x06\x163",
                "emails\x06\x166",
                "emails\x06\x169"
            ]
        );
        let layout = Layout {
            prefix: "app:".into(),
            separator: ":".into(),
            priority_steps: vec![0, 5],
        };
        let keys: Vec<String> = layout.list_keys("q").into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, ["app:q", "app:q:5"]);
        assert_eq!(layout.unacked_key(), "app:unacked");
    }

    #[test]
    fn reserved_messages_are_attributed_by_routing_key_then_exchange() {
        let entries: Vec<&[u8]> = vec![
            br#"[{"body": "x"}, "emails", "emails"]"#,
            br#"[{"body": "x"}, "", "reports"]"#,
            br#"[{"body": "x"}, "reports", "custom.key"]"#,
            br#"[{"body": "x"}, "other", "other"]"#,
            b"not json",
        ];
        let counts = reserved_per_queue(entries, &["emails".into(), "reports".into()]);
        assert_eq!(
            counts,
            BTreeMap::from([("emails".into(), 1), ("reports".into(), 2)])
        );
    }

    #[test]
    fn errors_never_carry_the_url() {
        let e = redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "bad",
            "redis://:secret@host".to_string(),
        ));
        assert!(!redacted(e).contains("secret"));
    }
}
