//! `celery-operator plugin ...`: check, run and pack a plugin offline, as a plugin author
//! does before shipping it to a cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::bindings::{autoscaler, scaler, shaper};
use super::configmap::{OCI_KEY, PLUGIN_LABEL, WASM_GZ_KEY, WASM_KEY};
use super::{Compiler, Limits, Plugin, PluginError, Role, Runtime, WIT_PACKAGE, settings_text};

/// Largest component `pack` writes into a ConfigMap: Kubernetes stores at most about 1 MiB
/// per object, and binaryData is base64 (4/3 larger) inside it.
pub const MAX_PACKED_BYTES: usize = 760 * 1024;

/// What `plugin check` reports.
#[derive(Debug)]
pub struct CheckReport {
    /// The compiled plugin.
    pub plugin: std::sync::Arc<Plugin>,
    /// How long compiling and checking took.
    pub compile_time: Duration,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plugin;
        writeln!(f, "valid component: yes")?;
        writeln!(f, "wit package:     {WIT_PACKAGE}@{}", p.wit_version)?;
        let worlds: Vec<_> = p.roles.iter().map(|r| r.world()).collect();
        writeln!(f, "worlds:          {}", worlds.join(", "))?;
        if !p.ignored.is_empty() {
            writeln!(
                f,
                "ignored:         {} (versions this operator does not serve)",
                super::runtime::listed(&p.ignored)
            )?;
        }
        writeln!(f, "size:            {} bytes", p.size)?;
        writeln!(f, "digest:          {}", p.digest)?;
        write!(
            f,
            "compile time:    {:.1} ms",
            self.compile_time.as_secs_f64() * 1e3
        )
    }
}

/// Compiles (with `compiler`) and checks a component.
pub fn check(bytes: &[u8], compiler: Compiler) -> Result<CheckReport, PluginError> {
    let runtime = Runtime::new(Limits::default(), compiler);
    let start = Instant::now();
    let plugin = runtime.load(bytes)?;
    Ok(CheckReport {
        plugin,
        compile_time: start.elapsed(),
    })
}

/// Input of a shaper, as a plugin author writes it for `plugin run`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeFile {
    celery: Value,
    objects: Vec<Value>,
    #[serde(default)]
    settings: Option<Value>,
}

/// Input of an autoscaler plugin for `plugin run`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    celery: Value,
    pool: String,
    deployment: String,
    autoscaling: Value,
    queues: Vec<String>,
    #[serde(default)]
    settings: Option<Value>,
}

/// Input of a scaler for `plugin run` (times in milliseconds since the Unix epoch).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScalingFile {
    pool: String,
    now_ms: u64,
    current_replicas: u32,
    min_replicas: u32,
    max_replicas: u32,
    target_per_replica: f64,
    samples: Vec<SampleFile>,
    #[serde(default)]
    history: Vec<RecommendationFile>,
    #[serde(default)]
    settings: Option<Value>,
    /// The workload figures (WIT 0.2.0); each optional.
    #[serde(default)]
    workload: WorkloadFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadFile {
    window_seconds: Option<f64>,
    completion_rate: Option<f64>,
    arrival_rate: Option<f64>,
    service_seconds: Option<f64>,
    busy_fraction: Option<f64>,
    concurrency: Option<u32>,
    running: Option<u32>,
    workers: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SampleFile {
    at_ms: u64,
    queues: Vec<QueueFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct QueueFile {
    name: String,
    ready: u64,
    reserved: u64,
    #[serde(default)]
    oldest_wait_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RecommendationFile {
    at_ms: u64,
    replicas: u32,
}

/// Why `plugin run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The input file does not fit the world.
    #[error("the input does not fit the {world} world: {message}")]
    Input {
        /// The world.
        world: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// The role named by `world` (`shaper-plugin` or `shaper`, ...).
pub fn role_of_world(world: &str) -> Option<Role> {
    Role::ALL
        .into_iter()
        .find(|r| r.world() == world || r.interface() == world)
}

/// One call of a plugin: the output as JSON and how long the call took.
pub fn run(
    plugin_bytes: &[u8],
    role: Role,
    input: &str,
    limits: Limits,
    compiler: Compiler,
) -> Result<(Value, Duration), RunError> {
    let runtime = Runtime::new(limits, compiler);
    let plugin = runtime.load(plugin_bytes)?;
    let bad = |e: serde_json::Error| RunError::Input {
        world: role.world(),
        message: e.to_string(),
    };
    let start;
    let output = match role {
        Role::Shaper => {
            let f: ShapeFile = serde_json::from_str(input).map_err(bad)?;
            let input = shaper::ShapeInput {
                celery: f.celery.to_string(),
                objects: f.objects.iter().map(Value::to_string).collect(),
                settings: settings_text(f.settings.as_ref()),
            };
            start = Instant::now();
            objects_json(runtime.shape(&plugin, &input)?)
        }
        Role::Autoscaler => {
            let f: PoolFile = serde_json::from_str(input).map_err(bad)?;
            let input = autoscaler::PoolInput {
                celery: f.celery.to_string(),
                pool: f.pool,
                deployment: f.deployment,
                autoscaling: f.autoscaling.to_string(),
                queues: f.queues,
                settings: settings_text(f.settings.as_ref()),
            };
            start = Instant::now();
            objects_json(runtime.autoscaler_objects(&plugin, &input)?)
        }
        Role::Scaler => {
            let f: ScalingFile = serde_json::from_str(input).map_err(bad)?;
            let input = scaler::ScalingInput {
                pool: f.pool,
                now_ms: f.now_ms,
                current_replicas: f.current_replicas,
                min_replicas: f.min_replicas,
                max_replicas: f.max_replicas,
                target_per_replica: f.target_per_replica,
                samples: f
                    .samples
                    .into_iter()
                    .map(|s| scaler::Sample {
                        at_ms: s.at_ms,
                        queues: s
                            .queues
                            .into_iter()
                            .map(|q| scaler::QueueDepth {
                                name: q.name,
                                ready: q.ready,
                                reserved: q.reserved,
                                oldest_wait_ms: q.oldest_wait_ms,
                            })
                            .collect(),
                    })
                    .collect(),
                history: f
                    .history
                    .into_iter()
                    .map(|h| scaler::Recommendation {
                        at_ms: h.at_ms,
                        replicas: h.replicas,
                    })
                    .collect(),
                settings: settings_text(f.settings.as_ref()),
                workload: scaler::Workload {
                    window_seconds: f.workload.window_seconds,
                    completion_rate: f.workload.completion_rate,
                    arrival_rate: f.workload.arrival_rate,
                    service_seconds: f.workload.service_seconds,
                    busy_fraction: f.workload.busy_fraction,
                    concurrency: f.workload.concurrency,
                    running: f.workload.running,
                    workers: f.workload.workers,
                },
            };
            start = Instant::now();
            let d = runtime.decide(&plugin, &input)?;
            json!({"replicas": d.replicas, "recommendation": d.recommendation, "reason": d.reason})
        }
    };
    Ok((output, start.elapsed()))
}

/// Objects a plugin returned, parsed where they are JSON (kept as text where not, so the
/// author sees what was wrong).
fn objects_json(objects: Vec<String>) -> Value {
    Value::Array(
        objects
            .into_iter()
            .map(|o| serde_json::from_str(&o).unwrap_or(Value::String(o)))
            .collect(),
    )
}

/// A ConfigMap (YAML) that ships the plugin to a cluster, gzip-compressed when that is
/// smaller. The plugin is checked first (compiled by `compiler`).
pub fn pack(
    bytes: &[u8],
    name: &str,
    namespace: Option<&str>,
    compiler: Compiler,
) -> Result<String, String> {
    let plugin = Runtime::new(Limits::default(), compiler)
        .load(bytes)
        .map_err(|e| e.to_string())?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(bytes).expect("writing to memory");
    let compressed = gz.finish().expect("writing to memory");
    let (key, data) = if compressed.len() < bytes.len() {
        (WASM_GZ_KEY, compressed)
    } else {
        (WASM_KEY, bytes.to_vec())
    };
    if data.len() > MAX_PACKED_BYTES {
        return Err(format!(
            "the plugin is {} bytes ({key}); a ConfigMap holds at most about {MAX_PACKED_BYTES}. \
             Build it smaller (opt-level \"s\", LTO, panic = \"abort\", strip), or ship it \
             from a registry (`celery-operator plugin push`)",
            data.len()
        ));
    }
    let mut cm = plugin_configmap(name, namespace, &plugin);
    cm.binary_data = Some(BTreeMap::from([(key.to_string(), ByteString(data))]));
    Ok(to_yaml(&cm))
}

/// A ConfigMap (YAML) that names `plugin`, pushed to the registry as `reference` (pinned by
/// digest), for the operator to pull.
pub fn pack_reference(
    plugin: &Plugin,
    name: &str,
    namespace: Option<&str>,
    reference: &str,
) -> String {
    let mut cm = plugin_configmap(name, namespace, plugin);
    cm.data = Some(BTreeMap::from([(
        OCI_KEY.to_string(),
        reference.to_string(),
    )]));
    to_yaml(&cm)
}

/// A plugin ConfigMap's metadata: the label naming the plugin, and annotations saying
/// which build it is.
fn plugin_configmap(name: &str, namespace: Option<&str>, plugin: &Plugin) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(format!("celery-plugin-{name}"));
    cm.metadata.namespace = namespace.map(String::from);
    cm.metadata.labels = Some(BTreeMap::from([(
        PLUGIN_LABEL.to_string(),
        name.to_string(),
    )]));
    cm.metadata.annotations = Some(BTreeMap::from([
        (
            "celeryproject.org/plugin-digest".to_string(),
            plugin.digest.clone(),
        ),
        (
            "celeryproject.org/plugin-worlds".to_string(),
            plugin
                .roles
                .iter()
                .map(|r| r.world())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]));
    cm
}

fn to_yaml(cm: &ConfigMap) -> String {
    let mut value = serde_json::to_value(cm).expect("serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    serde_saphyr::to_string(&value).expect("serializes")
}
