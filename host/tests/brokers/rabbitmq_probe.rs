//! The RabbitMQ probe against a real RabbitMQ node with its management plugin, filled by the
//! real Celery client and drained by a real Celery worker. Ground truth is `rabbitmqctl
//! list_queues`, which asks the node over Erlang distribution, not the management API.
//! One node serves every check of this file: it takes seconds to start.

use std::collections::BTreeMap;
use std::time::Duration;

use celery_operator::broker::rabbitmq::RabbitProbe;

use crate::support::{Rabbitmq, Worker, as_map, eventually, python, queues_command};

/// `rabbitmqctl`'s view: queue -> (ready, unacknowledged), for `queues` only.
fn truth(rabbit: &Rabbitmq, queues: &[String]) -> BTreeMap<String, (u64, u64)> {
    let out = rabbit.ctl(&[
        "-q",
        "--formatter",
        "json",
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut truth: BTreeMap<String, (u64, u64)> =
        queues.iter().map(|q| (q.clone(), (0, 0))).collect();
    for q in listed {
        if let Some(counts) = truth.get_mut(q["name"].as_str().unwrap()) {
            *counts = (
                q["messages_ready"].as_u64().unwrap(),
                q["messages_unacknowledged"].as_u64().unwrap(),
            );
        }
    }
    truth
}

#[tokio::test]
async fn probe_reads_ready_and_unacknowledged_like_rabbitmqctl() {
    let rabbit = Rabbitmq::start();
    let url = rabbit.url();
    python(&url, &["send.py", "emails", "5", "0", "30"]);
    python(&url, &["send.py", "emails", "3", "9", "30"]);
    python(&url, &["send.py", "reports", "4", "0", "30"]);
    let queues: Vec<String> = ["emails", "reports", "never-declared"]
        .map(String::from)
        .to_vec();

    // The management API's address is derived from the broker URL by default; here the
    // ports are not the standard ones, so it is given.
    let probe = RabbitProbe::new(&url, Some(&rabbit.management_url())).unwrap();
    let samples = probe.sample(&queues).await.unwrap();
    assert_eq!(
        as_map(&samples),
        BTreeMap::from([
            ("emails".into(), (8, 0)),
            ("reports".into(), (4, 0)),
            ("never-declared".into(), (0, 0)),
        ])
    );
    assert_eq!(as_map(&samples), truth(&rabbit, &queues));

    // A real worker (concurrency 1, prefetch 3, acks_late) holds 3 messages unacknowledged,
    // spread over its two queues however RabbitMQ delivers them.
    let _worker = Worker::start(&url, "emails,reports", 3);
    eventually(
        Duration::from_secs(30),
        "the worker reserves 3 messages",
        String::new,
        || async {
            let samples = probe.sample(&queues).await.unwrap();
            (samples.iter().map(|s| s.reserved).sum::<u64>() == 3).then_some(())
        },
    )
    .await;
    let samples = probe.sample(&queues).await.unwrap();
    assert_eq!(
        as_map(&samples),
        truth(&rabbit, &queues),
        "probe and rabbitmqctl agree"
    );
    assert_eq!(
        samples.iter().map(|s| s.ready + s.reserved).sum::<u64>(),
        12
    );

    // Wrong credentials and an unknown virtual host are errors, never zeros.
    let port = rabbit.amqp_port;
    let management = rabbit.management_url();
    let wrong = format!("amqp://guest:wrong@127.0.0.1:{port}//");
    let err = RabbitProbe::new(&wrong, Some(&management))
        .unwrap()
        .sample(&queues)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && !err.contains("wrong"), "{err}");
    let elsewhere = format!("amqp://guest:guest@127.0.0.1:{port}/nowhere");
    let err = RabbitProbe::new(&elsewhere, Some(&management))
        .unwrap()
        .sample(&queues)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no virtual host nowhere"), "{err}");

    // The `queues` command prints the same numbers.
    let rows = queues_command(
        &url,
        &[
            "-q",
            "emails",
            "-q",
            "reports",
            "--management-url",
            &management,
        ],
    );
    let printed: BTreeMap<String, (u64, u64)> = rows
        .iter()
        .map(|f| (f[0].clone(), (f[1].parse().unwrap(), f[2].parse().unwrap())))
        .collect();
    let two = &queues[..2];
    assert_eq!(printed, truth(&rabbit, two), "{rows:?}");

    // A stopped broker is an error too.
    drop(rabbit);
    let err = probe.sample(&queues).await.unwrap_err().to_string();
    assert!(err.contains("broker unreachable"), "{err}");
}
