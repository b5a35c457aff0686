//! The `celery-operator` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use tracing_subscriber::EnvFilter;

use celery_operator::crd::Celery;
use celery_operator::metrics::Metrics;
use celery_operator::{http, reconcile, render};

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
    Run(RunArgs),
    /// Print the CustomResourceDefinition of `Celery` as YAML.
    Crd,
    /// Print the objects the operator would apply for Celery resources in files, without
    /// a cluster.
    Render {
        /// YAML files holding one or more Celery resources (`-` for standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => print_crd(),
        Command::Render { files } => render_files(&files),
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_crd() -> anyhow::Result<()> {
    print!("{}", serde_saphyr::to_string(&Celery::crd())?);
    Ok(())
}

fn render_files(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    for file in files {
        let yaml = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        docs.push(render::render(&yaml).with_context(|| format!("rendering {}", file.display()))?);
    }
    print!("{}", docs.join("---\n"));
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&args.log_level))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes configuration found (in-cluster or kubeconfig)")?;
        let metrics = Arc::new(Metrics::default());
        let ready = Arc::new(AtomicBool::new(false));
        let server = tokio::spawn(http::serve(args.http_addr, metrics.clone(), ready.clone()));
        let ctx = Arc::new(reconcile::Context::new(
            client.clone(),
            metrics,
            args.instance,
        ));
        tokio::select! {
            () = reconcile::run(client, args.namespace, ctx, ready) => Ok(()),
            served = server => Err(anyhow::anyhow!("HTTP server stopped: {:?}", served?)),
        }
    })
}
