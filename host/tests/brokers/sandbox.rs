//! The sandbox end to end: the operator binary against the in-memory API server, a real
//! `redis-server`, real Celery workers run by the sandbox's kubelet, a burst of long tasks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use celery_operator::sandbox::{self, load::Second, load::Trace, report::Sample};

/// The pool: 2 tasks at once per worker, 4 queued tasks per replica wanted, 1 s poll, an
/// 8 s scale-down window, a grace period longer than a task.
const RESOURCE: &str = r#"
apiVersion: celeryproject.org/v1alpha1
kind: Celery
metadata: {name: e2e}
spec:
  app: tasks
  image: example.com/e2e:1
  broker: {secretRef: {name: celery-broker, key: url}}
  workers:
    - name: work
      queues: [work]
      pool: threads
      concurrency: 2
      prefetchMultiplier: 1
      terminationGracePeriodSeconds: 60
      autoscaling:
        minReplicas: 1
        maxReplicas: 4
        pollIntervalSeconds: 1
        metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: "4"}}]
        scaler: {name: queue-length, settings: {scaleDownStabilizationSeconds: 8}}
"#;
const WINDOW: f64 = 8.0;
const POLL: f64 = 1.0;
const TARGET: f64 = 4.0;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// 16 tasks of 20 s at once: 4 workers run 8 and 8 wait; once the first 8 are done the other
/// 8 run, the backlog (8 reserved) wants 2 replicas, and after the window 2 of the 4 busy
/// workers are told to stop in the middle of their tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_scales_real_workers_and_loses_no_task() {
    let dir = crate::support::tempdir::Dir::new("sandbox");
    let resource = dir.path().join("celery.yaml");
    std::fs::write(&resource, RESOURCE).unwrap();
    let venv = PathBuf::from(
        std::env::var_os("CELERY_OPERATOR_CACHE").expect("scripts/setup.sh exports it"),
    )
    .join("venv");
    let trace = Trace {
        seconds: vec![Second {
            tasks: 16,
            task_seconds: 20.0,
        }],
    };
    let outcome = sandbox::run(sandbox::Options {
        resource,
        app_dir: root().join("examples/sandbox"),
        venv,
        operator: PathBuf::from(env!("CARGO_BIN_EXE_celery-operator")),
        trace,
        scenario: "e2e".into(),
        out: dir.path().join("out"),
        compare_keda: true,
        compare_latency: Some(10.0),
        settle_limit: Duration::from_secs(180),
    })
    .await
    .unwrap_or_else(|e| panic!("sandbox failed: {e:#}; logs in {}", dir.path().display()));
    let samples = &outcome.samples;
    let log = || {
        std::fs::read_to_string(dir.path().join("out/operator.log")).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("out/sandbox.log")).unwrap_or_default()
    };

    // Every task completed exactly once: 16 on the queue-length pool, the same 16 again on
    // its latency twin.
    let a = outcome.accounting;
    assert_eq!(
        (a.sent, a.completed, a.lost, a.run_more_than_once),
        (32, 32, 0, 0),
        "{}",
        log()
    );

    // Scale-up within 2 s of the backlog.
    let up = outcome.reaction.to_scale_request.expect("scaled up");
    assert!(up <= 2.0, "scale-up {up:.2} s after the backlog");
    let peak = samples.iter().map(|s| s.desired).max().unwrap();
    assert_eq!(peak, 4, "16 tasks / 4 per replica, at most 4");

    // The first scale-down comes only after the window: the backlog last wanted the peak at
    // `high`; the scaler (polling every second) may see it up to a poll later.
    let first_down = samples
        .iter()
        .skip_while(|s| s.desired < peak)
        .find(|s| s.desired < peak)
        .expect("scaled down");
    let wanted = |s: &Sample| ((s.backlog() as f64 / TARGET).ceil() as u32).min(peak);
    let high = samples
        .iter()
        .filter(|s| s.t < first_down.t && wanted(s) >= peak)
        .map(|s| s.t)
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        first_down.t - high >= WINDOW - POLL,
        "scaled down at {:.1} s, {:.1} s after the backlog last wanted {peak}",
        first_down.t,
        first_down.t - high
    );
    // ... in the middle of long tasks: at least 3 of the 4 workers were running two.
    assert!(
        first_down.reserved >= 6,
        "tasks running when scaling down: {first_down:?}"
    );
    // And back to the minimum in the end.
    assert_eq!(samples.last().unwrap().desired, 1);

    // Both scalers' tasks recorded their waits; the latency scaler scaled its pool up too
    // (once a task had finished: before, it has no service time and holds).
    let [queue_length, latency] = &outcome.outcomes[..] else {
        panic!("two outcomes: {:?}", outcome.outcomes)
    };
    assert_eq!((queue_length.tasks, latency.tasks), (16, 16), "{}", log());
    assert_eq!(queue_length.peak, peak);
    assert!(
        latency.peak >= 2,
        "the latency pool scaled up: {latency:?}; {}",
        log()
    );
    let waited = |o: &sandbox::report::Outcome| o.wait_p95.unwrap();
    // 16 tasks of 20 s on 2 processes at first: without a scale-up the last would wait 140 s.
    assert!(waited(queue_length) < 40.0, "{queue_length:?}");
    assert!(waited(latency) < 60.0, "{latency:?}");

    // The report: the accounting, the waits and costs of both scalers, the plot with the
    // simulated KEDA + HPA beside the run.
    let report = std::fs::read_to_string(&outcome.report).unwrap();
    assert!(report.contains("| 32 | 32 | **0** | 0 |"), "{report}");
    assert!(report.contains("## Task wait and cost"), "{report}");
    assert!(
        report.contains("| latency, target wait 10 s (pool latency) | 16 |"),
        "{report}"
    );
    assert!(report.contains("KEDA + HPA (simulated)"), "{report}");
    let svg = std::fs::read_to_string(dir.path().join("out/report.svg")).unwrap();
    assert!(svg.contains("workers ready") && svg.contains("simulated KEDA"));
}
