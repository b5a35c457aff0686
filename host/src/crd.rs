//! The `Celery` custom resource (`celeryproject.org/v1alpha1`).
//!
//! Doc comments on these types become the CRD's OpenAPI descriptions, which is what
//! `kubectl explain celery.spec...` prints: write them for the person applying the resource.
//! CEL rules (`x-kubernetes-validations`) reject bad specs in the API server; the reconciler
//! evaluates the same rules client-side so `render` and the operator agree with the server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, PodSecurityContext, Probe,
    ResourceRequirements, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the `Celery` resource.
pub const GROUP: &str = "celeryproject.org";

/// Desired state of a Celery application: its worker pools, Flower, beat and how they reach
/// the broker.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "celeryproject.org",
    version = "v1alpha1",
    kind = "Celery",
    plural = "celeries",
    singular = "celery",
    shortname = "cel",
    category = "celery",
    namespaced,
    status = "CeleryStatus",
    derive = "PartialEq",
    cel,
    doc = "A Celery application run on Kubernetes: worker pools, Flower and beat.",
    validation = Rule::new("size(self.metadata.name) <= 50").message("metadata.name must be at most 50 characters so that child names fit Kubernetes limits"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether every component is ready"),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workersReady", description = "Ready worker pods / desired worker pods"),
    printcolumn(name = "Flower", type_ = "string", json_path = ".status.flower.readyReplicas", description = "Ready Flower pods"),
    printcolumn(name = "Beat", type_ = "string", json_path = ".status.beat.readyReplicas", description = "Ready beat pods (0 or 1)"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = "1", description = "Why the resource is (not) ready"),
    printcolumn(name = "Wait", type_ = "number", json_path = ".status.scaling[*].waitSeconds", priority = "1", description = "Seconds a task sent now would wait before a worker takes it (pools the operator scales; when known)"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.celeryVersion) || self.celeryVersion.matches('^(5[.]([6-9]|[1-9][0-9]+)|([6-9]|[1-9][0-9]+)[.])') || self.workers.all(w, !has(w.disablePrefetch) || !w.disablePrefetch)").message("disablePrefetch needs Celery 5.6 or later, and celeryVersion is older"))]
#[x_kube(validation = Rule::new("!has(self.celeryVersion) || self.celeryVersion.matches('^(5[.]([5-9]|[1-9][0-9]+)|([6-9]|[1-9][0-9]+)[.])') || self.workers.all(w, !has(w.shutdown) || w.shutdown != 'Soft')").message("shutdown: Soft needs Celery 5.5 or later, and celeryVersion is older"))]
#[x_kube(validation = Rule::new("!has(self.broker.redis) || !has(self.broker.redis.visibilityTimeoutSeconds) || self.workers.all(w, (has(w.terminationGracePeriodSeconds) ? w.terminationGracePeriodSeconds : (has(w.timeLimitSeconds) ? w.timeLimitSeconds + 30 : 300)) < self.broker.redis.visibilityTimeoutSeconds)").message("broker.redis.visibilityTimeoutSeconds must be longer than every pool's termination grace period: Redis would hand a task still running to another worker, and it would run twice"))]
#[serde(rename_all = "camelCase")]
pub struct CelerySpec {
    /// The Celery application instance, as given to `celery -A` (for example `proj.celery:app`
    /// or `proj`). CEP field: `common.celeryApp`.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_.:]*$')").message("app must be a Python module path such as 'proj.celery:app'"))]
    #[schemars(length(min = 1, max = 253))]
    pub app: String,

    /// Container image that holds the Celery application (and Flower, if Flower is enabled).
    /// CEP field: `common.image`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// When the kubelet pulls the image. CEP field: `common.imagePullPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Secrets holding registry credentials for a private image.
    /// CEP field: `common.imagePullSecrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Celery version the image runs (for example `5.4`). Informational: recorded as the
    /// `app.kubernetes.io/version` label on every child. CEP field: `common.celeryVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')").message("celeryVersion must be usable as a label value, such as '5.4' or '5.4.0rc1'"))]
    #[schemars(length(max = 63))]
    pub celery_version: Option<String>,

    /// How Celery reaches its broker. The URL is read from a Secret and handed to the
    /// containers as the `CELERY_BROKER_URL` environment variable; it never appears in
    /// generated manifests, status, Events or logs.
    pub broker: BrokerSpec,

    /// Optional result backend URL, read from a Secret and handed to the containers as
    /// `CELERY_RESULT_BACKEND`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_backend: Option<SecretKeyRef>,

    /// Environment variables for every Celery container (workers, Flower, beat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Sources (ConfigMaps, Secrets) of environment variables for every Celery container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,

    /// Volumes added to every Celery pod. CEP field: `common.volumes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,

    /// Volume mounts added to every Celery container. CEP field: `common.volumeMounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,

    /// Scheduling and security settings shared by every pod; a worker pool may override the
    /// scheduling ones.
    #[serde(default, skip_serializing_if = "PodOptions::is_empty")]
    pub pod: PodOptions,

    /// Worker pools. Each pool is one Deployment with its own queues, concurrency, pool type,
    /// resources and autoscaling. CEP section: `workerSpec`.
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("worker pool names must be unique"))]
    #[schemars(length(min = 1, max = 32))]
    pub workers: Vec<WorkerPool>,

    /// Flower, the Celery monitoring UI: a Deployment, a Service and optionally an Ingress.
    /// Omit to run no Flower. CEP section: `flowerSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flower: Option<FlowerSpec>,

    /// Celery beat, the periodic task scheduler: always exactly one pod, `Recreate` strategy,
    /// never autoscaled. Omit to run no beat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat: Option<BeatSpec>,

    /// WebAssembly plugins for this resource (the cluster may add its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<PluginsSpec>,
}

/// Image pull policy of the Celery containers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Never pull; the image must be present on the node.
    Never,
    /// Pull only when the image is not on the node.
    IfNotPresent,
}

impl ImagePullPolicy {
    /// The value Kubernetes expects in a container's `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::Never => "Never",
            Self::IfNotPresent => "IfNotPresent",
        }
    }
}

/// A key of a Secret in the Celery resource's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Broker connection settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Secret key holding the broker URL (for example `redis://:password@redis:6379/0` or
    /// `amqp://user:password@rabbitmq:5672/vhost`).
    pub secret_ref: SecretKeyRef,
    /// The broker's kind: `redis` or `rabbitmq`. Queue-length autoscaling needs it (the URL
    /// itself is never read into the resource).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<BrokerType>,
    /// How the app's kombu Redis transport names its keys, when its
    /// `broker_transport_options` change the defaults. The queue-length scaler needs this to
    /// find the queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisTransport>,
    /// Where the queue-length scaler reads a RabbitMQ broker's queue lengths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitmqAccess>,
}

/// kombu Redis transport options (Celery's `broker_transport_options`) that change where
/// tasks are stored. Omitted fields keep kombu's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisTransport {
    /// kombu's `global_keyprefix`: a prefix of every key (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub global_keyprefix: Option<String>,
    /// kombu's `sep`: between a queue's name and its priority step (default `"\x06\x16"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub sep: Option<String>,
    /// kombu's `priority_steps` (default `[0, 3, 6, 9]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub priority_steps: Option<Vec<u32>>,
    /// The app's `visibility_timeout` transport option, in seconds (kombu's default: 3600),
    /// as declared here for validation: a task taken by a worker and not acknowledged within
    /// it is handed to another worker, so it must outlast every pool's grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub visibility_timeout_seconds: Option<i64>,
}

/// How to reach RabbitMQ's management HTTP API.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqAccess {
    /// Base URL of the management API, for example `https://rabbitmq.example.com:15671`.
    /// Default: the broker's host on port 15672 (`http`), or 15671 (`https`) for
    /// `amqps://`. Credentials and virtual host come from the broker URL in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^@]+$')").message("managementUrl must be an http(s) URL without credentials"))]
    #[schemars(length(max = 2048))]
    pub management_url: Option<String>,
}

/// Kind of message broker.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BrokerType {
    /// Redis (or a Redis-compatible server such as Valkey).
    Redis,
    /// RabbitMQ (AMQP).
    Rabbitmq,
}

/// Plugins the resource asks for.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginsSpec {
    /// Shaping plugins run, in order, on the objects built for this resource, after the
    /// cluster-wide ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub shapers: Vec<PluginRef>,
}

/// A plugin, by name, optionally pinned to one build.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginRef {
    /// Plugin name: a built-in (`hpa`, `keda`, `queue-length`, `latency`, `noop`) or the
    /// `celeryproject.org/plugin` label of a plugin ConfigMap in the operator's namespace.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("plugin name must be a DNS label"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Use only the build with this digest (`sha256:<64 hex digits>`, as printed by
    /// `celery-operator plugin check`); the resource is Degraded while it is not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^sha256:[a-f0-9]{64}$')").message("digest must look like sha256:<64 lower-case hex digits>"))]
    #[schemars(length(max = 71))]
    pub digest: Option<String>,
    /// Settings passed to the plugin as a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub settings: Option<serde_json::Value>,
    /// Bounds of this plugin's calls, within the cluster's maxima (`--plugin-max-*`: a
    /// larger value is lowered to the maximum); unset fields keep the cluster's defaults. A
    /// Python plugin needs more time and memory per call than a Rust one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<PluginLimits>,
}

/// Bounds of one plugin's calls.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
pub struct PluginLimits {
    /// Wall-clock deadline of one call, in milliseconds.
    #[serde(rename = "timeoutMs", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: Option<u32>,
    /// Memory one call may use (every linear memory and table together), in MiB.
    #[serde(rename = "memoryMiB", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub memory_mib: Option<u32>,
    /// Output one call may return, in KiB.
    #[serde(rename = "outputKiB", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub output_kib: Option<u32>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Pod settings shared by every Celery pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOptions {
    /// Node labels a pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Service account the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Pod-level security settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Security settings of the Celery containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Extra labels on every pod (they never replace the operator's own labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl PodOptions {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One pool of Celery workers: a Deployment running `celery worker` on some queues.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.softShutdownTimeoutSeconds) && !has(self.softShutdownOnIdle) || has(self.shutdown) && self.shutdown == 'Soft'").message("softShutdownTimeoutSeconds and softShutdownOnIdle apply only with shutdown: Soft"))]
#[x_kube(validation = Rule::new("!has(self.softShutdownTimeoutSeconds) || !has(self.terminationGracePeriodSeconds) || self.softShutdownTimeoutSeconds < self.terminationGracePeriodSeconds").message("softShutdownTimeoutSeconds must be less than terminationGracePeriodSeconds, or tasks are killed before they are requeued"))]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("replicas and autoscaling are mutually exclusive: when autoscaling is set, the autoscaler owns the replica count"))]
#[x_kube(validation = Rule::new("!has(self.terminationGracePeriodSeconds) || !has(self.timeLimitSeconds) || self.terminationGracePeriodSeconds >= self.timeLimitSeconds").message("terminationGracePeriodSeconds must be at least timeLimitSeconds, or running tasks are killed on scale-down"))]
#[x_kube(validation = Rule::new("!has(self.softTimeLimitSeconds) || !has(self.timeLimitSeconds) || self.softTimeLimitSeconds < self.timeLimitSeconds").message("softTimeLimitSeconds must be less than timeLimitSeconds"))]
pub struct WorkerPool {
    /// Pool name, unique within the resource; the Deployment is named
    /// `<celery-name>-worker-<pool-name>`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("pool name must be a DNS label: lower-case letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 40))]
    pub name: String,

    /// Queues this pool consumes (`celery worker -Q`). Defaults to Celery's default queue,
    /// `celery`.
    #[serde(default = "default_queues")]
    #[x_kube(validation = Rule::new("self.all(q, q.matches('^[^,\\\\s]+$'))").message("queue names cannot be empty or contain commas or whitespace"))]
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 200)))]
    pub queues: Vec<String>,

    /// Number of worker pods when the pool is not autoscaled. Defaults to 1.
    /// CEP field: `workerSpec.numOfWorkers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: Option<i32>,

    /// Child processes or threads per worker pod (`celery worker -c`). Celery's default is
    /// the number of CPUs of the node, which is rarely what you want in a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub concurrency: Option<i32>,

    /// Execution pool (`celery worker -P`). Defaults to `prefork`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolType>,

    /// How many messages each process reserves ahead (`--prefetch-multiplier`). `1` is
    /// the fairest setting for long tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub prefetch_multiplier: Option<i32>,

    /// Restart a pool process after this many tasks (`--max-tasks-per-child`), against
    /// memory leaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tasks_per_child: Option<i32>,

    /// Replace a pool process once its resident memory passed this many KiB after a task
    /// (`--max-memory-per-child`; prefork only). Default, for a prefork pool with a memory
    /// limit and a concurrency: three quarters of the limit shared among the processes, so
    /// a leaking process is replaced before the container is OOM-killed with every task in
    /// it.
    #[serde(
        default,
        rename = "maxMemoryPerChildKiB",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1))]
    pub max_memory_per_child_kib: Option<i64>,

    /// Take a task only when a process is free to run it (`--disable-prefetch`, Celery 5.6
    /// or later): no task waits, reserved, behind a long one on a busy worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_prefetch: Option<bool>,

    /// Hard time limit of a task in seconds (`--time-limit`). Also the floor of the
    /// termination grace period, so that scale-down never kills a task that may still finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub time_limit_seconds: Option<i64>,

    /// Soft time limit of a task in seconds (`--soft-time-limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub soft_time_limit_seconds: Option<i64>,

    /// Seconds a pod has to finish its running tasks after SIGTERM before it is killed.
    /// Defaults to `timeLimitSeconds + 30` when a time limit is set, else 300. (Kubernetes'
    /// own default of 30 s loses long tasks.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub termination_grace_period_seconds: Option<i64>,

    /// How a worker stops when its pod goes (scale-down, rollout). `Warm`, the default:
    /// running tasks finish within the grace period. `Soft` (Celery 5.5 or later): running
    /// tasks get `softShutdownTimeoutSeconds`, then go back to the broker (with
    /// `acks_late`) before the grace period ends: for tasks that may outlive any grace
    /// period. The operator sets `REMAP_SIGTERM=SIGQUIT` and the worker's
    /// `soft_shutdown_timeout` on its command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownMode>,

    /// With `shutdown: Soft`: seconds running tasks get before they are requeued. Default:
    /// the grace period less 10 s (at least 1 s), so that requeueing ends before the kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub soft_shutdown_timeout_seconds: Option<i64>,

    /// With `shutdown: Soft`: use the soft shutdown also when no task runs
    /// (`worker_enable_soft_shutdown_on_idle`), so that tasks waiting in the worker for an
    /// ETA or countdown are requeued too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_shutdown_on_idle: Option<bool>,

    /// Extra arguments appended to `celery worker` (any option Celery supports).
    /// CEP field: `workerSpec.args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Extra environment variables for this pool's containers (after the shared ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// CPU and memory requests and limits of a worker container. CEP field:
    /// `workerSpec.resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// How pods are replaced on update. CEP field: `workerSpec.rolloutStrategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_strategy: Option<RolloutStrategy>,

    /// Autoscaling of this pool. When set, the autoscaler owns the replica count and the
    /// operator never writes it. CEP section: `scaleTargetRef` with `kind: worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// A PodDisruptionBudget for this pool, so node drains do not take down too many
    /// workers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<DisruptionBudget>,

    /// How the operator follows this pool's workers through Celery's own event stream on
    /// the broker (worker heartbeats): busy-aware scale-down, stalled workers, and
    /// `status.liveWorkers`. On by default for pools the operator scales itself (it reads
    /// their broker anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<WorkerLifecycle>,

    /// Readiness probe of a worker container. Defaults to `celery inspect ping` on this
    /// worker every 60 s. A failing readiness probe never restarts a worker, so a broker
    /// outage does not cause a crash loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,

    /// Liveness probe of a worker container. None by default: a liveness failure kills the
    /// worker and its running tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,

    /// Node labels for this pool's pods; replaces `pod.nodeSelector` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of this pool's pods; replaces `pod.tolerations` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity of this pool's pods; replaces `pod.affinity` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// How the operator follows a pool's workers on the broker.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerLifecycle {
    /// Follow the pool's workers. Default: true when the operator scales the pool itself
    /// (autoscaler `operator`), false otherwise (the operator may have no way to the broker
    /// of an HPA or KEDA pool). While
    /// followed, each worker pod's `controller.kubernetes.io/pod-deletion-cost` says whether
    /// it runs a task (100), idles (0) or is stalled (-100), so that a scale-down removes
    /// stalled and idle workers before busy ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// A worker is stalled when no heartbeat came for this many seconds, or when it ran and
    /// finished no task for this long while its queues held tasks. Default 60. (In `solo`,
    /// `gevent` and `eventlet` pools a task can hold up the heartbeats: a worker that went
    /// silent while running a task counts as busy.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub stalled_after_seconds: Option<i64>,

    /// Evict the pod of a stalled worker, so that its Deployment replaces it (the eviction
    /// API: PodDisruptionBudgets are respected). Default false: stalled workers are only
    /// reported (condition and Event) and removed first on scale-down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_stalled: Option<bool>,
}

fn default_queues() -> Vec<String> {
    vec!["celery".into()]
}

/// How a worker stops when its pod goes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ShutdownMode {
    /// Running tasks finish (Celery's warm shutdown on SIGTERM).
    Warm,
    /// Running tasks get a time limit, then are requeued (Celery 5.5's soft shutdown).
    Soft,
}

/// Celery's execution pool implementation.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// Child processes (Celery's default); `concurrency` processes per pod.
    Prefork,
    /// Threads in one process.
    Threads,
    /// gevent green threads (the image must have gevent installed).
    Gevent,
    /// eventlet green threads (the image must have eventlet installed).
    Eventlet,
    /// One task at a time in the main process.
    Solo,
}

impl PoolType {
    /// The name `celery worker -P` expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefork => "prefork",
            Self::Threads => "threads",
            Self::Gevent => "gevent",
            Self::Eventlet => "eventlet",
            Self::Solo => "solo",
        }
    }
}

/// How a Deployment replaces its pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'RollingUpdate' || (!has(self.maxSurge) && !has(self.maxUnavailable))").message("maxSurge and maxUnavailable apply only to the RollingUpdate strategy"))]
pub struct RolloutStrategy {
    /// `RollingUpdate` (default: new pods come up before old ones go) or `Recreate` (all old
    /// pods stop first).
    #[serde(rename = "type")]
    pub type_: RolloutType,
    /// RollingUpdate only: pods above the desired count during an update (number or
    /// percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrString>,
    /// RollingUpdate only: pods that may be unavailable during an update (number or
    /// percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// Deployment strategy type.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutType {
    /// Replace pods gradually.
    RollingUpdate,
    /// Stop every old pod before starting new ones.
    Recreate,
}

/// Autoscaling of a worker pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas"))]
pub struct Autoscaling {
    /// Fewest pods. `0` allows scale-to-zero, which only happens when the queues and the
    /// reserved work are empty. CEP field: `scaleTargetRef.minReplicas`.
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,
    /// Most pods. CEP field: `scaleTargetRef.maxReplicas`.
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// What to scale on. CEP field: `scaleTargetRef.metrics`.
    #[schemars(length(min = 1, max = 8))]
    pub metrics: Vec<MetricSpec>,
    /// The autoscaler-objects plugin that implements this pool's scaling: `hpa` (a
    /// HorizontalPodAutoscaler, for cpu and memory), `keda` (a KEDA ScaledObject), `operator`
    /// (no objects: the operator's own queue-length scaler), or a custom plugin. Defaults to
    /// the cluster's choice: its CPU/memory default when every metric is cpu or memory, its
    /// queue default otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<PluginRef>,
    /// The scaling-decision plugin of the operator's own scaler (autoscaler `operator`):
    /// `queue-length` (the cluster default) or a custom plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<PluginRef>,
    /// How often the operator's own scaler samples the broker, in seconds (autoscaler
    /// `operator`). Defaults to the cluster's `--poll-interval-seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: Option<u32>,
    /// How fast the pool may scale, in the shape of a HorizontalPodAutoscaler's
    /// `spec.behavior`: stabilization windows and rate limits (policies) for scaling up and
    /// down. The `hpa` and `keda` autoscalers pass it to the HPA they create; the operator's
    /// own scaler enforces it on every scaler plugin's decision. Unset: the HPA's own
    /// defaults for `hpa` and `keda`; for the operator's scaler, no rate limit and the
    /// scaler plugin's own stabilization (`queue-length`: 300 s down, 0 s up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<ScalingBehavior>,
}

/// How fast a pool may scale up and down (a HorizontalPodAutoscaler's `behavior`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    /// Rules for adding replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    /// Rules for removing replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// Rules for one direction of scaling (a HorizontalPodAutoscaler's `HPAScalingRules`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Seconds of past recommendations considered: scaling down goes no lower than the
    /// highest of them, scaling up no higher than the lowest. The HPA's window with the
    /// `hpa` and `keda` autoscalers; the built-in `queue-length` scaler's too, unless its
    /// settings set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<i32>,
    /// Which policy applies when several do: `Max` (the largest change, the default),
    /// `Min` (the smallest) or `Disabled` (no scaling in this direction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<SelectPolicy>,
    /// Rate limits: at most so many pods, or percent of the replicas, per period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub policies: Vec<ScalingPolicy>,
}

/// Which of several scaling policies applies.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// One rate limit: at most `value` pods (`Pods`) or percent of the replicas (`Percent`)
/// changed per `periodSeconds`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    /// `Pods` or `Percent`.
    #[serde(rename = "type")]
    pub type_: PolicyType,
    /// Pods, or percent of the replicas at the start of the period.
    #[schemars(range(min = 1))]
    pub value: i32,
    /// The period, in seconds (at most 30 minutes).
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: i32,
}

/// Kind of scaling policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PolicyType {
    /// A number of pods.
    Pods,
    /// A percentage of the replicas.
    Percent,
}

/// One autoscaling metric and its target.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.name != 'taskQueueLength' || self.target.type == 'AverageValue'").message("taskQueueLength supports only an AverageValue target (tasks per pod)"))]
pub struct MetricSpec {
    /// The metric: `cpu`, `memory` or `taskQueueLength` (tasks waiting in the pool's queues,
    /// plus tasks reserved by workers). CEP field: `metrics.name`.
    pub name: MetricName,
    /// The value to hold the metric at. CEP field: `metrics.target`.
    pub target: MetricTarget,
}

/// Metric an autoscaled pool follows.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MetricName {
    /// CPU usage of the worker pods.
    Cpu,
    /// Memory usage of the worker pods.
    Memory,
    /// Tasks waiting in the pool's queues plus tasks reserved by its workers.
    TaskQueueLength,
}

/// Target of an autoscaling metric.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'Utilization' ? has(self.averageUtilization) && !has(self.averageValue) : has(self.averageValue) && !has(self.averageUtilization)").message("a Utilization target needs averageUtilization, an AverageValue target needs averageValue"))]
pub struct MetricTarget {
    /// `Utilization` (percent of the pods' requests) or `AverageValue` (value per pod).
    #[serde(rename = "type")]
    pub type_: TargetType,
    /// Percent of the requested resource, averaged over the pods (Utilization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub average_utilization: Option<i32>,
    /// Value per pod, as a Kubernetes quantity (AverageValue): e.g. `500m` CPU, `512Mi`
    /// memory, or `10` tasks per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_value: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

/// Kind of metric target.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum TargetType {
    /// Percent of the pods' resource requests.
    Utilization,
    /// Absolute value per pod.
    AverageValue,
}

/// PodDisruptionBudget settings; set exactly one field.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.minAvailable) != has(self.maxUnavailable)").message("set exactly one of minAvailable and maxUnavailable"))]
pub struct DisruptionBudget {
    /// Pods that must stay up during voluntary disruptions (number or percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be down during voluntary disruptions (number or percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// Flower settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowerSpec {
    /// Set to false to remove Flower while keeping its settings.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Flower pods. Flower keeps its view of the cluster in memory, so more than one pod
    /// shows diverging data; 1 is the sensible value. CEP field: `flowerSpec.replicas`.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// Extra arguments appended to `celery flower`. CEP field: `flowerSpec.args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Port Flower listens on and the Service exposes. CEP field: `flowerSpec.servicePort`.
    #[serde(default = "default_flower_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Type of the Flower Service. CEP field: `flowerSpec.serviceType` (its `Default` is
    /// `ClusterIP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    /// CPU and memory of the Flower container. CEP field: `flowerSpec.resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secret key holding `user:password` (comma-separated for several users) for Flower's
    /// HTTP basic auth, passed as `FLOWER_BASIC_AUTH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth_secret_ref: Option<SecretKeyRef>,
    /// Expose Flower through an Ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<FlowerIngress>,
}

fn default_true() -> bool {
    true
}
fn default_one() -> i32 {
    1
}
fn default_flower_port() -> i32 {
    5555
}

/// Kubernetes Service type for Flower.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only (default).
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects in a Service's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Ingress in front of Flower.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowerIngress {
    /// Host name Flower is served on.
    #[x_kube(validation = Rule::new("self.matches('^(\\\\*\\\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("host must be a DNS name"))]
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// URL path prefix. Defaults to `/`. When it is not `/`, also pass Flower's
    /// `--url_prefix` in `args`.
    #[serde(default = "default_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must start with '/'"))]
    pub path: String,
    /// IngressClass to use; the cluster default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Secret with the TLS certificate for `host`; plain HTTP when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Annotations on the Ingress (for your ingress controller or cert-manager).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_path() -> String {
    "/".into()
}

/// Celery beat settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BeatSpec {
    /// Set to false to remove beat while keeping its settings.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Extra arguments appended to `celery beat` (for example
    /// `--scheduler django_celery_beat.schedulers:DatabaseScheduler`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// CPU and memory of the beat container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Observed state, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CeleryStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Ready worker pods over desired worker pods, across pools (for example `3/4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<String>,
    /// One entry per worker pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<PoolStatus>,
    /// Flower's Deployment, when Flower is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flower: Option<ComponentStatus>,
    /// Beat's Deployment, when beat is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat: Option<ComponentStatus>,
    /// The plugins that shaped this resource's objects or produced its autoscalers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginUse>,
    /// The operator's own queue-length scaler: one entry per pool it scales, written by that
    /// pool's scaler loop (field manager `celery-operator-scaler.<pool>`) when its decision or
    /// condition changes, and at most every 30 seconds to refresh the queue figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pool"]))]
    pub scaling: Vec<PoolScaling>,
    /// What each followed pool's workers say on the broker (see `lifecycle`): one entry per
    /// pool, written by the operator's event follower (field manager
    /// `celery-operator-lifecycle`) when the figures change, and at most every 30 seconds
    /// to refresh the last heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pool"]))]
    pub live_workers: Vec<PoolWorkers>,
}

/// What one pool's workers say on the broker, from their heartbeats.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolWorkers {
    /// Pool name.
    pub pool: String,
    /// Workers heard from.
    pub seen: i32,
    /// Workers running a task (seen running at two heartbeats in a row, until 30 s
    /// without one).
    pub busy: i32,
    /// Workers running nothing.
    pub idle: i32,
    /// Stalled workers (see `lifecycle.stalledAfterSeconds`).
    pub stalled: i32,
    /// Node names of stalled workers (the first 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub stalled_workers: Vec<String>,
    /// When the last heartbeat of any of the pool's workers arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// `WorkersStalled`: True while a worker is stalled (reason `HeartbeatsStopped` or
    /// `IdleWithBacklog`); False with reason `BrokerUnavailable` while the event stream
    /// cannot be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What the operator's queue-length scaler last saw and decided for one pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolScaling {
    /// Pool name.
    pub pool: String,
    /// Tasks waiting in the pool's queues, over every priority level (unset when the broker
    /// could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<i64>,
    /// Tasks delivered to workers and not acknowledged yet: prefetched, or running with
    /// `acks_late` (unset when the broker could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<i64>,
    /// How long a task sent now would wait before a worker takes it, in seconds: the oldest
    /// waiting task's age when the app stamps `published_at` (see `oldestWaitSeconds`), else
    /// the waiting tasks over the completion rate. Unset when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<f64>,
    /// How long the oldest waiting task has waited, in seconds, over the pool's queues:
    /// only when the app stamps a `published_at` header on the tasks it sends (a
    /// `before_task_publish` hook; see the autoscaling guide) and the broker is Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_wait_seconds: Option<f64>,
    /// Tasks the pool's workers finished per second over the last 30 s, from their
    /// heartbeats (needs the worker lifecycle: `lifecycle.enabled`, on by default for pools
    /// the operator scales). Unset when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_rate: Option<f64>,
    /// Tasks arriving per second: tasks started plus the growth of the waiting backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
    /// Mean seconds a task runs: running tasks over the completion rate (Little's law).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_seconds: Option<f64>,
    /// Share of the pool's worker processes running a task, 0 to 1 (needs `concurrency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_fraction: Option<f64>,
    /// Replicas of the pool's Deployment when the decision was made.
    pub current_replicas: i32,
    /// Replicas the scaler wants (after the min/max clamp and stabilization window).
    pub desired_replicas: i32,
    /// The last decision: `Scale`, `Keep` or `Hold`.
    pub last_decision: String,
    /// Why, in the scaling-decision plugin's words (or the reason for holding).
    pub reason: String,
    /// The plugin that decided, as `<name> <sha256 digest>` (unset when none could).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// When the last decision was made.
    pub last_decision_time: Time,
    /// When the scaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// `ScalingActive`: True while the broker is read and decisions are made; False, with
    /// reason `BrokerUnavailable`, `ScalerFailed` or `NoTarget`, while replicas are held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The scaler plugin's recent raw recommendations (each value with the last time it was
    /// made, within the last 15 minutes): a restarted operator or a new leader resumes the
    /// stabilization windows from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub recommendations: Vec<TimedReplicas>,
    /// The replica changes the scaler made in the last 30 minutes, for the rate limits of
    /// `autoscaling.behavior`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub scale_events: Vec<ScaleEvent>,
}

/// A replica count at a time.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct TimedReplicas {
    /// When.
    pub time: Time,
    /// Replicas.
    pub replicas: i32,
}

/// A replica change the scaler made.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct ScaleEvent {
    /// When.
    pub time: Time,
    /// Replicas before.
    pub from: i32,
    /// Replicas after.
    pub to: i32,
}

/// One use of a plugin in the last reconcile.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginUse {
    /// `shaper`, `autoscaler` or `scaler`.
    pub role: String,
    /// What it was used for: `shaping`, or `pool <name>`.
    pub target: String,
    /// Plugin name.
    pub name: String,
    /// `sha256:` digest of the build that ran.
    pub digest: String,
    /// Where it was loaded from: `builtin` or `configmap <namespace>/<name>`.
    pub source: String,
    /// Set when the plugin failed and the failure policy took over: what happened instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// Replica counts of one worker pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Whether an autoscaler owns the pool's replica count.
    pub autoscaled: bool,
    /// The pool's Deployment and its replica counts.
    #[serde(flatten)]
    pub deployment: ComponentStatus,
}

/// Replica counts of one Deployment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Name of the Deployment.
    pub deployment: String,
    /// Desired pods (the Deployment's `spec.replicas`; set by the autoscaler when there
    /// is one).
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
}
