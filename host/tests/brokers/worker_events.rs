//! The worker event stream as the operator reads it, from a real Celery worker on both
//! brokers: `worker-online`, heartbeats that show a running task, `worker-offline` on a warm
//! shutdown.

use std::time::{Duration, Instant};

use celery_operator::broker::events::{Kind, Subscription, WorkerEvent};
use celery_operator::crd::BrokerSpec;

use crate::support::{Rabbitmq, Redis, Worker, python, tempdir};

/// The next event of `work@pod-1` that passes `check`, within 60 s.
async fn until(
    subscription: &mut Subscription,
    what: &str,
    check: impl Fn(&WorkerEvent) -> bool,
) -> WorkerEvent {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 60 s"))
            .expect("the subscription holds");
        if event.hostname == "work@pod-1" && check(&event) {
            return event;
        }
    }
}

async fn a_real_worker_is_followed(url: &str) {
    let broker: BrokerSpec =
        serde_json::from_value(serde_json::json!({"secretRef": {"name": "b", "key": "url"}}))
            .unwrap();
    let mut subscription = Subscription::connect(url, &broker).await.unwrap();
    let dir = tempdir::Dir::new("events");
    let argv: Vec<String> = [
        "celery",
        "-A",
        "tasks",
        "worker",
        "--pool",
        "threads",
        "-c",
        "1",
        "-Q",
        "ev",
        "--hostname",
        "work@pod-1",
        "--loglevel",
        "WARNING",
    ]
    .map(String::from)
    .to_vec();
    let worker = Worker::run(url, &argv, &[], &dir.path().join("worker.log"));
    until(&mut subscription, "worker-online", |e| {
        e.kind == Kind::Online
    })
    .await;
    let idle = until(&mut subscription, "a heartbeat", |e| {
        e.kind == Kind::Heartbeat
    })
    .await;
    assert_eq!((idle.active, idle.freq), (0, 2.0));
    python(url, &["send.py", "ev", "1", "0", "6"]);
    until(&mut subscription, "a busy heartbeat", |e| {
        e.kind == Kind::Heartbeat && e.active == 1
    })
    .await;
    let done = until(&mut subscription, "a heartbeat after the task", |e| {
        e.kind == Kind::Heartbeat && e.active == 0 && e.processed == 1
    })
    .await;
    assert_eq!(done.processed, 1);
    assert!(subscription.alive().await);
    worker.terminate();
    until(&mut subscription, "worker-offline", |e| {
        e.kind == Kind::Offline
    })
    .await;
}

#[tokio::test]
async fn a_real_worker_is_followed_on_redis() {
    let redis = Redis::start();
    a_real_worker_is_followed(&redis.url()).await;
}

#[tokio::test]
async fn a_real_worker_is_followed_on_rabbitmq() {
    let rabbit = Rabbitmq::start();
    a_real_worker_is_followed(&rabbit.url()).await;
}
