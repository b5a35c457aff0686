//! Worker pools: one Deployment (and optionally a PodDisruptionBudget) per pool.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{EnvVar, ExecAction, Probe};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{celery_container, child_meta, pod_template, selector, worker_name};
use crate::children::{Child, ChildKind};
use crate::crd::{Celery, PoolType, RolloutType, ShutdownMode, WorkerPool};

const COMPONENT: &str = "worker";

/// Grace period when neither the pool nor its time limit says otherwise: long enough for
/// typical tasks to finish during a warm shutdown.
pub const DEFAULT_GRACE_SECONDS: i64 = 300;
/// Time added to a pool's hard time limit for the worker to acknowledge and exit.
pub const GRACE_MARGIN_SECONDS: i64 = 30;

/// The pool's Deployment and, when asked for, its PodDisruptionBudget.
pub fn children(celery: &Celery, pool: &WorkerPool) -> Vec<Child> {
    let mut out = vec![Child::new(
        ChildKind::Deployment,
        worker_name(celery, &pool.name),
        &deployment(celery, pool),
    )];
    if let Some(pdb) = &pool.pod_disruption_budget {
        let budget = PodDisruptionBudget {
            metadata: meta(celery, pool),
            spec: Some(PodDisruptionBudgetSpec {
                selector: Some(selector(celery, COMPONENT, Some(&pool.name))),
                min_available: pdb.min_available.clone(),
                max_unavailable: pdb.max_unavailable.clone(),
                ..Default::default()
            }),
            status: None,
        };
        out.push(Child::new(
            ChildKind::PodDisruptionBudget,
            worker_name(celery, &pool.name),
            &budget,
        ));
    }
    out
}

fn meta(celery: &Celery, pool: &WorkerPool) -> ObjectMeta {
    child_meta(
        celery,
        worker_name(celery, &pool.name),
        COMPONENT,
        Some(&pool.name),
    )
}

/// The arguments after `celery -A <app>`.
pub fn worker_args(celery: &Celery, pool: &WorkerPool) -> Vec<String> {
    let mut args = vec![
        "worker".to_string(),
        // Node names must be unique per pod; %h is the pod's host name.
        "--hostname".into(),
        format!("{}@%h", pool.name),
        "--queues".into(),
        pool.queues.join(","),
        "--pool".into(),
        pool.pool.unwrap_or(PoolType::Prefork).as_str().into(),
    ];
    let mut opt = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            args.push(flag.into());
            args.push(v);
        }
    };
    opt("--concurrency", pool.concurrency.map(|v| v.to_string()));
    opt(
        "--prefetch-multiplier",
        pool.prefetch_multiplier.map(|v| v.to_string()),
    );
    opt(
        "--max-tasks-per-child",
        pool.max_tasks_per_child.map(|v| v.to_string()),
    );
    opt(
        "--max-memory-per-child",
        max_memory_per_child_kib(pool).map(|v| v.to_string()),
    );
    opt(
        "--time-limit",
        pool.time_limit_seconds.map(|v| v.to_string()),
    );
    opt(
        "--soft-time-limit",
        pool.soft_time_limit_seconds.map(|v| v.to_string()),
    );
    if pool.disable_prefetch == Some(true) {
        args.push("--disable-prefetch".into());
    }
    if celery.spec.flower.as_ref().is_some_and(|f| f.enabled) {
        // Flower only sees task progress when workers send task events.
        args.push("--task-events".into());
    }
    args.extend(pool.args.iter().cloned());
    if pool.shutdown == Some(ShutdownMode::Soft) {
        // Worker settings after `--` (Celery's `config_from_cmdline`), after the user's.
        if !args.iter().any(|a| a == "--") {
            args.push("--".into());
        }
        args.push(format!(
            "worker.soft_shutdown_timeout={}",
            soft_shutdown_timeout(pool)
        ));
        if pool.soft_shutdown_on_idle == Some(true) {
            args.push("worker.enable_soft_shutdown_on_idle=True".into());
        }
    }
    args
}

/// Seconds running tasks get in a soft shutdown: the pool's, else the grace period less
/// 10 s (at least 1 s) so that they are requeued before the pod is killed.
pub fn soft_shutdown_timeout(pool: &WorkerPool) -> i64 {
    pool.soft_shutdown_timeout_seconds
        .unwrap_or_else(|| (grace_period(pool) - 10).max(1))
}

/// A prefork pool process's memory bound in KiB: the pool's, else three quarters of the
/// container's memory limit over its processes (room for the main process, and for what a
/// process grows during the task after which it is checked). None for other pools, which
/// have no such processes, and without a limit or a concurrency to share it by.
pub fn max_memory_per_child_kib(pool: &WorkerPool) -> Option<i64> {
    if pool.pool.unwrap_or(PoolType::Prefork) != PoolType::Prefork {
        return None;
    }
    if pool.max_memory_per_child_kib.is_some() {
        return pool.max_memory_per_child_kib;
    }
    let limit = pool
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("memory")
        .and_then(|q| crate::quantity::parse(&q.0))?;
    let processes = pool.concurrency.filter(|c| *c > 0)?;
    Some(((limit * 0.75 / f64::from(processes)) / 1024.0).floor() as i64).filter(|k| *k > 0)
}

/// Seconds Kubernetes waits after SIGTERM before killing a worker pod.
pub fn grace_period(pool: &WorkerPool) -> i64 {
    pool.termination_grace_period_seconds.unwrap_or_else(|| {
        pool.time_limit_seconds
            .map(|t| t + GRACE_MARGIN_SECONDS)
            .unwrap_or(DEFAULT_GRACE_SECONDS)
    })
}

/// `celery inspect ping` on this very worker. Readiness only: while the broker is down the
/// pod turns unready, but it is never restarted, so no crash loop and no killed tasks.
fn default_readiness_probe(celery: &Celery, pool: &WorkerPool) -> Probe {
    // `app` and the pool name are validated to hold no shell metacharacters.
    let script = format!(
        "exec celery -A {} inspect ping --destination \"{}@$HOSTNAME\" --timeout 10",
        celery.spec.app, pool.name
    );
    Probe {
        exec: Some(ExecAction {
            command: Some(vec!["sh".into(), "-c".into(), script]),
        }),
        initial_delay_seconds: Some(10),
        period_seconds: Some(60),
        timeout_seconds: Some(20),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn deployment(celery: &Celery, pool: &WorkerPool) -> Deployment {
    // Celery's soft shutdown starts on SIGQUIT; the kubelet sends SIGTERM. First, so that
    // the pool's own env can still set it otherwise.
    let remap = (pool.shutdown == Some(ShutdownMode::Soft)).then(|| EnvVar {
        name: "REMAP_SIGTERM".into(),
        value: Some("SIGQUIT".into()),
        ..Default::default()
    });
    let env: Vec<EnvVar> = remap.into_iter().chain(pool.env.iter().cloned()).collect();
    let mut container = celery_container(celery, COMPONENT, worker_args(celery, pool), &env);
    container.resources = pool.resources.clone();
    container.readiness_probe = Some(
        pool.readiness_probe
            .clone()
            .unwrap_or_else(|| default_readiness_probe(celery, pool)),
    );
    container.liveness_probe = pool.liveness_probe.clone();

    let mut template = pod_template(celery, COMPONENT, Some(&pool.name), container);
    let pod = template.spec.as_mut().expect("pod_template sets a spec");
    pod.termination_grace_period_seconds = Some(grace_period(pool));
    if let Some(ns) = &pool.node_selector {
        pod.node_selector = Some(ns.clone());
    }
    if let Some(t) = &pool.tolerations {
        pod.tolerations = Some(t.clone());
    }
    if let Some(a) = &pool.affinity {
        pod.affinity = Some(a.clone());
    }

    Deployment {
        metadata: meta(celery, pool),
        spec: Some(DeploymentSpec {
            // With an autoscaler the field is left out entirely: whoever applies `replicas`
            // owns it, and the operator must never fight the autoscaler.
            replicas: match pool.autoscaling {
                Some(_) => None,
                None => Some(pool.replicas.unwrap_or(1)),
            },
            selector: selector(celery, COMPONENT, Some(&pool.name)),
            strategy: pool.rollout_strategy.as_ref().map(|s| DeploymentStrategy {
                type_: Some(
                    match s.type_ {
                        RolloutType::RollingUpdate => "RollingUpdate",
                        RolloutType::Recreate => "Recreate",
                    }
                    .into(),
                ),
                rolling_update: (s.type_ == RolloutType::RollingUpdate
                    && (s.max_surge.is_some() || s.max_unavailable.is_some()))
                .then(|| RollingUpdateDeployment {
                    max_surge: s.max_surge.clone(),
                    max_unavailable: s.max_unavailable.clone(),
                }),
            }),
            template,
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired_children;
    use crate::desired::tests::{FULL, celery, find};
    use serde_json::{Value, json};

    fn container(children: &[Child], name: &str) -> Value {
        find(children, ChildKind::Deployment, name)["spec"]["template"]["spec"]["containers"][0]
            .clone()
    }

    #[test]
    fn worker_command_is_exec_form_with_pool_settings() {
        let children = desired_children(&celery(FULL));
        let c = container(&children, "demo-worker-default");
        assert_eq!(c["command"], json!(["celery"]));
        assert_eq!(
            c["args"],
            json!([
                "-A",
                "proj.celery:app",
                "worker",
                "--hostname",
                "default@%h",
                "--queues",
                "celery,emails",
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "--prefetch-multiplier",
                "1",
                "--time-limit",
                "600",
                "--task-events",
                "--loglevel",
                "INFO"
            ])
        );
    }

    #[test]
    fn defaults_are_prefork_and_no_task_events_without_flower() {
        let yaml =
            "app: p\nimage: i\nbroker: {secretRef: {name: b, key: u}}\nworkers: [{name: w}]\n";
        let children = desired_children(&celery(yaml));
        let d = find(&children, ChildKind::Deployment, "demo-worker-w");
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["args"],
            json!([
                "-A",
                "p",
                "worker",
                "--hostname",
                "w@%h",
                "--queues",
                "celery",
                "--pool",
                "prefork"
            ])
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            DEFAULT_GRACE_SECONDS
        );
    }

    #[test]
    fn fixed_pools_set_replicas_and_autoscaled_pools_omit_them() {
        let children = desired_children(&celery(FULL));
        assert_eq!(
            find(&children, ChildKind::Deployment, "demo-worker-default")["spec"]["replicas"],
            3
        );
        let heavy = find(&children, ChildKind::Deployment, "demo-worker-heavy");
        assert!(heavy["spec"].get("replicas").is_none(), "{}", heavy["spec"]);
    }

    #[test]
    fn grace_period_covers_the_task_time_limit() {
        let children = desired_children(&celery(FULL));
        let d = find(&children, ChildKind::Deployment, "demo-worker-default");
        assert_eq!(
            d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            600 + GRACE_MARGIN_SECONDS
        );
        let explicit = FULL.replace(
            "timeLimitSeconds: 600",
            "timeLimitSeconds: 600\n    terminationGracePeriodSeconds: 900",
        );
        let children = desired_children(&celery(&explicit));
        let d = find(&children, ChildKind::Deployment, "demo-worker-default");
        assert_eq!(
            d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            900
        );
    }

    #[test]
    fn readiness_probe_pings_this_worker_and_there_is_no_liveness_probe() {
        let children = desired_children(&celery(FULL));
        let c = container(&children, "demo-worker-heavy");
        let cmd = c["readinessProbe"]["exec"]["command"].as_array().unwrap();
        assert_eq!(cmd[0], "sh");
        let script = cmd[2].as_str().unwrap();
        assert!(
            script.starts_with("exec celery -A proj.celery:app inspect ping"),
            "{script}"
        );
        assert!(script.contains("heavy@$HOSTNAME"), "{script}");
        assert!(c.get("livenessProbe").is_none());
    }

    #[test]
    fn pool_scheduling_overrides_shared_settings() {
        let yaml = "app: p\nimage: i\nbroker: {secretRef: {name: b, key: u}}\npod: {nodeSelector: {disk: ssd}}\nworkers:\n  - {name: a}\n  - {name: gpu, nodeSelector: {gpu: 'true'}, tolerations: [{key: gpu, operator: Exists}]}\n";
        let children = desired_children(&celery(yaml));
        let a =
            &find(&children, ChildKind::Deployment, "demo-worker-a")["spec"]["template"]["spec"];
        assert_eq!(a["nodeSelector"], json!({"disk": "ssd"}));
        let gpu =
            &find(&children, ChildKind::Deployment, "demo-worker-gpu")["spec"]["template"]["spec"];
        assert_eq!(gpu["nodeSelector"], json!({"gpu": "true"}));
        assert_eq!(gpu["tolerations"][0]["key"], "gpu");
    }

    #[test]
    fn pod_disruption_budget_selects_the_pool_pods() {
        let children = desired_children(&celery(FULL));
        let pdb = find(
            &children,
            ChildKind::PodDisruptionBudget,
            "demo-worker-default",
        );
        assert_eq!(pdb["apiVersion"], "policy/v1");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        let d = find(&children, ChildKind::Deployment, "demo-worker-default");
        assert_eq!(pdb["spec"]["selector"], d["spec"]["selector"]);
    }

    #[test]
    fn rollout_strategy_is_passed_through() {
        let yaml = FULL.replace("    replicas: 3\n", "    replicas: 3\n    rolloutStrategy: {type: RollingUpdate, maxSurge: 0, maxUnavailable: \"25%\"}\n");
        let children = desired_children(&celery(&yaml));
        let d = find(&children, ChildKind::Deployment, "demo-worker-default");
        assert_eq!(
            d["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "25%"}})
        );
    }

    #[test]
    fn memory_and_prefetch_guardrails() {
        let pool = |extra: &str| -> WorkerPool {
            serde_saphyr::from_str(&format!("{{name: w, concurrency: 4, {extra}}}")).unwrap()
        };
        let limited = "resources: {limits: {memory: 1Gi}}";
        // Three quarters of 1 GiB over 4 processes, in KiB.
        assert_eq!(max_memory_per_child_kib(&pool(limited)), Some(196_608));
        assert_eq!(
            max_memory_per_child_kib(&pool(&format!("{limited}, maxMemoryPerChildKiB: 1000"))),
            Some(1000)
        );
        assert_eq!(
            max_memory_per_child_kib(&pool(&format!("{limited}, pool: threads"))),
            None
        );
        assert_eq!(
            max_memory_per_child_kib(&pool("pool: prefork")),
            None,
            "no limit"
        );
        let celery = celery(FULL);
        let args = worker_args(&celery, &pool(&format!("{limited}, disablePrefetch: true")));
        let joined = args.join(" ");
        assert!(joined.contains("--max-memory-per-child 196608"), "{joined}");
        assert!(joined.contains("--disable-prefetch"), "{joined}");
        let args = worker_args(&celery, &pool("disablePrefetch: false")).join(" ");
        assert!(
            !args.contains("prefetch") && !args.contains("memory"),
            "{args}"
        );
    }

    #[test]
    fn soft_shutdown_remaps_sigterm_and_sets_the_timeout_on_the_command_line() {
        let with = |extra: &str| {
            let spec = FULL.replacen("    replicas: 3\n", &format!("    replicas: 3\n{extra}"), 1);
            let children = desired_children(&celery(&spec));
            container(&children, "demo-worker-default")
        };
        let c = with("    shutdown: Soft\n    softShutdownOnIdle: true\n");
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let tail = &args[args
            .iter()
            .position(|a| *a == "--")
            .expect("settings after --")..];
        // The grace period of timeLimitSeconds 600 + 30, less 10 s.
        assert_eq!(
            tail,
            [
                "--",
                "worker.soft_shutdown_timeout=620",
                "worker.enable_soft_shutdown_on_idle=True"
            ]
        );
        assert_eq!(
            c["env"][3],
            json!({"name": "REMAP_SIGTERM", "value": "SIGQUIT"})
        );
        let c = with("    shutdown: Soft\n    softShutdownTimeoutSeconds: 30\n");
        assert!(
            c["args"]
                .as_array()
                .unwrap()
                .contains(&json!("worker.soft_shutdown_timeout=30"))
        );
        let warm = with("    shutdown: Warm\n");
        assert!(!warm["args"].as_array().unwrap().contains(&json!("--")));
        assert!(!warm["env"].to_string().contains("REMAP_SIGTERM"));
    }
}
