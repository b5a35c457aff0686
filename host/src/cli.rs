//! The `celery-operator` command line: its commands and flags, and what each command does
//! (`run` hands a [`Config`] to [`crate::config::run`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use tracing_subscriber::EnvFilter;

use crate::broker::Probe;
use crate::broker::redis::Layout as RedisLayout;
use crate::config::{self, Config};
use crate::crd::Celery;
use crate::plugin::cli as plugin_cli;
use crate::plugin::oci::Registries;
use crate::plugin::scaffold::Lang;
use crate::plugin::signature::TrustedKeys;
use crate::plugin::{
    Compiler, DiskCache, FailurePolicy, Limits, OPERATOR_AUTOSCALER, PluginConfig, PluginId,
    Plugins, Registry, Runtime, Sandbox, compile, oci, runtime, scaffold, signature,
};
use crate::render;
use oci_client::secrets::RegistryAuth;

/// Runs Celery on Kubernetes from `Celery` custom resources.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or against the current kubeconfig).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinition of `Celery` as YAML.
    Crd,
    /// Print the RBAC rules the operator needs (JSON): in the watched namespaces, and in its
    /// own namespace.
    Rbac,
    /// Print the objects the operator would apply for Celery resources in files, without
    /// a cluster.
    Render {
        /// YAML files holding one or more Celery resources (`-` for standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Print, per queue, what the operator sees on a broker: messages ready (by priority
    /// list) and reserved by workers.
    Queues {
        /// Broker URL (`redis://`, `rediss://`, `amqp://`, `amqps://`); read from
        /// CELERY_BROKER_URL when not given, which keeps the password out of the shell
        /// history.
        #[arg(long, env = "CELERY_BROKER_URL", hide_env_values = true)]
        broker: String,
        /// Queues to read (default: Celery's default queue, `celery`).
        #[arg(long = "queue", short = 'q')]
        queues: Vec<String>,
        /// kombu's `global_keyprefix` transport option.
        #[arg(long, default_value = "")]
        prefix: String,
        /// kombu's priority separator (`sep`).
        #[arg(long, default_value = "\x06\x16")]
        separator: String,
        /// kombu's `priority_steps`.
        #[arg(long, value_delimiter = ',', default_value = "0,3,6,9")]
        priority_steps: Vec<u32>,
        /// RabbitMQ: base URL of the management API (default: the broker's host, port 15672,
        /// or 15671 for amqps://).
        #[arg(long)]
        management_url: Option<String>,
    },
    /// Check, run and pack WebAssembly plugins offline.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run the operator scaling real Celery workers on this machine, with no cluster: an
    /// in-memory API server, redis-server, the operator, and pods run as local processes;
    /// sends a scenario's tasks, shows the pool live, and writes a report.
    Sandbox(SandboxArgs),
}

/// The sandbox's scenario and where things are.
#[derive(clap::Args)]
struct SandboxArgs {
    /// The shape of the load (ignored with --trace).
    #[arg(long, value_enum, default_value_t = crate::sandbox::load::Profile::Burst)]
    profile: crate::sandbox::load::Profile,
    /// A CSV trace of the load instead: a header, then `second,tasks,task_seconds` lines.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    duration: u32,
    /// Tasks per second, on average over the duration.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds each task works.
    #[arg(long, default_value_t = 10.0)]
    task_seconds: f64,
    /// The Celery resource to run.
    #[arg(long, default_value = "examples/sandbox/celery.yaml")]
    resource: PathBuf,
    /// The Celery app's directory (with `send.py`): the pods' working directory.
    #[arg(long, default_value = "examples/sandbox")]
    app_dir: PathBuf,
    /// The Python virtualenv with Celery (default: the one scripts/setup.sh makes).
    #[arg(long, env = "SANDBOX_VENV")]
    venv: Option<PathBuf>,
    /// Where the report and the logs go.
    #[arg(long, default_value = "sandbox-report")]
    out: PathBuf,
    /// Compare with another autoscaler on the same load: `keda` simulates KEDA + HPA
    /// (defaults) and plots it beside the run; `latency` runs, side by side, a copy of the
    /// first pool scaled by the built-in latency scaler (on its own queue, with the same
    /// tasks), and reports the tasks' waits and the worker-seconds of both.
    #[arg(long, value_parser = ["keda", "latency"])]
    compare: Option<String>,
    /// The latency scaler's target wait (`targetWaitSeconds`) with `--compare latency`.
    #[arg(long, default_value_t = 10.0)]
    target_wait_seconds: f64,
    /// The longest to wait, after the load, for every task to complete and the pool to
    /// scale back down, in seconds.
    #[arg(long, default_value_t = 600)]
    settle_limit: u64,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Is the file a plugin this operator can run? Prints its worlds, WIT version, size and
    /// digest.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Calls the plugin once on an input file and prints its output (JSON) and how long the
    /// call took.
    Run {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The world to call: `shaper-plugin`, `autoscaler-plugin` or `scaler-plugin`.
        #[arg(long)]
        world: String,
        /// The input, as JSON (see wit/README.md for each world's shape).
        #[arg(long)]
        input: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Prints a ConfigMap (YAML) that ships the plugin, ready for `kubectl apply -f -`.
    Pack {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Plugin name: what Celery resources and the operator's flags refer to.
        #[arg(long)]
        name: String,
        /// Namespace of the ConfigMap: the operator's own.
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Scaffolds a plugin project that builds, with a test: in Rust (the SDK) or Python
    /// (componentize-py).
    New {
        /// Plugin name: the project's directory and package.
        name: String,
        /// The world: `scaler`, `shaper` or `autoscaler`.
        #[arg(long)]
        world: String,
        /// The language.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
        /// Where to write it (default: ./NAME). Must not exist, or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rust: depend on this local SDK (`plugins/sdk` of a checkout) instead of the
        /// project's git repository.
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
    /// Replays a recorded trace of queue samples (CSV) through a scaler plugin and the
    /// built-in queue-length, each in the operator's own scaler loop; prints replicas over
    /// time, the reaction and the replica-seconds of each, and plots them.
    Simulate(SimulateArgs),
    /// Checks the plugin, pushes it to a registry as a Wasm OCI artifact, and prints a
    /// ConfigMap (YAML) that names it by digest, ready for `kubectl apply -f -`.
    Push {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Where to push it: `oci://registry/repository:tag`.
        reference: String,
        /// Plugin name: what Celery resources and the operator's flags refer to.
        #[arg(long)]
        name: String,
        /// Namespace of the ConfigMap: the operator's own.
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Signs a plugin in a registry with a P-256 key (PKCS#8 PEM), storing the signature
    /// where `cosign sign --key` does; prints the digest signed.
    Sign {
        /// The plugin: `oci://registry/repository:tag[@sha256:...]`.
        reference: String,
        /// The private key.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Compiles a component read from standard input and writes wasmtime's serialized form
    /// to standard output: the bounded child process the operator and the CLI compile
    /// untrusted plugins in. Not for people.
    #[command(hide = true)]
    CompileSandboxed,
}

/// How the CLI reaches a registry.
#[derive(clap::Args)]
struct RegistryArgs {
    /// Registries (`host:port`) reached over plain HTTP instead of HTTPS.
    #[arg(long = "insecure-registry", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// User name at the registry; the password is read from `REGISTRY_PASSWORD`.
    #[arg(long, env = "REGISTRY_USERNAME")]
    username: Option<String>,
}

impl RegistryArgs {
    fn registries(&self) -> Registries {
        Registries {
            insecure: self.insecure_registries.clone(),
            trusted_keys: TrustedKeys::default(),
        }
    }

    fn auth(&self) -> RegistryAuth {
        match &self.username {
            Some(user) => RegistryAuth::Basic(
                user.clone(),
                std::env::var("REGISTRY_PASSWORD").unwrap_or_default(),
            ),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// Bounds of every plugin call.
#[derive(clap::Args)]
struct LimitArgs {
    /// Wall-clock deadline of one call, in milliseconds.
    #[arg(long, env = "PLUGIN_TIMEOUT_MS", default_value_t = 100)]
    plugin_timeout_ms: u64,
    /// Memory a plugin may use, in MiB.
    #[arg(long, env = "PLUGIN_MEMORY_MIB", default_value_t = 64)]
    plugin_memory_mib: usize,
    /// Output a call may return, in KiB.
    #[arg(long, env = "PLUGIN_OUTPUT_KIB", default_value_t = 4096)]
    plugin_output_kib: usize,
    /// The most a plugin reference (`limits.timeoutMs`) may ask for, in milliseconds.
    #[arg(long, env = "PLUGIN_MAX_TIMEOUT_MS", default_value_t = 1000)]
    plugin_max_timeout_ms: u64,
    /// The most a plugin reference (`limits.memoryMiB`) may ask for, in MiB.
    #[arg(long, env = "PLUGIN_MAX_MEMORY_MIB", default_value_t = 256)]
    plugin_max_memory_mib: usize,
    /// The most a plugin reference (`limits.outputKiB`) may ask for, in KiB.
    #[arg(long, env = "PLUGIN_MAX_OUTPUT_KIB", default_value_t = 16384)]
    plugin_max_output_kib: usize,
    /// Wall-clock time compiling a plugin may take, in seconds (it runs in a child process,
    /// killed at this deadline).
    #[arg(long, env = "PLUGIN_COMPILE_TIMEOUT_SECONDS", default_value_t = Sandbox::DEFAULT_TIMEOUT.as_secs())]
    plugin_compile_timeout_seconds: u64,
    /// Memory compiling a plugin may use, in MiB.
    #[arg(long, env = "PLUGIN_COMPILE_MEMORY_MIB", default_value_t = Sandbox::DEFAULT_MEMORY_BYTES >> 20)]
    plugin_compile_memory_mib: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            deadline: Duration::from_millis(self.plugin_timeout_ms),
            memory_bytes: self.plugin_memory_mib << 20,
            output_bytes: self.plugin_output_kib << 10,
        }
    }

    /// What plugin references may ask for.
    fn maxima(&self) -> Limits {
        Limits {
            deadline: Duration::from_millis(self.plugin_max_timeout_ms),
            memory_bytes: self.plugin_max_memory_mib << 20,
            output_bytes: self.plugin_max_output_kib << 10,
        }
    }

    /// Untrusted plugins are compiled by a bounded child process of this binary.
    fn compiler(&self) -> Compiler {
        Compiler::Sandboxed(Sandbox::this_binary(
            Duration::from_secs(self.plugin_compile_timeout_seconds.max(1)),
            self.plugin_compile_memory_mib << 20,
        ))
    }
}

#[derive(Parser)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `celery_operator=debug,kube=info` (RUST_LOG wins if set).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Name of this operator instance in Events (the chart sets the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Namespace whose plugin ConfigMaps (label `celeryproject.org/plugin`) are loaded:
    /// the operator's own. Without it only the built-in plugins exist.
    #[arg(long, env = "PLUGIN_NAMESPACE")]
    plugin_namespace: Option<String>,
    /// Shapers run on every Celery resource, in order, before the resource's own.
    #[arg(long, env = "SHAPERS", value_delimiter = ',')]
    shapers: Vec<String>,
    /// Autoscaler of pools that scale on cpu or memory only.
    #[arg(long, env = "DEFAULT_AUTOSCALER", default_value = "hpa")]
    default_autoscaler: String,
    /// Autoscaler of pools that scale on taskQueueLength: `operator` (the operator's own
    /// queue-length scaler), `keda`, or a plugin.
    #[arg(long, env = "DEFAULT_QUEUE_AUTOSCALER", default_value = OPERATOR_AUTOSCALER)]
    default_queue_autoscaler: String,
    /// Scaling-decision plugin of the operator's own scaler.
    #[arg(long, env = "DEFAULT_SCALER", default_value = "queue-length")]
    default_scaler: String,
    /// What a failing shaper does.
    #[arg(long, env = "SHAPER_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Fail)]
    shaper_failure_policy: FailurePolicy,
    /// What a failing autoscaler plugin does.
    #[arg(long, env = "AUTOSCALER_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::KeepLastGood)]
    autoscaler_failure_policy: FailurePolicy,
    /// What a failing scaling-decision plugin does.
    #[arg(long, env = "SCALER_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::KeepLastGood)]
    scaler_failure_policy: FailurePolicy,
    #[command(flatten)]
    limits: LimitArgs,
    /// How often the operator's own scaler samples a pool's broker, unless the pool sets
    /// `autoscaling.pollIntervalSeconds`.
    #[arg(long, env = "POLL_INTERVAL_SECONDS", default_value_t = 5)]
    poll_interval_seconds: u64,
    /// How often every resource is checked for drift without any event, in seconds.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = crate::reconcile::DEFAULT_RESYNC.as_secs())]
    resync_seconds: u64,
    /// Reconcile only while holding a Lease, so several replicas can run (one acts).
    #[arg(long, env = "LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the plugin namespace).
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Where compiled plugins are kept (by digest and engine configuration), so a
    /// restarted operator does not compile them again.
    #[arg(long, env = "PLUGIN_CACHE_DIR")]
    plugin_cache_dir: Option<PathBuf>,
    /// The most the compiled-plugin cache keeps, in MiB (the least recently used files go
    /// first). Keep it below the size limit of the cache's volume.
    #[arg(long, env = "PLUGIN_CACHE_MAX_MIB", default_value_t = 192)]
    plugin_cache_max_mib: u64,
    /// PEM public keys (P-256, as `cosign public-key` prints them), or directories of them.
    /// When any is given, plugins must come from a registry with a cosign signature by one
    /// of them.
    #[arg(
        long = "trusted-key",
        env = "PLUGIN_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Vec<PathBuf>,
    /// Registries (`host:port`) reached over plain HTTP instead of HTTPS: for tests and
    /// local development only.
    #[arg(
        long = "insecure-registry",
        env = "INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Parses the command line and runs the command; the process's exit code.
pub fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => print_crd(),
        Command::Rbac => {
            let rules = serde_json::json!({
                "watchedNamespaces": crate::rbac::watched_namespaces(),
                "operatorNamespace": crate::rbac::operator_namespace(),
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&rules).expect("serializes")
            );
            Ok(())
        }
        Command::Render { files } => render_files(&files),
        Command::Run(args) => run(*args),
        Command::Plugin(command) => plugin(command),
        Command::Sandbox(args) => sandbox(args),
        Command::Queues {
            broker,
            queues,
            prefix,
            separator,
            priority_steps,
            management_url,
        } => {
            let layout = RedisLayout {
                prefix,
                separator: separator.replace("\\x06", "\x06").replace("\\x16", "\x16"),
                priority_steps,
            };
            print_queues(&broker, queues, layout, management_url.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn sandbox(args: SandboxArgs) -> anyhow::Result<()> {
    use crate::sandbox::{self, load::Trace};
    let (trace, scenario) = match &args.trace {
        Some(path) => {
            let csv = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let trace: Trace = csv
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (trace, format!("trace {}", path.display()))
        }
        None => {
            anyhow::ensure!(
                args.rate.is_finite() && args.rate >= 0.0 && args.rate <= 10_000.0,
                "--rate must be between 0 and 10000 tasks per second"
            );
            anyhow::ensure!(
                args.task_seconds.is_finite() && (0.0..=3600.0).contains(&args.task_seconds),
                "--task-seconds must be between 0 and 3600"
            );
            let trace = args
                .profile
                .trace(args.duration, args.rate, args.task_seconds);
            (trace, args.profile.to_string())
        }
    };
    let venv = match args.venv {
        Some(v) => v,
        None => std::env::var_os("CELERY_OPERATOR_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/celery-operator"))
            })
            .context("no --venv and no HOME")?
            .join("venv"),
    };
    // The terminal shows the live view; the sandbox's own log (its kubelet's) goes to a file.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let log = std::fs::File::create(args.out.join("sandbox.log"))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .init();
    let options = sandbox::Options {
        resource: args.resource,
        app_dir: std::fs::canonicalize(&args.app_dir)
            .with_context(|| format!("app directory {}", args.app_dir.display()))?,
        venv,
        operator: std::env::current_exe().context("finding this binary")?,
        trace,
        scenario,
        out: args.out,
        compare_keda: args.compare.as_deref() == Some("keda"),
        compare_latency: (args.compare.as_deref() == Some("latency"))
            .then_some(args.target_wait_seconds),
        settle_limit: Duration::from_secs(args.settle_limit),
    };
    let outcome = tokio::runtime::Runtime::new()?.block_on(sandbox::run(options))?;
    let a = outcome.accounting;
    println!(
        "sandbox: {} tasks sent, {} completed, {} lost, {} run more than once; report: {}",
        a.sent,
        a.completed,
        a.lost,
        a.run_more_than_once,
        outcome.report.display()
    );
    anyhow::ensure!(a.lost == 0, "{} tasks were lost", a.lost);
    Ok(())
}

fn print_crd() -> anyhow::Result<()> {
    print!("{}", serde_saphyr::to_string(&Celery::crd())?);
    Ok(())
}

fn render_files(files: &[PathBuf]) -> anyhow::Result<()> {
    // Offline, a slow machine must not fail a render: a generous deadline.
    let limits = Limits {
        deadline: Duration::from_secs(2),
        ..Limits::default()
    };
    // Only the built-ins exist here: compiled in process.
    let registry = Registry::with_builtins(Arc::new(Runtime::new(limits, Compiler::InProcess)))?;
    let plugins = Plugins::new(Arc::new(registry), PluginConfig::default());
    let mut docs = Vec::new();
    for file in files {
        let yaml = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        docs.push(
            render::render(&yaml, &plugins)
                .with_context(|| format!("rendering {}", file.display()))?,
        );
    }
    print!("{}", docs.join("---\n"));
    Ok(())
}

fn print_queues(
    broker: &str,
    queues: Vec<String>,
    layout: RedisLayout,
    management_url: Option<&str>,
) -> anyhow::Result<()> {
    let queues = if queues.is_empty() {
        vec!["celery".to_string()]
    } else {
        queues
    };
    let samples = tokio::runtime::Runtime::new()?.block_on(async {
        Probe::connect(broker, None, layout, management_url)
            .await?
            .sample(&queues)
            .await
    })?;
    println!(
        "{:<24} {:>10} {:>10}  BY PRIORITY",
        "QUEUE", "READY", "RESERVED"
    );
    for s in samples {
        let by: Vec<String> = s
            .by_priority
            .iter()
            .map(|(p, n)| format!("{p}:{n}"))
            .collect();
        println!(
            "{:<24} {:>10} {:>10}  {}",
            s.name,
            s.ready,
            s.reserved,
            by.join(" ")
        );
    }
    Ok(())
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

fn plugin(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Check { file, limits } => {
            let report = plugin_cli::check(&read(&file)?, limits.compiler())
                .with_context(|| format!("{} is not a usable plugin", file.display()))?;
            println!("file:            {}\n{report}", file.display());
        }
        PluginCommand::Run {
            file,
            world,
            input,
            limits,
        } => {
            let role = plugin_cli::role_of_world(&world).with_context(|| {
                format!(
                    "unknown world {world:?}: use shaper-plugin, autoscaler-plugin or scaler-plugin"
                )
            })?;
            let input = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let (output, took) = plugin_cli::run(
                &read(&file)?,
                role,
                &input,
                limits.limits(),
                limits.compiler(),
            )?;
            println!("{}", serde_json::to_string_pretty(&output)?);
            eprintln!("call took {:.1} µs", took.as_secs_f64() * 1e6);
        }
        PluginCommand::Pack {
            file,
            name,
            namespace,
            limits,
        } => {
            let yaml = plugin_cli::pack(
                &read(&file)?,
                &name,
                namespace.as_deref(),
                limits.compiler(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            print!("{yaml}");
        }
        PluginCommand::New {
            name,
            world,
            lang,
            dir,
            sdk_path,
        } => {
            let role = plugin_cli::role_of_world(&world).with_context(|| {
                format!("unknown world {world:?}: use scaler, shaper or autoscaler")
            })?;
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let written = scaffold::scaffold(&dir, &name, role, lang, sdk_path.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?;
            for file in written {
                println!("{}", file.display());
            }
        }
        PluginCommand::Simulate(args) => simulate_plugin(args)?,
        PluginCommand::Push {
            file,
            reference,
            name,
            namespace,
            registry,
            limits,
        } => {
            let bytes = read(&file)?;
            let plugin = Runtime::new(limits.limits(), limits.compiler())
                .load(&bytes)
                .with_context(|| format!("{} is not a usable plugin", file.display()))?;
            let target = oci::parse(&reference).map_err(|e| anyhow::anyhow!(e))?;
            let digest = tokio::runtime::Runtime::new()?
                .block_on(registry.registries().push(&target, bytes, &registry.auth()))
                .map_err(|e| anyhow::anyhow!(e))?;
            let pinned = format!("{reference}@{digest}");
            eprintln!("pushed {pinned}");
            print!(
                "{}",
                plugin_cli::pack_reference(&plugin, &name, namespace.as_deref(), &pinned)
            );
        }
        PluginCommand::Sign {
            reference,
            key,
            registry,
        } => {
            let key = signature::signing_key(&key).map_err(|e| anyhow::anyhow!(e))?;
            let target = oci::parse(&reference).map_err(|e| anyhow::anyhow!(e))?;
            let digest = tokio::runtime::Runtime::new()?
                .block_on(registry.registries().sign(&target, &key, &registry.auth()))
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("signed {digest}");
        }
        PluginCommand::CompileSandboxed => {
            compile::serve(&runtime::compile_engine()).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(())
}

/// What `plugin simulate` replays, and through what.
#[derive(clap::Args)]
struct SimulateArgs {
    /// The scaler component (`.wasm`), or the name of a built-in scaler (`latency`).
    file: PathBuf,
    /// A recorded trace to replay open loop: CSV with `second`, `ready` and optionally
    /// `reserved` and `queue` columns (or the sandbox's `samples.csv`).
    #[arg(long, required_unless_present = "load", conflicts_with = "load")]
    trace: Option<PathBuf>,
    /// A load to serve closed loop instead: CSV `second,tasks,task_seconds` (the sandbox's
    /// `--trace` format); reports each scaler's task waits (p50, p95) and replica-seconds.
    #[arg(long)]
    load: Option<PathBuf>,
    /// The plugin's settings, as JSON.
    #[arg(long, default_value = "{}")]
    settings: String,
    /// The pool's taskQueueLength target (tasks per replica).
    #[arg(long, default_value_t = 5.0)]
    target: f64,
    /// The pool's minReplicas.
    #[arg(long, default_value_t = 1)]
    min: u32,
    /// The pool's maxReplicas.
    #[arg(long, default_value_t = 10)]
    max: u32,
    /// Replicas at the start of the trace (default: min).
    #[arg(long)]
    start: Option<u32>,
    /// With --load: worker processes per replica.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// With --load: seconds from asking for a replica to its worker taking tasks.
    #[arg(long, default_value_t = 10.0)]
    start_seconds: f64,
    /// With --load: seconds between two decisions (the pool's pollIntervalSeconds).
    #[arg(long, default_value_t = 5.0)]
    poll_seconds: f64,
    /// Write the plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

fn simulate_plugin(args: SimulateArgs) -> anyhow::Result<()> {
    use crate::simulate;
    let read_text = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let settings: serde_json::Value =
        serde_json::from_str(&args.settings).context("--settings is not JSON")?;
    anyhow::ensure!(args.target > 0.0, "--target must be positive");
    anyhow::ensure!(args.min <= args.max, "--min must not be above --max");
    let autoscaling: crate::crd::Autoscaling = serde_json::from_value(serde_json::json!({
        "minReplicas": args.min,
        "maxReplicas": args.max,
        "metrics": [{"name": "taskQueueLength",
                     "target": {"type": "AverageValue", "averageValue": args.target.to_string()}}],
        "scaler": {"name": "plugin", "settings": settings},
    }))?;
    let runtime = Arc::new(Runtime::new(args.limits.limits(), args.limits.compiler()));
    let registry = Arc::new(Registry::with_builtins(runtime)?);
    // A built-in by name, or a component file.
    let builtin = args
        .file
        .to_str()
        .filter(|n| !args.file.exists() && registry.builtin(n).is_some());
    let name = match builtin {
        Some(name) => name.to_string(),
        None => {
            let name = args
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty() && s != "queue-length")
                .unwrap_or_else(|| "plugin".into());
            registry
                .install(
                    &name,
                    &read(&args.file)?,
                    crate::plugin::registry::Source::ConfigMap(args.file.display().to_string()),
                )
                .with_context(|| format!("{} is not a usable plugin", args.file.display()))?;
            name
        }
    };
    let start = args.start.unwrap_or(args.min);
    if let Some(path) = &args.load {
        let load: crate::sandbox::load::Trace = read_text(path)?
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
        anyhow::ensure!(
            args.poll_seconds >= 0.1 && args.start_seconds >= 0.0,
            "--poll-seconds must be at least 0.1 and --start-seconds not negative"
        );
        let model = simulate::Model {
            concurrency: args.concurrency,
            start_seconds: args.start_seconds,
            poll_seconds: args.poll_seconds,
        };
        let runs: Vec<_> = [name.as_str(), "queue-length"]
            .into_iter()
            .map(|n| simulate::serve(registry.clone(), n, &autoscaling, &load, &model, start))
            .collect();
        print!("{}", simulate::served_report(&load, &model, &runs));
        if let Some(plot) = args.plot {
            let svg = simulate::plot_served(&load, &runs).map_err(|e| anyhow::anyhow!(e))?;
            std::fs::write(&plot, svg).with_context(|| format!("writing {}", plot.display()))?;
            eprintln!("plot: {}", plot.display());
        }
        return Ok(());
    }
    let path = args
        .trace
        .as_ref()
        .expect("clap requires --trace or --load");
    let trace = simulate::parse(&read_text(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let runs: Vec<_> = [name.as_str(), "queue-length"]
        .into_iter()
        .map(|n| simulate::replay(registry.clone(), n, &autoscaling, &trace, start))
        .collect();
    print!("{}", simulate::report(&trace, &runs, args.target));
    if let Some(path) = args.plot {
        let svg = simulate::plot(&trace, &runs).map_err(|e| anyhow::anyhow!(e))?;
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

impl RunArgs {
    /// The operator's configuration from the flags.
    fn config(self) -> anyhow::Result<Config> {
        let leader_election_namespace = match self.leader_elect {
            false => None,
            true => Some(
                self.leader_election_namespace
                    .or_else(|| self.plugin_namespace.clone())
                    .context(
                        "--leader-elect needs --leader-election-namespace or --plugin-namespace",
                    )?,
            ),
        };
        Ok(Config {
            namespace: self.namespace,
            http_addr: self.http_addr,
            instance: self.instance,
            plugin_namespace: self.plugin_namespace,
            plugins: PluginConfig {
                cluster_shapers: self
                    .shapers
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(PluginId::named)
                    .collect(),
                default_autoscaler: self.default_autoscaler,
                default_queue_autoscaler: self.default_queue_autoscaler,
                default_scaler: self.default_scaler,
                shaper_failure: self.shaper_failure_policy,
                autoscaler_failure: self.autoscaler_failure_policy,
                scaler_failure: self.scaler_failure_policy,
                registries: Registries {
                    insecure: self.insecure_registries,
                    trusted_keys: TrustedKeys::from_files(&self.trusted_keys)
                        .map_err(|e| anyhow::anyhow!(e))?,
                },
            },
            limits: self.limits.limits(),
            maxima: self.limits.maxima(),
            compiler: match self.limits.compiler() {
                Compiler::Sandboxed(sandbox) => Compiler::Sandboxed(Sandbox {
                    cache: self.plugin_cache_dir.map(|dir| DiskCache {
                        dir,
                        max_bytes: self.plugin_cache_max_mib << 20,
                    }),
                    ..sandbox
                }),
                other => other,
            },
            poll_interval: Duration::from_secs(self.poll_interval_seconds.max(1)),
            leader_election_namespace,
            resync: Duration::from_secs(self.resync_seconds.max(1)),
        })
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&args.log_level))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let config = args.config()?;
    tokio::runtime::Builder::new_multi_thread()
        // Blocking threads run plugin calls (each bounded by its deadline) and plugin
        // loading; a few are enough, and each thread costs memory.
        .max_blocking_threads(4)
        .enable_all()
        .build()?
        .block_on(config::run(config))
}

/// glibc gives every thread that allocates its own arena (up to 8 per core), and freed
/// memory in one is not reused by another: the operator's RSS would grow with the number of
/// threads that ever ran a reconcile or a plugin call. Two arenas keep it flat.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called first thing in `main`, before
    // any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
