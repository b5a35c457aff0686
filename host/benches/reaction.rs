//! Reaction time of the operator's own scaler: from a backlog appearing in Redis to the
//! replica change being sent to the Deployment's `scale` subresource, with a 1 s poll
//! interval (goal: under 2 s; KEDA's default is a 30 s poll plus the HPA's 15 s sync).
//! `cargo bench -p celery-operator --bench reaction`.
//!
//! The scaler loop runs unchanged against a real `redis-server` (started here on 127.0.0.1)
//! and a minimal in-process Kubernetes API that answers the loop's requests (Secret, scale
//! subresource, status, Events) and timestamps every scale patch. Backlogs are pushed at
//! random moments relative to the poll, so the figures cover the whole poll phase.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_operator::crd::Celery;
use celery_operator::metrics::Metrics;
use celery_operator::plugin::{Compiler, Limits, Registry, Runtime};
use celery_operator::plugin::{PluginConfig, Plugins};
use celery_operator::reconcile::Context;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ROUNDS: usize = 20;

const CELERY: &str = r#"
apiVersion: celeryproject.org/v1alpha1
kind: Celery
metadata: {name: shop, namespace: apps, uid: uid-shop}
spec:
  app: tasks
  image: img
  broker: {type: redis, secretRef: {name: broker, key: url}}
  workers:
    - name: jobs
      queues: [jobs]
      autoscaling:
        minReplicas: 1
        maxReplicas: 10
        pollIntervalSeconds: 1
        scaler: {name: queue-length, settings: {scaleDownStabilizationSeconds: 0}}
        metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: "5"}}]
"#;

/// Answers the scaler loop's requests; every scale patch goes to `patches` with its time.
fn serve_api(
    broker_url: String,
    celery: Value,
    patches: mpsc::UnboundedSender<(Instant, i64)>,
) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let replicas = Arc::new(Mutex::new(1i64));
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body: Value =
                serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap_or(Value::Null);
            let path = parts.uri.path();
            let answer = match (parts.method.as_str(), path) {
                ("GET", p) if p.ends_with("/secrets/broker") => json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "broker", "namespace": "apps"},
                    "data": {"url": k8s_openapi::ByteString(broker_url.clone().into_bytes())},
                }),
                (method, p) if p.ends_with("/scale") => {
                    let mut current = replicas.lock().unwrap();
                    if method == "PATCH" {
                        *current = body["spec"]["replicas"].as_i64().unwrap();
                        let _ = patches.send((Instant::now(), *current));
                    }
                    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                           "metadata": {"name": "shop-worker-jobs", "namespace": "apps"},
                           "spec": {"replicas": *current}, "status": {"replicas": *current}})
                }
                ("POST", _) => body,
                _ => celery.clone(),
            };
            respond.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "apps")
}

#[tokio::main]
async fn main() {
    let redis = support::Redis::start();
    let celery: Celery = serde_saphyr::from_str(CELERY).unwrap();
    let (tx, mut patches) = mpsc::unbounded_channel();
    let client = serve_api(redis.url(), serde_json::to_value(&celery).unwrap(), tx);
    let registry = Registry::with_builtins(Arc::new(Runtime::new(
        Limits::default(),
        Compiler::InProcess,
    )))
    .unwrap();
    let plugins = Arc::new(Plugins::new(Arc::new(registry), PluginConfig::default()));
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        plugins,
        None,
        celery_operator::reconcile::DEFAULT_POLL_INTERVAL,
    ));
    // The loops stop when dropped: keep them for the whole bench.
    let mut loops = std::collections::BTreeMap::new();
    ctx.scalers.sync(&celery, &mut loops);

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let backlog: Vec<String> = (0..40).map(|i| format!("task-{i}")).collect();
    let mut reactions = Vec::new();
    // A fixed pseudo-random sequence of offsets into the poll interval.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..ROUNDS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 1000)).await;
        let pushed = Instant::now();
        redis::cmd("RPUSH")
            .arg("jobs")
            .arg(&backlog)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let (at, to) = patches.recv().await.unwrap();
        assert_eq!(to, 8, "40 tasks at 5 per replica");
        reactions.push(at - pushed);
        redis::cmd("DEL")
            .arg("jobs")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let (_, to) = patches.recv().await.unwrap();
        assert_eq!(to, 1, "back to min");
    }
    reactions.sort();
    let at = |q: f64| reactions[((reactions.len() - 1) as f64 * q) as usize];
    let mean = reactions.iter().sum::<Duration>() / reactions.len() as u32;
    println!(
        "reaction, backlog in Redis -> scale patch sent, poll 1 s: n={ROUNDS} mean={mean:.0?} \
         p50={:.0?} p90={:.0?} max={:.0?}",
        at(0.5),
        at(0.9),
        reactions[reactions.len() - 1]
    );
}
