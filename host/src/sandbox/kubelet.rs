//! A kubelet (and Deployment controller) that runs pods as local processes: for every
//! Deployment of the operator it keeps `spec.replicas` processes of the pod's container
//! running, with the container's command, arguments and environment, in the sandbox's
//! Python virtualenv and app directory. It runs exec readiness probes, reports Pods and the
//! Deployment's status to the API server, and stops a pod as a kubelet does: SIGTERM, then
//! SIGKILL once `terminationGracePeriodSeconds` have passed.
//!
//! Where it differs from Kubernetes: the image is not used (the app comes from the app
//! directory); `%h` in arguments (Celery's host name) becomes the pod's name, since every
//! process shares this machine's host name; a pod whose process exits is replaced by a new
//! pod; a changed pod template replaces every pod at once (no rolling update); a pod to
//! remove is chosen as a ReplicaSet does: not ready first, then the lowest
//! `controller.kubernetes.io/pod-deletion-cost`, then the newest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Probe, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::env::{self, PodFields, Sources};
use crate::names::{MANAGER, labels};

/// How often the kubelet looks at Deployments and its processes.
const TICK: Duration = Duration::from_millis(250);

/// Where and how pods run.
pub struct Runtime {
    /// Directory the processes run in (the Celery app's).
    pub app_dir: PathBuf,
    /// Directories put first on `PATH` (the virtualenv's `bin`).
    pub path_prefix: Vec<PathBuf>,
    /// Directory of the pods' logs (`<pod>.log`).
    pub logs: PathBuf,
}

/// One pod: its process and what the kubelet knows of it.
struct RunningPod {
    name: String,
    template: String,
    child: Child,
    env: Vec<(String, String)>,
    started: Instant,
    ready: bool,
    probe: Option<ProbeRun>,
    next_probe: Instant,
    failures: i32,
    spec: Option<Probe>,
}

/// An exec readiness probe under way.
struct ProbeRun {
    child: Child,
    deadline: Instant,
}

/// A pod told to stop: killed at `kill_at` if it has not exited.
struct Stopping {
    name: String,
    child: Child,
    kill_at: Instant,
}

/// The kubelet of one namespace.
pub struct Kubelet {
    client: Client,
    ns: String,
    runtime: Runtime,
    pods: BTreeMap<String, Vec<RunningPod>>,
    stopping: Vec<Stopping>,
    reported: BTreeMap<String, serde_json::Value>,
    serial: u64,
}

impl Kubelet {
    pub fn new(client: Client, ns: &str, runtime: Runtime) -> Kubelet {
        Kubelet {
            client,
            ns: ns.to_string(),
            runtime,
            pods: BTreeMap::new(),
            stopping: Vec::new(),
            reported: BTreeMap::new(),
            serial: 0,
        }
    }

    /// Runs until `stop` is set; then stops every pod as on a scale-down and returns once
    /// they exited.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.tick().await {
                warn!(error = %format!("{e:#}"), "kubelet: tick failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => break,
            }
        }
        let all: Vec<RunningPod> = std::mem::take(&mut self.pods)
            .into_values()
            .flatten()
            .collect();
        for pod in all {
            self.stop_pod(pod, Duration::from_secs(30)).await;
        }
        while !self.stopping.is_empty() {
            self.reap_stopping().await;
            tokio::time::sleep(TICK).await;
        }
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        let selector = format!("{}={MANAGER}", labels::MANAGED_BY);
        let list = deployments
            .list(&ListParams::default().labels(&selector))
            .await
            .context("listing Deployments")?;
        let live: Vec<String> = list.items.iter().map(|d| d.name_any()).collect();
        for gone in self
            .pods
            .keys()
            .filter(|k| !live.contains(k))
            .cloned()
            .collect::<Vec<_>>()
        {
            for pod in self.pods.remove(&gone).unwrap_or_default() {
                self.stop_pod(pod, Duration::from_secs(30)).await;
            }
            self.reported.remove(&gone);
        }
        for d in &list.items {
            if let Err(e) = self.sync(d).await {
                warn!(deployment = %d.name_any(), error = %format!("{e:#}"), "kubelet: cannot run the pods");
            }
        }
        self.reap_stopping().await;
        Ok(())
    }

    /// Brings one Deployment's pods to its spec, runs their probes and reports its status.
    async fn sync(&mut self, d: &Deployment) -> anyhow::Result<()> {
        let name = d.name_any();
        let spec = d.spec.as_ref().context("no spec")?;
        let want = spec.replicas.unwrap_or(1).max(0) as usize;
        let template = serde_json::to_string(&spec.template).unwrap_or_default();
        let grace = Duration::from_secs(
            spec.template
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64,
        );
        let mut pods = self.pods.remove(&name).unwrap_or_default();

        // Exited pods are replaced; pods of an older template are stopped.
        let mut kept = Vec::new();
        for mut pod in pods.drain(..) {
            if let Ok(Some(status)) = pod.child.try_wait() {
                warn!(pod = %pod.name, %status, "kubelet: pod exited; replacing it");
                self.delete_pod_object(&pod.name).await;
            } else if pod.template != template {
                self.stop_pod(pod, grace).await;
            } else {
                kept.push(pod);
            }
        }
        pods = kept;

        if pods.len() > want {
            // A ReplicaSet's choice of pods to remove: not ready first, then the lowest
            // deletion cost, then the newest. The pods to keep sort first.
            let costs = self.deletion_costs().await;
            let cost = |p: &RunningPod| costs.get(&p.name).copied().unwrap_or(0);
            pods.sort_by_key(|p| (!p.ready, -cost(p), p.started));
            for pod in pods.split_off(want) {
                self.stop_pod(pod, grace).await;
            }
        }
        while pods.len() < want {
            match self.start_pod(&name, d, &template).await {
                Ok(pod) => pods.push(pod),
                Err(e) => {
                    warn!(deployment = %name, error = %format!("{e:#}"), "kubelet: cannot start a pod");
                    break;
                }
            }
        }
        for pod in &mut pods {
            let was = pod.ready;
            probe(pod, &self.runtime);
            if pod.ready != was {
                self.report_pod(pod).await;
            }
        }
        self.report_deployment(d, &pods).await;
        self.pods.insert(name, pods);
        Ok(())
    }

    async fn start_pod(
        &mut self,
        deployment: &str,
        d: &Deployment,
        template: &str,
    ) -> anyhow::Result<RunningPod> {
        let pod_spec = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("no pod template")?;
        let container: &Container = pod_spec.containers.first().context("no container")?;
        self.serial += 1;
        let name = format!("{deployment}-{:05x}", self.serial & 0xfffff);
        let sources = self.sources(container).await?;
        let env = env::environment(
            container,
            &PodFields {
                name: &name,
                namespace: &self.ns,
            },
            &sources,
        )
        .map_err(anyhow::Error::msg)?;
        let mut argv: Vec<String> = container
            .command
            .iter()
            .chain(container.args.iter())
            .flatten()
            .map(|a| env::expand(a, &env).replace("%h", &name))
            .collect();
        anyhow::ensure!(!argv.is_empty(), "the container has no command");
        let program = argv.remove(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.runtime.logs.join(format!("{name}.log")))
            .context("opening the pod's log")?;
        let child = self
            .command(&program, &env)
            .args(&argv)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        info!(pod = %name, command = %program, "kubelet: pod started");
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                            "name": deployment, "uid": d.metadata.uid, "controller": true}]},
            "spec": pod_spec,
        });
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        if let Ok(pod) = serde_json::from_value::<Pod>(object)
            && let Err(e) = pods.create(&PostParams::default(), &pod).await
        {
            warn!(pod = %name, error = %e, "kubelet: cannot create the Pod object");
        }
        let spec = container.readiness_probe.clone();
        let delay = spec
            .as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0)
            .max(0) as u64;
        let pod = RunningPod {
            name,
            template: template.to_string(),
            child,
            env,
            started: Instant::now(),
            ready: false,
            probe: None,
            next_probe: Instant::now() + Duration::from_secs(delay),
            failures: 0,
            spec,
        };
        self.report_pod(&pod).await;
        Ok(pod)
    }

    /// The `controller.kubernetes.io/pod-deletion-cost` of the namespace's Pods that have one.
    async fn deletion_costs(&self) -> BTreeMap<String, i64> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let Ok(list) = pods.list(&ListParams::default()).await else {
            return BTreeMap::new();
        };
        list.items
            .iter()
            .filter_map(|p| {
                let cost = p
                    .annotations()
                    .get("controller.kubernetes.io/pod-deletion-cost")?
                    .parse()
                    .ok()?;
                Some((p.name_any(), cost))
            })
            .collect()
    }

    /// The Secrets and ConfigMaps the container refers to (those that exist).
    async fn sources(&self, container: &Container) -> anyhow::Result<Sources> {
        let (secrets, config_maps) = Sources::wanted(container);
        let mut sources = Sources::default();
        let secret_api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        for name in secrets {
            if let Some(s) = secret_api.get_opt(&name).await? {
                let data = s.data.unwrap_or_default().into_iter();
                let data = data.map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()));
                sources.secrets.insert(name, data.collect());
            }
        }
        let cm_api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        for name in config_maps {
            if let Some(c) = cm_api.get_opt(&name).await? {
                sources.config_maps.insert(name, c.data.unwrap_or_default());
            }
        }
        Ok(sources)
    }

    /// A command run like a container's process: in the app directory, with the pod's
    /// environment and the virtualenv first on `PATH`, in a process group of its own.
    fn command(&self, program: &str, env: &[(String, String)]) -> Command {
        command(&self.runtime, program, env)
    }

    /// Sends SIGTERM to the pod's process and deletes its Pod object; the process is killed
    /// after `grace` if it has not exited by then.
    async fn stop_pod(&mut self, pod: RunningPod, grace: Duration) {
        if let Some(pid) = pod.child.id() {
            // SAFETY: a plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        info!(pod = %pod.name, grace = ?grace, "kubelet: pod stopping (SIGTERM)");
        self.delete_pod_object(&pod.name).await;
        self.stopping.push(Stopping {
            name: pod.name,
            child: pod.child,
            kill_at: Instant::now() + grace,
        });
    }

    async fn reap_stopping(&mut self) {
        let now = Instant::now();
        self.stopping.retain_mut(|s| match s.child.try_wait() {
            Ok(Some(status)) => {
                info!(pod = %s.name, %status, "kubelet: pod stopped");
                // What the main process left behind in its group goes with it.
                kill_group(&s.child, libc::SIGKILL);
                false
            }
            _ if now >= s.kill_at => {
                warn!(pod = %s.name, "kubelet: grace period over; SIGKILL");
                kill_group(&s.child, libc::SIGKILL);
                let _ = s.child.start_kill();
                true
            }
            _ => true,
        });
    }

    async fn delete_pod_object(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let _ = pods.delete(name, &DeleteParams::default()).await;
    }

    async fn report_pod(&self, pod: &RunningPod) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let ready = if pod.ready { "True" } else { "False" };
        let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": ready}]}});
        let _ = pods
            .patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(status))
            .await;
    }

    /// Writes the Deployment's status when it changed.
    async fn report_deployment(&mut self, d: &Deployment, pods: &[RunningPod]) {
        let name = d.name_any();
        let ready = pods.iter().filter(|p| p.ready).count() as i32;
        let status = json!({
            "observedGeneration": d.metadata.generation,
            "replicas": pods.len(),
            "updatedReplicas": pods.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": pods.len() as i32 - ready,
        });
        if self.reported.get(&name) == Some(&status) {
            return;
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            Ok(_) => {
                self.reported.insert(name, status);
            }
            Err(e) => warn!(deployment = %name, error = %e, "kubelet: cannot report status"),
        }
    }
}

/// A command run like a container's process: in the app directory, with the pod's
/// environment (and nothing else of ours but `PATH`, `HOME` and the locale), in a process
/// group of its own.
fn command(runtime: &Runtime, program: &str, env: &[(String, String)]) -> Command {
    let mut path: Vec<PathBuf> = runtime.path_prefix.clone();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let mut cmd = Command::new(program);
    cmd.current_dir(&runtime.app_dir)
        .env_clear()
        .env("PATH", std::env::join_paths(path).unwrap_or_default())
        .envs(
            ["HOME", "LANG", "LC_ALL", "TMPDIR"]
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .env("PYTHONUNBUFFERED", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

fn kill_group(child: &Child, signal: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: a plain killpg(2) of our own child's process group.
        unsafe { libc::killpg(pid as i32, signal) };
    }
}

/// Runs the pod's readiness probe when it is due and reads its result: a pod without one is
/// ready once started.
fn probe(pod: &mut RunningPod, runtime: &Runtime) {
    let Some(spec) = pod.spec.clone() else {
        pod.ready = true;
        return;
    };
    let now = Instant::now();
    if let Some(run) = &mut pod.probe {
        let result = match run.child.try_wait() {
            Ok(Some(status)) => Some(status.success()),
            Ok(None) if now >= run.deadline => {
                kill_group(&run.child, libc::SIGKILL);
                Some(false)
            }
            Ok(None) => None,
            Err(_) => Some(false),
        };
        let Some(ok) = result else {
            return;
        };
        pod.probe = None;
        if ok {
            pod.failures = 0;
            pod.ready = true;
        } else {
            pod.failures += 1;
            if pod.failures >= spec.failure_threshold.unwrap_or(3) {
                pod.ready = false;
            }
        }
        // Until it is ready, a pod is probed again soon, as a kubelet does at startup.
        let every = if pod.ready {
            spec.period_seconds.unwrap_or(10)
        } else {
            1
        };
        pod.next_probe = now + Duration::from_secs(every.max(1) as u64);
        return;
    }
    if now < pod.next_probe {
        return;
    }
    let Some(argv) = spec
        .exec
        .as_ref()
        .and_then(|e| e.command.clone())
        .filter(|c| !c.is_empty())
    else {
        // Only exec probes run here; any other counts as passing.
        pod.ready = true;
        return;
    };
    let argv: Vec<String> = argv.iter().map(|a| env::expand(a, &pod.env)).collect();
    let spawned = command(runtime, &argv[0], &pod.env)
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => {
            pod.probe = Some(ProbeRun {
                child,
                deadline: now
                    + Duration::from_secs(spec.timeout_seconds.unwrap_or(1).max(1) as u64),
            })
        }
        Err(e) => {
            warn!(pod = %pod.name, error = %e, "kubelet: cannot run the readiness probe");
            pod.next_probe = now + Duration::from_secs(1);
        }
    }
}
