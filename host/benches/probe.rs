//! Cost of one probe tick: `cargo bench -p celery-operator --bench probe`.
//!
//! Starts its own `redis-server` on 127.0.0.1 (from `scripts/setup.sh`), fills 1,000 queues
//! (some with tasks in priority lists, some unacknowledged entries) and times `sample` of all
//! of them: one pipelined round trip (goal: under 20 ms). Then the same for RabbitMQ: its own
//! node with the management plugin, 1,000 declared queues, one management API request.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use celery_operator::broker::rabbitmq::RabbitProbe;
use celery_operator::broker::redis::{Layout, RedisProbe};

/// Percentiles of `samples` (sorted here).
fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "n={} p50={:.2?} p90={:.2?} p99={:.2?}",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99)
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    redis_tick().await;
    rabbitmq_tick().await;
}

async fn redis_tick() {
    let redis = support::Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let queues: Vec<String> = (0..1000).map(|i| format!("queue-{i}")).collect();
    let mut fill = redis::pipe();
    for (i, q) in queues.iter().enumerate() {
        for _ in 0..(i % 7) {
            fill.rpush(q, "{}");
        }
        if i % 3 == 0 {
            fill.rpush(format!("{q}\x06\x166"), "{}");
        }
        if i % 10 == 0 {
            fill.hset(
                "unacked",
                format!("tag-{i}"),
                format!(r#"[{{}}, "{q}", "{q}"]"#),
            );
        }
    }
    fill.query_async::<()>(&mut conn).await.unwrap();

    let probe = RedisProbe::connect(&redis.url(), Layout::default())
        .await
        .unwrap();
    let total: u64 = probe
        .sample(&queues)
        .await
        .unwrap()
        .iter()
        .map(|s| s.ready + s.reserved)
        .sum();
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        std::hint::black_box(probe.sample(&queues).await.unwrap());
        samples.push(start.elapsed());
    }
    println!(
        "redis probe tick: 1000 queues x 4 priority lists + unacked hash ({total} tasks), one round trip: {}",
        percentiles(&mut samples)
    );
}

async fn rabbitmq_tick() {
    let rabbit = support::Rabbitmq::start();
    let management = rabbit.management_url();
    let http = reqwest::Client::new();
    let queues: Vec<String> = (0..1000).map(|i| format!("queue-{i}")).collect();
    let mut messages = 0;
    for (i, q) in queues.iter().enumerate() {
        let api = |path: String| format!("{management}/api/{path}");
        http.put(api(format!("queues/%2F/{q}")))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"durable": true}))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
        for _ in 0..(i % 4) {
            http.post(api("exchanges/%2F/amq.default/publish".into()))
                .basic_auth("guest", Some("guest"))
                .json(&serde_json::json!({"properties": {}, "routing_key": q,
                                          "payload": "{}", "payload_encoding": "string"}))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap();
            messages += 1;
        }
    }
    let probe = RabbitProbe::new(&rabbit.url(), Some(&management)).unwrap();
    let total: u64 = probe
        .sample(&queues)
        .await
        .unwrap()
        .iter()
        .map(|s| s.ready)
        .sum();
    assert_eq!(total, messages, "every published message is counted");
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        std::hint::black_box(probe.sample(&queues).await.unwrap());
        samples.push(start.elapsed());
    }
    println!(
        "rabbitmq probe tick: 1000 queues ({total} messages), one management API request: {}",
        percentiles(&mut samples)
    );
}
