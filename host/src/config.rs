//! What `celery-operator run` needs, and [`run`]: the operator's whole life, from connecting
//! to the cluster to the controller stopping on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::Api;

use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::plugin::{Compiler, Limits, PluginConfig, Plugins, Registry, Runtime};
use crate::{http, reconcile};

/// The operator's configuration (the flags of `celery-operator run`).
pub struct Config {
    /// Watch only this namespace (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    pub http_addr: SocketAddr,
    /// Name of this operator instance in Events (the pod name).
    pub instance: Option<String>,
    /// Namespace whose plugin ConfigMaps are loaded (`None`: built-ins only).
    pub plugin_namespace: Option<String>,
    /// The cluster's plugin choices.
    pub plugins: PluginConfig,
    /// Bounds of every plugin call.
    pub limits: Limits,
    /// The most a plugin reference may ask for.
    pub maxima: Limits,
    /// How untrusted plugins are compiled.
    pub compiler: Compiler,
    /// How often the operator's scaler samples a pool's broker by default.
    pub poll_interval: Duration,
    /// Namespace of the leader-election Lease, when several replicas elect a leader.
    pub leader_election_namespace: Option<String>,
    /// How often every resource is reconciled without any event.
    pub resync: Duration,
}

/// Runs the operator until SIGTERM or SIGINT (or until it loses the leader-election Lease).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration found (in-cluster or kubeconfig)")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(http::serve(
        config.http_addr,
        metrics.clone(),
        ready.clone(),
    ));
    let runtime = Arc::new(
        Runtime::new(config.limits, config.compiler)
            .with_maxima(config.maxima)
            .with_crash_backoff(),
    );
    let registry = Arc::new(Registry::with_builtins(runtime)?);
    let plugins = Arc::new(Plugins::new(registry, config.plugins));
    reconcile::wait_for_crd(&client).await;
    ready.store(true, Ordering::Relaxed);
    let elector = match config.leader_election_namespace {
        None => None,
        Some(ns) => {
            let me = config
                .instance
                .clone()
                .unwrap_or_else(|| format!("celery-operator-{}", std::process::id()));
            let elector = Elector::new(Api::namespaced(client.clone(), &ns), "celery-operator", me);
            elector.acquire().await;
            Some(elector)
        }
    };
    let mut ctx = reconcile::Context::new(
        client.clone(),
        metrics,
        plugins,
        config.instance,
        config.poll_interval,
    );
    ctx.resync = config.resync;
    let ctx = Arc::new(ctx);
    let lost = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = reconcile::run(client, config.namespace, config.plugin_namespace, ctx) => {
            // Stopped by SIGTERM or SIGINT: hand over at once.
            if let Some(e) = &elector
                && let Err(err) = e.release().await
            {
                tracing::warn!(error = %err, "could not release the Lease");
            }
            Ok(())
        }
        () = lost => Err(anyhow::anyhow!("lost the leader-election Lease; exiting so that another replica takes over")),
        served = server => Err(anyhow::anyhow!("HTTP server stopped: {:?}", served?)),
    }
}
