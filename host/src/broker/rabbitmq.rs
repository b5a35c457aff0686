//! Queue length on RabbitMQ, from its management HTTP API: `messages_ready` (waiting) and
//! `messages_unacknowledged` (delivered to a worker, not acknowledged yet) of every queue of
//! the broker's virtual host, in one request.
//!
//! The request asks for queue totals without the statistics database
//! (`disable_stats=true&enable_queue_totals=true`): those totals come straight from the
//! queues, while the statistics are only refreshed every `collect_statistics_interval`
//! (5 s by default). RabbitMQ keeps message priorities inside one queue, so there is no
//! per-priority split.

use std::collections::HashMap;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Deserialize;
use url::Url;

use super::{ProbeError, QueueSample};

/// The management plugin's default port, for `amqp://` brokers.
pub const MANAGEMENT_PORT: u16 = 15672;
/// The management plugin's default TLS port, for `amqps://` brokers.
pub const MANAGEMENT_TLS_PORT: u16 = 15671;
/// How long one management request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to ask the management API about one virtual host.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL of the management API, without credentials (`http://rabbitmq:15672/`).
    pub base: Url,
    /// Virtual host, decoded (`/` for the default one).
    pub vhost: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base.as_str())
            .field("vhost", &self.vhost)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The endpoint for a Celery broker URL (`amqp://user:password@host:5672/vhost`, also
    /// `amqps://` and `pyamqp://`), read the way kombu reads it: the virtual host is the
    /// path without its first `/`, percent-decoded, `/` when empty; user and password
    /// default to `guest`. The management API is at `management_url` when given (its
    /// credentials, if any, win over the broker URL's), else on the broker's host at port
    /// 15672 (`http`) or 15671 (`https`, for `amqps://`).
    pub fn from_broker_url(broker: &str, management_url: Option<&str>) -> Result<Self, ProbeError> {
        // Never echo the URL: it holds the password.
        let url = Url::parse(broker).map_err(|e| ProbeError::Url(e.to_string()))?;
        let tls = match url.scheme() {
            "amqp" | "pyamqp" => false,
            "amqps" | "pyamqps" => true,
            other => {
                return Err(ProbeError::Url(format!(
                    "scheme {other}:// is not a RabbitMQ (AMQP) broker"
                )));
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| ProbeError::Url("the broker URL has no host".into()))?;
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let path = url.path();
        let vhost = decode(path.strip_prefix('/').unwrap_or(path));
        let mut endpoint = Endpoint {
            base: Url::parse(&format!(
                "{}://{host}:{}/",
                if tls { "https" } else { "http" },
                if tls {
                    MANAGEMENT_TLS_PORT
                } else {
                    MANAGEMENT_PORT
                }
            ))
            .map_err(|e| ProbeError::Url(e.to_string()))?,
            vhost: if vhost.is_empty() { "/".into() } else { vhost },
            user: match url.username() {
                "" => "guest".into(),
                user => decode(user),
            },
            password: url.password().map_or_else(|| "guest".into(), decode),
        };
        if let Some(management) = management_url {
            let mut base = Url::parse(management)
                .map_err(|e| ProbeError::Url(format!("management URL: {e}")))?;
            if !matches!(base.scheme(), "http" | "https") {
                return Err(ProbeError::Url(
                    "the management URL must be http:// or https://".into(),
                ));
            }
            if !base.username().is_empty() {
                endpoint.user = decode(base.username());
                endpoint.password = base.password().map(decode).unwrap_or_default();
                let _ = base.set_username("");
                let _ = base.set_password(None);
            }
            if !base.path().ends_with('/') {
                let path = format!("{}/", base.path());
                base.set_path(&path);
            }
            endpoint.base = base;
        }
        Ok(endpoint)
    }

    /// The URL listing the virtual host's queues with just the counts we read.
    pub fn queues_url(&self) -> Url {
        let vhost = utf8_percent_encode(&self.vhost, NON_ALPHANUMERIC);
        let mut url = self
            .base
            .join(&format!("api/queues/{vhost}"))
            .expect("a relative path joins");
        url.set_query(Some(
            "disable_stats=true&enable_queue_totals=true&columns=name,messages_ready,messages_unacknowledged",
        ));
        url
    }
}

/// A queue as the management API lists it.
#[derive(Deserialize)]
struct ListedQueue {
    name: String,
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
}

/// Picks `queues` out of the management API's listing. A queue that is not listed has not
/// been declared yet, so nothing waits in it; a listed queue without counts (a queue that is
/// down or still starting) is an error, never a zero.
fn samples_from(
    listing: Vec<ListedQueue>,
    queues: &[String],
) -> Result<Vec<QueueSample>, ProbeError> {
    let listed: HashMap<String, ListedQueue> =
        listing.into_iter().map(|q| (q.name.clone(), q)).collect();
    queues
        .iter()
        .map(|name| match listed.get(name) {
            None => Ok(QueueSample {
                name: name.clone(),
                ..QueueSample::default()
            }),
            Some(ListedQueue {
                messages_ready: Some(ready),
                messages_unacknowledged: Some(reserved),
                ..
            }) => Ok(QueueSample {
                name: name.clone(),
                ready: *ready,
                reserved: *reserved,
                by_priority: Vec::new(),
                // The management API's listing does not show the head message.
                oldest_wait_ms: None,
            }),
            Some(_) => Err(ProbeError::Broker(format!(
                "RabbitMQ reports no message counts for queue {name} (is it running?)"
            ))),
        })
        .collect()
}

/// A probe of one RabbitMQ virtual host through the management API. The HTTP client keeps
/// its connections alive between ticks.
#[derive(Clone)]
pub struct RabbitProbe {
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl RabbitProbe {
    /// A probe of the broker at `url`, its management API at `management_url` or derived
    /// from `url` (see [`Endpoint::from_broker_url`]). Nothing is sent until the first sample.
    pub fn new(url: &str, management_url: Option<&str>) -> Result<Self, ProbeError> {
        let endpoint = Endpoint::from_broker_url(url, management_url)?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ProbeError::Broker(e.to_string()))?;
        Ok(RabbitProbe { http, endpoint })
    }

    /// Reads every queue of `queues` in one request.
    pub async fn sample(&self, queues: &[String]) -> Result<Vec<QueueSample>, ProbeError> {
        let e = &self.endpoint;
        let response = self
            .http
            .get(e.queues_url())
            .basic_auth(&e.user, Some(&e.password))
            .send()
            .await
            .map_err(|err| ProbeError::Broker(format!("RabbitMQ management API: {err}")))?;
        let status = response.status();
        if !status.is_success() {
            let why = match status.as_u16() {
                401 => format!("user {} was refused", e.user),
                403 => format!("user {} may not read virtual host {}", e.user, e.vhost),
                404 => format!("no virtual host {}", e.vhost),
                _ => response.text().await.unwrap_or_default(),
            };
            return Err(ProbeError::Broker(format!(
                "RabbitMQ management API answered {status}: {why}"
            )));
        }
        let listing: Vec<ListedQueue> = response
            .json()
            .await
            .map_err(|err| ProbeError::Broker(format!("RabbitMQ management API answer: {err}")))?;
        samples_from(listing, queues)
    }
}

/// The AMQP URI of a Celery broker URL, read as kombu reads it (see
/// [`Endpoint::from_broker_url`]): port 5672 (5671 for `amqps://`), user and password
/// `guest` by default, the virtual host the path without its first `/`.
pub fn amqp_uri(broker: &str) -> Result<lapin::uri::AMQPUri, ProbeError> {
    use lapin::uri::{AMQPAuthority, AMQPScheme, AMQPUri, AMQPUserInfo};
    let endpoint = Endpoint::from_broker_url(broker, None)?;
    let url = Url::parse(broker).map_err(|e| ProbeError::Url(e.to_string()))?;
    let tls = endpoint.base.scheme() == "https";
    Ok(AMQPUri {
        scheme: if tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: endpoint.user,
                password: endpoint.password,
            },
            host: url.host_str().unwrap_or_default().to_string(),
            port: url.port().unwrap_or(if tls { 5671 } else { 5672 }),
        },
        vhost: endpoint.vhost,
        query: Default::default(),
    })
}

/// A subscription to the worker events Celery publishes on RabbitMQ: a queue of the
/// operator's own (exclusive, gone with the connection; messages kept 10 s and at most
/// 10,000, so a slow reader never grows the broker, and at most 100 in the operator's hands)
/// bound to the `celeryev` topic exchange with `worker.#`.
pub struct RabbitEvents {
    connection: lapin::Connection,
    consumer: lapin::Consumer,
}

/// Celery's event exchange.
const EVENT_EXCHANGE: &str = "celeryev";
/// Events delivered to the operator and not yet acknowledged, at most.
const PREFETCH: u16 = 100;

impl RabbitEvents {
    /// Subscribes to the `worker.*` events of the broker at `url`.
    pub async fn connect(url: &str) -> Result<Self, ProbeError> {
        use lapin::options::{
            BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
            QueueDeclareOptions,
        };
        use lapin::types::{AMQPValue, FieldTable};
        let failed = |e: lapin::Error| ProbeError::Broker(e.to_string());
        let connection =
            lapin::Connection::connect_uri(amqp_uri(url)?, lapin::ConnectionProperties::default())
                .await
                .map_err(failed)?;
        let channel = connection.create_channel().await.map_err(failed)?;
        // Declared as Celery declares it (a topic exchange, durable), so that binding works
        // before any worker started.
        channel
            .exchange_declare(
                EVENT_EXCHANGE.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(10_000));
        arguments.insert("x-max-length".into(), AMQPValue::LongUInt(10_000));
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(failed)?;
        channel
            .queue_bind(
                queue.name().clone(),
                EVENT_EXCHANGE.into(),
                "worker.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        // Acknowledged, with at most PREFETCH unacknowledged: the broker never pushes more
        // than that into the operator's memory; the rest waits in the capped queue.
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(failed)?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "celery-operator".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        Ok(RabbitEvents {
            connection,
            consumer,
        })
    }

    /// The next worker event; `None` when the connection is lost.
    pub async fn next(&mut self) -> Option<crate::broker::events::WorkerEvent> {
        use futures::StreamExt;
        loop {
            let delivery = self.consumer.next().await?.ok()?;
            // Acknowledged on a task of its own: a caller giving up on `next` (it is raced
            // against a timer) must not leave a delivery unacknowledged, or the prefetch
            // window would shrink for good.
            let acker = delivery.acker.clone();
            tokio::spawn(async move {
                let _ = acker.ack(lapin::options::BasicAckOptions::default()).await;
            });
            if let Some(event) = crate::broker::events::from_json(&delivery.data) {
                return Some(event);
            }
        }
    }

    /// Whether the connection is up (lapin exchanges AMQP heartbeats on it).
    pub fn alive(&self) -> bool {
        self.connection.status().connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Endpoint::from_broker_url(url, None).unwrap()
    }

    #[test]
    fn the_amqp_uri_is_read_as_kombu_reads_it() {
        let uri = amqp_uri("pyamqp://celery:s%40cret@rabbit.ns.svc/app").unwrap();
        assert_eq!(uri.authority.host, "rabbit.ns.svc");
        assert_eq!(uri.authority.port, 5672);
        assert_eq!(uri.authority.userinfo.username, "celery");
        assert_eq!(uri.authority.userinfo.password, "s@cret");
        assert_eq!(uri.vhost, "app");
        let uri = amqp_uri("amqps://rabbit//").unwrap();
        assert_eq!(uri.scheme, lapin::uri::AMQPScheme::AMQPS);
        assert_eq!((uri.authority.port, uri.vhost.as_str()), (5671, "/"));
        assert_eq!(uri.authority.userinfo.username, "guest");
        assert!(amqp_uri("redis://h").is_err());
    }

    #[test]
    fn the_virtual_host_is_read_like_kombu_reads_it() {
        assert_eq!(endpoint("amqp://u:p@rabbit:5672//").vhost, "/");
        assert_eq!(endpoint("amqp://u:p@rabbit:5672/").vhost, "/");
        assert_eq!(endpoint("amqp://u:p@rabbit").vhost, "/");
        assert_eq!(endpoint("amqp://u:p@rabbit/%2F").vhost, "/");
        assert_eq!(endpoint("pyamqp://u:p@rabbit/app").vhost, "app");
        assert_eq!(endpoint("amqp://u:p@rabbit/team%20a").vhost, "team a");
    }

    #[test]
    fn credentials_and_management_address_come_from_the_broker_url() {
        let e = endpoint("amqp://celery:s%40cret@rabbit.ns.svc:5672/app");
        assert_eq!((e.user.as_str(), e.password.as_str()), ("celery", "s@cret"));
        assert_eq!(e.base.as_str(), "http://rabbit.ns.svc:15672/");
        assert_eq!(
            e.queues_url().as_str(),
            "http://rabbit.ns.svc:15672/api/queues/app?disable_stats=true&enable_queue_totals=true&columns=name,messages_ready,messages_unacknowledged"
        );
        let e = endpoint("amqps://rabbit");
        assert_eq!((e.user.as_str(), e.password.as_str()), ("guest", "guest"));
        assert_eq!(e.base.as_str(), "https://rabbit:15671/");
        assert!(e.queues_url().as_str().contains("/api/queues/%2F?"));
    }

    #[test]
    fn a_management_url_overrides_the_address_and_its_credentials_win() {
        let e = Endpoint::from_broker_url(
            "amqp://app:apppw@rabbit/",
            Some("https://admin:adminpw@mq.example.com/rabbit"),
        )
        .unwrap();
        assert_eq!(e.base.as_str(), "https://mq.example.com/rabbit/");
        assert_eq!((e.user.as_str(), e.password.as_str()), ("admin", "adminpw"));
        let e =
            Endpoint::from_broker_url("amqp://app:apppw@rabbit/", Some("http://mq:8080")).unwrap();
        assert_eq!((e.user.as_str(), e.password.as_str()), ("app", "apppw"));
        assert!(!format!("{e:?}").contains("apppw"));
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for url in [
            "redis://:secret@h/0",
            "not a url secret",
            "amqp://:secret@/",
        ] {
            let err = Endpoint::from_broker_url(url, None)
                .unwrap_err()
                .to_string();
            assert!(!err.contains("secret"), "{err}");
        }
        assert!(Endpoint::from_broker_url("amqp://h", Some("ftp://h")).is_err());
    }

    #[test]
    fn missing_queues_are_empty_and_queues_without_counts_are_errors() {
        let listing = |v: serde_json::Value| serde_json::from_value::<Vec<ListedQueue>>(v).unwrap();
        let samples = samples_from(
            listing(serde_json::json!([
                {"name": "emails", "messages_ready": 4, "messages_unacknowledged": 2},
                {"name": "other", "messages_ready": 9, "messages_unacknowledged": 9},
            ])),
            &["emails".into(), "fresh".into()],
        )
        .unwrap();
        assert_eq!(
            samples
                .iter()
                .map(|s| (s.name.as_str(), s.ready, s.reserved))
                .collect::<Vec<_>>(),
            [("emails", 4, 2), ("fresh", 0, 0)]
        );
        let down = listing(serde_json::json!([{"name": "emails"}]));
        assert!(samples_from(down, &["emails".into()]).is_err());
    }
}
