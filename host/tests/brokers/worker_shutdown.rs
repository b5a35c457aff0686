//! No task is lost when a pool scales down: the worker command line the operator generates,
//! run as a real Celery worker (prefork, `acks_late`) against a real Redis, receives SIGTERM
//! while a task runs, as a pod being scaled away does. Every task must be accounted for
//! afterwards: finished, or back in the queue; none left reserved by a gone worker.

use std::path::Path;
use std::time::Duration;

use celery_operator::crd::Celery;
use celery_operator::desired::desired_children;
use serde_json::Value;

use crate::support::{Redis, Worker, kombu_truth, python, tempdir, wait_until};

const SPEC: &str = r#"
apiVersion: celeryproject.org/v1alpha1
kind: Celery
metadata: {name: shop, namespace: apps}
spec:
  app: tasks
  image: img
  broker: {secretRef: {name: broker, key: url}}
  workers:
    - name: jobs
      queues: [jobs]
      pool: prefork
      concurrency: 1
      prefetchMultiplier: 2
      timeLimitSeconds: 20
      EXTRA
"#;

/// The worker container of the pool's Deployment, as the operator builds it; `extra` are
/// more lines of the pool.
fn worker_container(extra: &str) -> (Value, i64) {
    let celery: Celery = serde_saphyr::from_str(&SPEC.replace("EXTRA", extra)).unwrap();
    let deployment = desired_children(&celery)
        .into_iter()
        .find(|c| c.name == "shop-worker-jobs")
        .unwrap()
        .object;
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    (pod["containers"][0].clone(), grace)
}

/// The container's command line in exec form (no shell: `celery` itself gets SIGTERM).
fn argv(container: &Value) -> Vec<String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let mut argv = strings(&container["command"]);
    argv.extend(strings(&container["args"]));
    argv
}

/// Plain environment variables of the container (the broker URL comes from a Secret in a
/// cluster; here the test sets it).
fn plain_env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect()
}

/// (started, finished) task ids recorded by the `record` task.
fn record(path: &Path) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let ids = |what: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(what))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    (ids("started "), ids("finished "))
}

/// kombu's own view of the queue: (ready, reserved).
fn truth(broker: &str) -> (u64, u64) {
    kombu_truth(broker, &["jobs"])["jobs"]
}

/// Sends 3 `record` tasks of `seconds`, starts the pool's worker, waits until one runs (and
/// another is prefetched), sends SIGTERM and waits for the worker to exit within the
/// pod's grace period. Returns (started, finished, ready, reserved) afterwards, and the
/// worker's log.
fn scale_down_during_a_task(extra: &str, seconds: &str) -> (usize, usize, u64, u64, String) {
    let (container, grace) = worker_container(extra);
    assert_eq!(
        container["command"],
        serde_json::json!(["celery"]),
        "exec form"
    );
    let redis = Redis::start();
    let url = redis.url();
    let dir = tempdir::Dir::new("shutdown");
    let file = dir.path().join("record.txt");
    python(
        &url,
        &[
            "send_record.py",
            "jobs",
            "3",
            file.to_str().unwrap(),
            seconds,
        ],
    );

    let mut worker = Worker::run(
        &url,
        &argv(&container),
        &plain_env(&container),
        &dir.path().join("worker.log"),
    );
    wait_until(Duration::from_secs(30), "a task runs", || {
        !record(&file).0.is_empty()
    });
    // Prefetch 2 x concurrency 1: the running task and one more are reserved.
    wait_until(Duration::from_secs(10), "one more is prefetched", || {
        truth(&url) == (1, 2)
    });

    worker.terminate();
    let mut status = None;
    wait_until(
        Duration::from_secs(grace as u64),
        "the worker exits within the pod's grace period (else the kubelet would kill it)",
        || {
            status = worker.process.try_wait().unwrap();
            status.is_some()
        },
    );
    let status = status.unwrap();
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(status.success(), "worker exit {status}: {log}");
    let (started, finished) = record(&file);
    let (ready, reserved) = truth(&url);
    (started.len(), finished.len(), ready, reserved, log)
}

#[test]
fn sigterm_lets_the_running_task_finish_and_requeues_the_prefetched_one() {
    // Warm shutdown, the default: the running task (4 s, well inside the grace period of the
    // time limit + 30 s) finishes; the prefetched one goes back to the queue.
    let (started, finished, ready, reserved, _) = scale_down_during_a_task("env: []", "4");
    assert_eq!((started, finished), (1, 1));
    assert_eq!(
        (ready, reserved),
        (2, 0),
        "the prefetched tasks are back in the queue"
    );
}

#[test]
fn soft_shutdown_requeues_a_task_that_would_outlive_the_grace_period() {
    // `shutdown: Soft` for tasks longer than the grace period: the operator remaps SIGTERM to
    // Celery's soft shutdown (a time-limited warm shutdown, Celery >= 5.5) and sets its
    // timeout on the command line; the running task is requeued, acks_late keeping it in
    // the broker until then.
    let pool = "shutdown: Soft\n      softShutdownTimeoutSeconds: 1\n      env: []";
    let (started, finished, ready, reserved, log) = scale_down_during_a_task(pool, "60");
    // The timeout came from the command line (the test app's own setting is 0: off).
    assert!(
        log.contains("Initiating Soft Shutdown, terminating in 1"),
        "{log}"
    );
    assert_eq!((started, finished), (1, 0), "the long task was interrupted");
    assert_eq!((ready, reserved), (3, 0), "and requeued with the other two");
}

#[test]
fn the_guardrail_flags_run_on_this_celery() {
    // disablePrefetch and the derived --max-memory-per-child, as generated, on the Celery of
    // the test virtualenv: the worker starts, and takes only the task it runs.
    let (container, _) = worker_container(
        "disablePrefetch: true\n      resources: {limits: {memory: 512Mi}}\n      env: []",
    );
    let args = argv(&container).join(" ");
    assert!(args.contains("--disable-prefetch"), "{args}");
    // Three quarters of 512 MiB for one process, in KiB.
    assert!(args.contains("--max-memory-per-child 393216"), "{args}");

    let redis = Redis::start();
    let url = redis.url();
    let dir = tempdir::Dir::new("guardrails");
    let file = dir.path().join("record.txt");
    python(
        &url,
        &["send_record.py", "jobs", "3", file.to_str().unwrap(), "60"],
    );
    let worker = Worker::run(&url, &argv(&container), &[], &dir.path().join("worker.log"));
    wait_until(Duration::from_secs(30), "a task runs", || {
        !record(&file).0.is_empty()
    });
    // Without prefetch (concurrency 1): one task reserved (the running one), two waiting;
    // with the pool's prefetch multiplier of 2 it would be two reserved. The task runs for a
    // minute, so a slow machine still looks while the first one runs.
    for _ in 0..5 {
        assert_eq!(truth(&url), (2, 1));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        record(&file).1.is_empty(),
        "the first task was still running"
    );
    worker.terminate();
}
