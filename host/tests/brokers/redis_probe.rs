//! The Redis probe against a real `redis-server`, filled by the real Celery client and
//! drained by a real Celery worker; its numbers must equal the ground truth that kombu itself
//! reports (`tests/celery_app/truth.py`).

use std::time::Duration;

use celery_operator::broker::QueueSample;
use celery_operator::broker::redis::{Layout, RedisProbe};

use crate::support::{
    Redis, Worker, as_map, eventually, kombu_truth as truth, python, queues_command,
};

#[tokio::test]
async fn probe_counts_every_priority_list_and_reserved_tasks_like_kombu() {
    let redis = Redis::start();
    let url = redis.url();
    // Two queues, one of them with prioritised tasks spread over kombu's priority lists.
    let before_first = std::time::Instant::now();
    python(&url, &["send.py", "emails", "5", "0", "30"]);
    let after_first = std::time::Instant::now();
    python(&url, &["send.py", "emails", "3", "6", "30"]);
    python(&url, &["send.py", "emails", "2", "9", "30"]);
    python(&url, &["send.py", "reports", "6", "0", "30"]);

    let queues = vec!["emails".to_string(), "reports".to_string()];
    let probe = RedisProbe::connect(&url, Layout::default()).await.unwrap();
    let sampled_at = std::time::Instant::now();
    let samples = probe.sample(&queues).await.unwrap();
    assert_eq!(as_map(&samples), truth(&url, &["emails", "reports"]));
    assert_eq!(samples[0].ready, 10);
    // The app stamps `published_at` (tests/celery_app/tasks.py): the oldest waiting task of
    // `emails` was sent by the first send.py.
    let waited = samples[0]
        .oldest_wait_ms
        .expect("the oldest task's age is known");
    let (least, most) = (
        sampled_at.duration_since(after_first).as_millis() as u64,
        (sampled_at.elapsed() + sampled_at.duration_since(before_first)).as_millis() as u64,
    );
    assert!(
        waited + 50 >= least && waited <= most + 50,
        "oldest waited {waited} ms, between {least} and {most} ms"
    );
    let nonzero: Vec<_> = samples[0]
        .by_priority
        .iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(
        nonzero.len() >= 2,
        "priorities land in several lists: {:?}",
        samples[0].by_priority
    );

    // A real worker with prefetch reserves tasks: one running (acks_late) and the prefetched.
    let _worker = Worker::start(&url, "reports", 3);
    eventually(
        Duration::from_secs(30),
        "the worker reserves tasks of `reports`",
        String::new,
        || async { (probe.sample(&queues).await.unwrap()[1].reserved >= 3).then_some(()) },
    )
    .await;
    let samples = probe.sample(&queues).await.unwrap();
    let truth = truth(&url, &["emails", "reports"]);
    assert_eq!(as_map(&samples), truth, "probe and kombu agree");
    assert_eq!(samples[1].reserved, 3, "prefetch 3 x concurrency 1");
    assert_eq!(samples[1].ready, 3);
    assert_eq!(
        samples[0],
        QueueSample {
            reserved: 0,
            ..samples[0].clone()
        }
    );
}

#[tokio::test]
async fn probe_of_a_stopped_broker_is_an_error_not_zero() {
    let redis = Redis::start();
    let url = redis.url();
    let probe = RedisProbe::connect(&url, Layout::default()).await.unwrap();
    assert!(probe.sample(&["celery".into()]).await.is_ok());
    drop(redis);
    let err = probe.sample(&["celery".into()]).await.unwrap_err();
    assert!(err.to_string().contains("broker unreachable"), "{err}");
}

#[test]
fn queues_command_prints_what_the_operator_sees() {
    let redis = Redis::start();
    let url = redis.url();
    python(&url, &["send.py", "emails", "4", "0", "30"]);
    python(&url, &["send.py", "emails", "1", "6", "30"]);
    let rows = queues_command(&url, &["-q", "emails", "-q", "celery"]);
    assert_eq!(rows[0][..3], ["emails", "5", "0"], "{rows:?}");
    assert_eq!(rows[1][..3], ["celery", "0", "0"], "{rows:?}");
    assert!(rows[0].contains(&"6:1".to_string()), "{rows:?}");

    drop(redis);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .args(["queues", "--broker", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker unreachable"));
}
