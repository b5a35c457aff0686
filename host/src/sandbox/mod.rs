//! `celery-operator sandbox`: the operator scaling real Celery workers on one machine, with
//! no cluster. It starts, on 127.0.0.1 and free ports, an in-memory Kubernetes API server, a
//! `redis-server`, the operator itself (this binary's `run`, as a child process) and a
//! kubelet that runs every pod as a local process; it sends a scenario's tasks, shows the
//! pool live, and ends with a report: backlog and replicas over time, reaction times, and
//! the accounting of every task (sent, completed, lost, run more than once).

pub mod env;
pub mod keda;
pub mod kubelet;
pub mod load;
pub mod report;
pub mod services;
pub mod view;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use tokio::io::AsyncWriteExt;
use tracing::info;

use crate::crd::Celery;
use crate::names::MANAGER;
use load::Trace;
use report::{Accounting, Sample};
use services::{Operator, Redis};

/// The namespace everything runs in.
/// The namespace the sandbox runs in.
pub const NAMESPACE: &str = "default";
/// How often the sandbox samples the pool.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What a sandbox run does.
pub struct Options {
    /// The Celery resource to run (its first pool is the one loaded and shown).
    pub resource: PathBuf,
    /// The Celery app's directory: the pods' working directory, with `send.py`.
    pub app_dir: PathBuf,
    /// The Python virtualenv with Celery (its `bin` goes first on the pods' `PATH`).
    pub venv: PathBuf,
    /// The operator binary, run with `run` (the CLI passes itself).
    pub operator: PathBuf,
    /// The load.
    pub trace: Trace,
    /// A name for the load, in the report.
    pub scenario: String,
    /// Where the report and the logs go.
    pub out: PathBuf,
    /// Also simulate KEDA + HPA on the same trace and plot it beside the run.
    pub compare_keda: bool,
    /// Also run, side by side, a copy of the first pool scaled by the built-in `latency`
    /// scaler with this `targetWaitSeconds`, on its own queue with the same load.
    pub compare_latency: Option<f64>,
    /// The longest the sandbox waits, after the load, for every task to complete and the
    /// pool to scale back down.
    pub settle_limit: Duration,
}

/// What a run measured.
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub accounting: Accounting,
    pub reaction: report::Reaction,
    /// Each scaler's task waits and cost: the first pool's, then its latency twin's.
    pub outcomes: Vec<report::Outcome>,
    /// The report's Markdown file.
    pub report: PathBuf,
}

/// Runs the sandbox scenario to its end and writes the report.
pub async fn run(options: Options) -> anyhow::Result<Outcome> {
    let out = &options.out;
    std::fs::create_dir_all(out.join("pods"))
        .with_context(|| format!("creating {}", out.display()))?;
    let text = std::fs::read_to_string(&options.resource)
        .with_context(|| format!("reading {}", options.resource.display()))?;
    let mut celery: Celery = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not a Celery resource", options.resource.display()))?;
    celery.metadata.namespace = Some(NAMESPACE.into());
    if let Some(target) = options.compare_latency {
        let twin = latency_twin(celery.spec.workers.first(), target)?;
        celery.spec.workers.insert(1, twin);
    }
    let pool = celery
        .spec
        .workers
        .first()
        .context("the Celery resource has no worker pool")?
        .clone();
    let pools: Vec<Pool> = celery
        .spec
        .workers
        .iter()
        .map(|p| Pool {
            name: p.name.clone(),
            deployment: crate::names::worker_name(&celery, &p.name),
            queues: p.queues.clone(),
        })
        .collect();
    // The load goes to the first pool's first queue (and the same load to its latency twin's).
    let queue = pools[0]
        .queues
        .first()
        .cloned()
        .context("the pool has no queue")?;
    let mut loaded = vec![queue.clone()];
    if options.compare_latency.is_some() {
        loaded.push(pools[1].queues[0].clone());
    }
    let python = options.venv.join("bin/python");
    if !python.exists() {
        bail!(
            "no Python virtualenv at {} (scripts/setup.sh makes one; or --venv)",
            options.venv.display()
        );
    }

    let apiserver = memory_apiserver::ApiServer::start().await;
    let kubeconfig = out.join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig);
    let client = Client::try_from(kube::Config::new(apiserver.url().parse()?))?;
    let redis = Redis::start(&out.join("redis")).await?;
    let broker_url = format!("redis://127.0.0.1:{}/0", redis.port);
    install(&client, &celery, &broker_url).await?;
    let operator = Operator::start(&options.operator, &kubeconfig, &out.join("operator.log"))?;
    println!(
        "sandbox: API server {} (kubectl --kubeconfig {}), redis {broker_url}, operator pid {}",
        apiserver.url(),
        kubeconfig.display(),
        operator.pid()
    );

    let (stop_kubelet, stopped) = tokio::sync::watch::channel(false);
    let kubelet = kubelet::Kubelet::new(
        client.clone(),
        NAMESPACE,
        kubelet::Runtime {
            app_dir: options.app_dir.clone(),
            path_prefix: vec![options.venv.join("bin")],
            logs: out.join("pods"),
        },
    );
    let kubelet = tokio::spawn(kubelet.run(stopped));

    let mut broker = redis.client().await?;
    // The broker as the operator reads it: the same probe, the same layout.
    let probe = crate::broker::Probe::for_broker(&broker_url, &celery.spec.broker)
        .await
        .map_err(|e| anyhow::anyhow!("probing the sandbox's Redis: {e}"))?;
    let mut sender = services::sender(
        &python,
        &options.app_dir,
        &broker_url,
        &out.join("sender.log"),
    )?;
    let mut sender_in = sender.stdin.take().context("the sender's stdin")?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);

    // Wait for the pool's first worker before any load: the scenario measures scaling, not
    // the sandbox starting.
    let started = Instant::now();
    loop {
        let looks = look(&probe, &mut broker, &deployments, &pools, 0.0).await;
        if looks[0].ready > 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "no worker of {} was ready within 120 s; see {}",
                pools[0].deployment,
                out.join("pods").display()
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }

    let mut view = view::View::default();
    let mut samples = Vec::new();
    let mut twin_samples = Vec::new();
    let total = options.trace.total_tasks() * loaded.len() as u64;
    let load_seconds = options.trace.duration();
    let t0 = Instant::now();
    let mut next_second = 0usize;
    let mut settle_start: Option<f64> = None;
    let floor = min_replicas(&pool);
    loop {
        let t = t0.elapsed().as_secs_f64();
        while next_second < load_seconds && next_second as f64 <= t {
            let s = options.trace.seconds[next_second];
            for queue in loaded.iter().filter(|_| s.tasks > 0) {
                let line = format!("{} {} {queue}\n", s.tasks, s.task_seconds);
                sender_in
                    .write_all(line.as_bytes())
                    .await
                    .context("the task sender stopped; see sender.log")?;
            }
            next_second += 1;
        }
        let looks = look(&probe, &mut broker, &deployments, &pools, t).await;
        let s = looks[0];
        samples.push(s);
        if options.compare_latency.is_some() {
            twin_samples.push(looks[1]);
        }
        let sending = next_second < load_seconds;
        let settled = !sending
            && s.sent >= total
            && s.done + s.failed >= total
            && looks.iter().take(loaded.len()).all(|l| l.desired <= floor);
        let phase = if sending {
            "sending"
        } else {
            "settling: completing tasks, scaling down"
        };
        if !sending && settle_start.is_none() {
            settle_start = Some(t);
        }
        let progress = if sending {
            0.8 * t / load_seconds.max(1) as f64
        } else {
            0.8 + 0.2 * (s.done as f64 / total.max(1) as f64)
        };
        let too_long = settle_start.is_some_and(|s0| t - s0 > options.settle_limit.as_secs_f64());
        let rows: Vec<(&str, Sample)> = pools.iter().map(|p| p.name.as_str()).zip(looks).collect();
        let frame = view::frame(&rows, progress, phase);
        view.show(&frame, t, settled || too_long);
        if settled {
            break;
        }
        if too_long {
            println!(
                "sandbox: still not settled after {:?}; stopping",
                options.settle_limit
            );
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    drop(sender_in);
    let _ = sender.wait().await;

    let accounting = services::accounting(&mut broker).await?;
    let mut waits = Vec::new();
    for queue in &loaded {
        waits.push(services::waits(&mut broker, queue).await?);
    }
    let _ = stop_kubelet.send(true);
    let _ = kubelet.await;
    operator.stop().await;
    drop(redis);

    let run = Run {
        samples,
        twin_samples,
        waits,
        accounting,
    };
    write_report(&options, &pool, run)
}

/// What a run saw: the first pool's samples (and its latency twin's), the waits of the tasks
/// of each loaded queue (first pool's, then the twin's), and the fate of every task.
struct Run {
    samples: Vec<Sample>,
    twin_samples: Vec<Sample>,
    waits: Vec<Vec<f64>>,
    accounting: Accounting,
}

/// A copy of `pool` on its own queue, scaled by the built-in `latency` scaler with
/// `target_wait_seconds` and the same stabilization settings: the sandbox runs both side
/// by side on the same load.
fn latency_twin(
    pool: Option<&crate::crd::WorkerPool>,
    target_wait_seconds: f64,
) -> anyhow::Result<crate::crd::WorkerPool> {
    let pool = pool.context("the Celery resource has no worker pool")?;
    anyhow::ensure!(
        target_wait_seconds.is_finite() && target_wait_seconds > 0.0,
        "the target wait must be a positive number of seconds"
    );
    let mut twin = pool.clone();
    twin.name = "latency".into();
    twin.queues = vec!["latency".into()];
    let autoscaling = twin
        .autoscaling
        .as_mut()
        .context("the first pool is not autoscaled: nothing to compare")?;
    let mut settings = autoscaling
        .scaler
        .as_ref()
        .and_then(|s| s.settings.clone())
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(settings) = settings.as_object_mut() {
        settings.retain(|k, _| k.ends_with("StabilizationSeconds") || k == "tolerance");
        settings.insert("targetWaitSeconds".into(), target_wait_seconds.into());
    }
    autoscaling.scaler = Some(crate::crd::PluginRef {
        name: "latency".into(),
        digest: None,
        settings: Some(settings),
        limits: None,
    });
    Ok(twin)
}

/// Writes the report of a run (and, when asked, of its KEDA + HPA simulation or of its
/// latency twin).
fn write_report(
    options: &Options,
    pool: &crate::crd::WorkerPool,
    run: Run,
) -> anyhow::Result<Outcome> {
    let Run {
        samples,
        twin_samples,
        waits,
        accounting,
    } = run;
    let out = &options.out;
    let reaction = report::reaction(&samples);
    let title = format!("{} load on pool {}", options.scenario, pool.name);
    let mut extra: Vec<report::Series> = Vec::new();
    let mut comparison = None;
    if options.compare_keda {
        let sim = keda::simulate(
            &options.trace,
            &keda::Pool::from_spec(pool, &samples),
            samples.last().map_or(0.0, |s| s.t),
        );
        comparison = Some(keda::summary(&sim, &samples, options.trace.total_tasks()));
        extra = sim.series();
    }
    let scaler = |p: &crate::crd::WorkerPool| {
        p.autoscaling
            .as_ref()
            .and_then(|a| a.scaler.as_ref())
            .map_or("queue-length".to_string(), |s| s.name.clone())
    };
    let mut rows = vec![report::Outcome::of(
        &format!("{} (pool {})", scaler(pool), pool.name),
        &samples,
        waits.first().map_or(&[][..], Vec::as_slice),
    )];
    if let Some(target) = options.compare_latency {
        rows.push(report::Outcome::of(
            &format!("latency, target wait {target} s (pool latency)"),
            &twin_samples,
            waits.get(1).map_or(&[][..], Vec::as_slice),
        ));
        extra.push(report::Series {
            label: "latency scaler: replicas ready",
            points: twin_samples
                .iter()
                .map(|s| (s.t, f64::from(s.ready)))
                .collect(),
        });
        extra.push(report::Series {
            label: "latency scaler: backlog",
            points: twin_samples
                .iter()
                .map(|s| (s.t, s.backlog() as f64))
                .collect(),
        });
        report::write(out, "latency-samples.csv", &report::csv(&twin_samples))?;
    }
    let table = report::outcomes(&rows);
    let comparison = match comparison {
        Some(c) => Some(format!("{table}\n{c}")),
        None => Some(table),
    };
    let svg = report::plot(&samples, &extra, &title).map_err(anyhow::Error::msg)?;
    report::write(out, "report.svg", &svg)?;
    report::write(out, "samples.csv", &report::csv(&samples))?;
    let md = report::markdown(
        &title,
        &accounting,
        &reaction,
        &samples,
        comparison.as_deref(),
    );
    report::write(out, "report.md", &md)?;
    info!("sandbox finished");
    Ok(Outcome {
        samples,
        accounting,
        reaction,
        outcomes: rows,
        report: out.join("report.md"),
    })
}

/// The pool's least replicas: where it settles once the load is gone.
fn min_replicas(pool: &crate::crd::WorkerPool) -> u32 {
    pool.autoscaling
        .as_ref()
        .map_or(pool.replicas.unwrap_or(1), |a| a.min_replicas)
        .max(0) as u32
}

/// Installs the CRD, the broker's Secret and the Celery resource.
pub async fn install(client: &Client, celery: &Celery, broker_url: &str) -> anyhow::Result<()> {
    let apply = PatchParams::apply(MANAGER).force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Celery::crd();
    crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
        .await
        .context("installing the CRD")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("celery-broker".into()),
            ..Default::default()
        },
        data: Some(
            [(
                "url".to_string(),
                ByteString(broker_url.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    secrets
        .patch("celery-broker", &apply, &Patch::Apply(&secret))
        .await
        .context("creating the broker's Secret")?;
    let ar = kube::api::ApiResource::erase::<Celery>(&());
    let celeries: Api<DynamicObject> = Api::namespaced_with(client.clone(), NAMESPACE, &ar);
    // The CRD is served at once by the in-memory API server.
    celeries
        .patch(&celery.name_any(), &apply, &Patch::Apply(celery))
        .await
        .context("creating the Celery resource")?;
    Ok(())
}

/// A pool as the sandbox shows it.
struct Pool {
    name: String,
    deployment: String,
    queues: Vec<String>,
}

/// One look at every pool: its queues in the broker, its Deployment, and the tasks sent and
/// done so far (the same for every pool: they are the sandbox's).
async fn look(
    probe: &crate::broker::Probe,
    broker: &mut redis::aio::MultiplexedConnection,
    deployments: &Api<Deployment>,
    pools: &[Pool],
    t: f64,
) -> Vec<Sample> {
    let all: Vec<String> = pools.iter().flat_map(|p| p.queues.clone()).collect();
    let queues = probe.sample(&all).await.unwrap_or_default();
    let (sent, done, failed) = services::task_counts(broker).await;
    let mut looks = Vec::new();
    for pool in pools {
        let mine = queues.iter().filter(|q| pool.queues.contains(&q.name));
        let (queued, reserved) = mine.fold((0, 0), |(r, u), q| (r + q.ready, u + q.reserved));
        let (desired, ready) = match deployments.get_opt(&pool.deployment).await {
            Ok(Some(d)) => (
                d.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32,
                d.status.and_then(|s| s.ready_replicas).unwrap_or(0).max(0) as u32,
            ),
            _ => (0, 0),
        };
        looks.push(Sample {
            t,
            queued,
            reserved,
            desired,
            ready,
            sent,
            done,
            failed,
        });
    }
    looks
}
