//! The clusters the operator's integration tests run against, behind one interface:
//!
//! - [`Cluster::in_memory`]: the in-repo test API server (`apiserver/`): fast, with
//!   fault injection, no authentication (the operator's requests are told from the test's
//!   own by the token in its kubeconfig);
//! - [`Cluster::real`]: the real control plane of the test tier (`tests/control-plane`: etcd,
//!   kube-apiserver with RBAC and an audit log, kube-controller-manager), one per test
//!   process, each test in namespaces of its own. The operator authenticates as the Helm
//!   chart's ServiceAccount, bound to the roles the chart renders, so every permission it
//!   uses is granted by the real authorizer; what it sent is read from the audit log.
//!
//! The test plays the kubelet on both: [`Cluster::make_ready`]. What the operator sent is
//! observed on both ([`Cluster::sent_since`]), once it settled ([`Cluster::settle`]), and
//! checked against the chart's RBAC rules ([`Cluster::assert_rbac`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::{ApiResource, Scope};
use kube::{Client, Config, ResourceExt};
use memory_apiserver::ApiServer;
use serde_json::{Value, json};
use test_control_plane::{AuditEvent, ControlPlane};

use super::{free_port, tempdir};

/// The operator process; killed when dropped. Its log is kept in the test's directory and
/// printed when a wait times out.
pub struct Operator {
    pub process: Child,
    log: PathBuf,
    http_port: u16,
}

impl Operator {
    /// The sum of a metric's samples whose line starts with `prefix` (name and labels), from
    /// the operator's `/metrics`; 0 while it does not answer.
    pub fn metric(&self, prefix: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return 0.0;
        };
        let mut text = String::new();
        if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_err()
            || s.read_to_string(&mut text).is_err()
        {
            return 0.0;
        }
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Reconciles that succeeded so far.
    pub fn reconciled(&self) -> f64 {
        self.metric("celery_operator_reconciles_total{result=\"success\"}")
    }

    /// Reconciles finished so far, whatever their result.
    pub fn reconciles(&self) -> f64 {
        self.metric("celery_operator_reconciles_total{")
    }

    /// Sends SIGTERM, as Kubernetes does to a pod being deleted, and waits for the exit
    /// (asynchronously: the in-memory API server runs on this test's runtime).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.process.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics, with the log, when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.process.try_wait() {
            panic!("the operator exited ({status}):\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// One request the operator sent, as the cluster recorded it.
#[derive(Clone, Debug)]
pub struct Sent {
    /// `verb path?query -> status`.
    pub line: String,
    /// The Kubernetes verb, as the authorizer sees it (`get`, `list`, `watch`, `create`,
    /// `update`, `patch`, `delete`).
    pub verb: String,
    /// The path, without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The HTTP status of the answer.
    pub code: u16,
    /// It changes state.
    pub write: bool,
    /// A watch.
    pub watch: bool,
    /// The authorizer refused it (403).
    pub forbidden: bool,
}

/// The object or collection a request is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// API group (`""`: the core group).
    pub group: String,
    pub namespace: Option<String>,
    /// Plural resource name (`deployments`).
    pub resource: String,
    pub name: Option<String>,
    /// Subresource (`status`, `scale`).
    pub sub: Option<String>,
}

impl Sent {
    fn new(verb: &str, uri: &str, code: u16, watch: bool) -> Sent {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let verb = verb.to_ascii_lowercase();
        Sent {
            line: format!("{verb} {uri} -> {code}"),
            write: matches!(
                verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            ),
            verb,
            path: path.into(),
            query: query.into(),
            code,
            watch,
            forbidden: code == 403,
        }
    }

    /// A request of the in-memory server, with the verb the authorizer would see.
    fn in_memory(r: &memory_apiserver::Request) -> Sent {
        let named = Sent::new("get", &r.path, 0, false)
            .target()
            .is_some_and(|t| t.name.is_some());
        let verb = match (r.method.as_str(), r.watch, named) {
            ("GET", true, _) => "watch",
            ("GET", false, true) => "get",
            ("GET", false, false) => "list",
            ("POST", ..) => "create",
            ("PUT", ..) => "update",
            ("DELETE", _, false) => "deletecollection",
            (method, ..) => method,
        };
        let uri = match r.query.as_str() {
            "" => r.path.clone(),
            query => format!("{}?{query}", r.path),
        };
        Sent::new(verb, &uri, r.status, r.watch)
    }

    /// What the request is about; None for discovery and other paths outside the resource
    /// API.
    pub fn target(&self) -> Option<Target> {
        let segs: Vec<&str> = self.path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (resource, rest) = rest.split_first()?;
        Some(Target {
            group: group.into(),
            namespace,
            resource: resource.to_string(),
            name: rest.first().map(|s| s.to_string()),
            sub: rest.get(1).map(|s| s.to_string()),
        })
    }

    /// `verb resource[/name[/subresource]]`, the same on every tier and at whichever version
    /// the cluster serves: `patch deployments/shop-beat`, `create events`,
    /// `patch celeries/shop/status`.
    pub fn summary(&self) -> String {
        let Some(t) = self.target() else {
            return format!("{} {}", self.verb, self.path);
        };
        let mut s = format!("{} {}", self.verb, t.resource);
        for part in [t.name, t.sub].into_iter().flatten() {
            s.push('/');
            s.push_str(&part);
        }
        s
    }

    /// The verbs the authorizer checks: a server-side apply that creates its object (201) is
    /// authorized as `create` as well as `patch`.
    pub fn verbs(&self) -> Vec<&str> {
        let mut verbs = vec![self.verb.as_str()];
        if self.verb == "patch" && self.code == 201 {
            verbs.push("create");
        }
        verbs
    }
}

/// How long the operator must have been quiet to count as settled.
pub const QUIET: Duration = Duration::from_secs(3);

/// How long a scenario waits for something before failing.
pub const LONG: Duration = Duration::from_secs(90);

/// Polls `check` every 100 ms until it returns Some, or fails after `limit` with the
/// operator's log.
pub async fn wait<T, Fut>(
    limit: Duration,
    what: &str,
    op: &Operator,
    check: impl FnMut() -> Fut,
) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    super::eventually(
        limit,
        what,
        || format!("; operator log:\n{}", op.log()),
        check,
    )
    .await
}

/// A child write, as opposed to the resource's status and its Events.
pub fn is_child_write(summary: &str) -> bool {
    !summary.starts_with("patch celeries/") && summary != "create events"
}

enum Tier {
    InMemory(ApiServer),
    Real {
        plane: Plane,
        /// The operator's user name (its ServiceAccount).
        user: String,
    },
    /// A cluster of the user's (`KUBECONFIG`): nothing to observe but its objects.
    External,
}

/// The shared control plane of the test process, or one of the test's own.
pub enum Plane {
    Shared(&'static ControlPlane),
    Own(ControlPlane),
}

impl std::ops::Deref for Plane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        match self {
            Plane::Shared(p) => p,
            Plane::Own(p) => p,
        }
    }
}

/// A cluster prepared for the operator: the CRD, the namespaces, the broker Secret and (on the
/// real control plane) the chart's RBAC.
pub struct Cluster {
    /// A client with every permission (the test's own).
    pub client: Client,
    /// Where the Celery resources live.
    pub ns: String,
    /// The operator's own namespace: plugin ConfigMaps and the leader-election Lease.
    pub operator_ns: String,
    pub dir: tempdir::Dir,
    /// The operator watches every namespace (else only `ns`).
    watch_all: bool,
    /// The chart release whose RBAC the operator runs under: (release, `helm template`
    /// arguments); None on a cluster of the user's.
    chart: Option<(String, Vec<String>)>,
    tier: Tier,
}

/// The bearer token of the operator on the in-memory server (which authenticates nobody, but
/// tells clients apart by it).
const OPERATOR_TOKEN: &str = "operator";

/// Tests of one process get namespaces of their own on the shared control plane.
static NEXT: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// The in-memory test API server.
    pub async fn in_memory() -> Cluster {
        let server = ApiServer::start().await;
        let dir = tempdir::Dir::new("operator");
        server.write_kubeconfig(&dir.path().join("admin.kubeconfig"));
        server.write_kubeconfig_with_token(&dir.path().join("operator.kubeconfig"), OPERATOR_TOKEN);
        let client = client_for(&dir.path().join("admin.kubeconfig")).await;
        let cluster = Cluster {
            client,
            ns: "apps".into(),
            operator_ns: "celery-operator".into(),
            dir,
            watch_all: true,
            // The operator watches every namespace, as with the chart's default values; its
            // replicas may elect a leader.
            chart: Some((
                "celery-operator".into(),
                vec!["--set=leaderElection.enabled=true".into()],
            )),
            tier: Tier::InMemory(server),
        };
        cluster.install(|crd| crd).await;
        cluster
    }

    /// The real control plane of the test tier (shared by the tests of this process), with
    /// namespaces of this test's own. The operator's credentials are a token of the chart's
    /// ServiceAccount, bound to the roles `helm template` renders for one watched namespace.
    pub async fn real() -> Cluster {
        let n = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (ns, operator_ns) = (format!("apps-{n}"), format!("ops-{n}"));
        let values = [
            "--set=watch.allNamespaces=false".to_string(),
            format!("--set=watch.namespace={ns}"),
            "--set=leaderElection.enabled=true".into(),
        ];
        let plane = Plane::Shared(ControlPlane::shared());
        Cluster::real_with(plane, &format!("op-{n}"), ns, operator_ns, &values).await
    }

    /// A control plane of the test's own with the chart installed as `helm install` does by
    /// default: release `celery-operator` in namespace `celery-operator`, watching every
    /// namespace (a ClusterRole); Celery resources go to `default`.
    pub async fn real_with_default_chart() -> Cluster {
        let plane = Plane::Own(ControlPlane::start());
        let (ns, operator_ns) = ("default".to_string(), "celery-operator".to_string());
        Cluster::real_with(plane, "celery-operator", ns, operator_ns, &[]).await
    }

    async fn real_with(
        plane: Plane,
        release: &str,
        ns: String,
        operator_ns: String,
        values: &[String],
    ) -> Cluster {
        let dir = tempdir::Dir::new("operator");
        plane.write_kubeconfig(&dir.path().join("admin.kubeconfig"), plane.admin_token());
        let client = client_for(&dir.path().join("admin.kubeconfig")).await;
        let objects = helm_template(release, &operator_ns, values);
        let watch_all = !values
            .iter()
            .any(|v| v == "--set=watch.allNamespaces=false");
        let mut cluster = Cluster {
            client,
            ns,
            operator_ns,
            dir,
            watch_all,
            chart: Some((release.into(), values.to_vec())),
            tier: Tier::Real {
                plane,
                user: String::new(),
            },
        };
        // 1.20 has no CEL validation rules: the CRD goes in without them (the operator
        // evaluates the same rules itself).
        cluster.install(without_validation_rules).await;
        let account = install_rbac(&cluster.client, &objects, &cluster.operator_ns).await;
        let token = service_account_token(&cluster.client, &cluster.operator_ns, &account).await;
        let kubeconfig = cluster.dir.path().join("operator.kubeconfig");
        if let Tier::Real { plane, user } = &mut cluster.tier {
            plane.write_kubeconfig(&kubeconfig, &token);
            *user = format!("system:serviceaccount:{}:{account}", cluster.operator_ns);
        }
        cluster
    }

    /// The cluster a kubeconfig points to (a kind or k3d cluster, say), for the operator and
    /// the test alike; namespace `celery-operator-e2e`, watched alone.
    pub async fn external(kubeconfig: &Path) -> Cluster {
        let dir = tempdir::Dir::new("e2e");
        std::fs::copy(kubeconfig, dir.path().join("operator.kubeconfig")).unwrap();
        let cluster = Cluster {
            client: client_for(kubeconfig).await,
            ns: "celery-operator-e2e".into(),
            operator_ns: "celery-operator-e2e".into(),
            dir,
            watch_all: false,
            chart: None,
            tier: Tier::External,
        };
        cluster.install(|crd| crd).await;
        cluster
    }

    /// Whether this is the real control plane.
    pub fn is_real(&self) -> bool {
        matches!(self.tier, Tier::Real { .. })
    }

    /// Whether the operator's requests can be observed ([`sent_since`](Self::sent_since)):
    /// not on a cluster of the user's.
    pub fn observes_requests(&self) -> bool {
        !matches!(self.tier, Tier::External)
    }

    /// The in-memory server (fault injection, stop and restart).
    pub fn server(&mut self) -> &mut ApiServer {
        match &mut self.tier {
            Tier::InMemory(server) => server,
            _ => panic!("only the in-memory API server injects faults"),
        }
    }

    /// Starts the operator, with the cluster's credentials for it, watching the test's
    /// namespace and loading plugins from the operator namespace; `extra` flags last.
    pub fn operator(&self, name: &str, extra: &[&str]) -> Operator {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let http_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_celery-operator"));
        command
            .arg("run")
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(["--plugin-namespace", &self.operator_ns])
            .args(["--log-level", "info,kube=warn"])
            .args(["--poll-interval-seconds", "1"]);
        if !self.watch_all {
            command.args(["--namespace", &self.ns]);
        }
        let process = command
            .args(extra)
            .env("KUBECONFIG", self.dir.path().join("operator.kubeconfig"))
            .env_remove("RUST_LOG")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("the operator starts");
        Operator {
            process,
            log,
            http_port,
        }
    }

    /// A mark: [`sent_since`](Self::sent_since) returns the operator's requests after it.
    pub fn mark(&self) -> u64 {
        match &self.tier {
            Tier::InMemory(server) => server.request_count() as u64,
            Tier::Real { plane, .. } => plane.audit_mark(),
            Tier::External => 0,
        }
    }

    /// The requests the operator sent after `mark` (the test's own are left out: the
    /// operator has credentials of its own on both tiers).
    pub fn sent_since(&self, mark: u64) -> Vec<Sent> {
        match &self.tier {
            Tier::InMemory(server) => server
                .requests_since(mark as usize)
                .iter()
                .filter(|r| r.user.as_deref() == Some(OPERATOR_TOKEN))
                .map(Sent::in_memory)
                .collect(),
            Tier::Real { plane, user } => plane
                .audit_since(mark)
                .into_iter()
                .filter(|e| e.user == *user)
                .map(|e: AuditEvent| Sent::new(&e.verb, &e.uri, e.code, e.verb == "watch"))
                .collect(),
            Tier::External => Vec::new(),
        }
    }

    /// Requests of the operator the authorizer refused since `mark` (the chart's RBAC lacks
    /// something the operator needs).
    pub fn forbidden_since(&self, mark: u64) -> Vec<String> {
        self.sent_since(mark)
            .into_iter()
            .filter(|s| s.forbidden)
            .map(|s| s.line)
            .collect()
    }

    /// Plays the kubelet: every pod (real control plane) or Deployment (in-memory server,
    /// which has no Deployment controller) of the test's namespace is reported ready.
    pub async fn make_ready(&self) {
        match self.tier {
            Tier::InMemory(_) => make_deployments_ready(&self.client, &self.ns).await,
            Tier::Real { .. } => make_pods_ready(&self.client, &self.ns).await,
            // A real cluster has kubelets of its own.
            Tier::External => {}
        }
    }

    /// The CRDs (ours from `crds/`, as users apply it, and, unless the cluster is someone's
    /// own, KEDA's from `tests/data`), each passed through `adapt`; the namespaces and a
    /// broker Secret.
    async fn install(&self, adapt: impl Fn(Value) -> Value) {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let keda = [
            "tests/data/keda-v2.20.2/keda.sh_scaledobjects.yaml",
            "tests/data/keda-v2.20.2/keda.sh_triggerauthentications.yaml",
        ];
        let keda = keda.iter().filter(|_| !matches!(self.tier, Tier::External));
        for file in std::iter::once(&"crds/celeries.celeryproject.org.yaml").chain(keda) {
            let yaml = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            install_crd(&self.client, adapt(serde_saphyr::from_str(&yaml).unwrap())).await;
        }
        for ns in [&self.ns, &self.operator_ns] {
            apply(
                &self.client,
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .await;
        }
        self.secret("redis://127.0.0.1:1/0").await;
    }

    /// Sets the broker Secret `broker` (key `url`) of the test's namespace.
    pub async fn secret(&self, url: &str) {
        let s = json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": "broker", "namespace": self.ns},
                       "data": {"url": k8s_openapi::ByteString(url.as_bytes().to_vec())}});
        apply(&self.client, &s).await;
    }
}

/// What a scenario does with the cluster: Celery resources, their children, conditions and
/// Events; what the operator sent, once it settled; whether the chart's RBAC covers it.
impl Cluster {
    /// A Celery resource named `name` in the test's namespace, with `spec` (YAML).
    pub fn celery(&self, name: &str, spec: &str) -> Value {
        let spec: Value = serde_saphyr::from_str(spec).unwrap();
        json!({"apiVersion": "celeryproject.org/v1alpha1", "kind": "Celery",
               "metadata": {"name": name, "namespace": self.ns}, "spec": spec})
    }

    /// Server-side applies a Celery resource (as `kubectl apply --server-side` does).
    pub async fn apply_celery(&self, object: &Value) {
        self.celeries()
            .patch(
                object["metadata"]["name"].as_str().unwrap(),
                &PatchParams::apply("test").force(),
                &Patch::Apply(object),
            )
            .await
            .unwrap();
    }

    /// The Celery resources of the test's namespace.
    pub fn celeries(&self) -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("celeryproject.org", "v1alpha1", "Celery"),
            "celeries",
        );
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    /// The Deployments of the test's namespace.
    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Objects of any kind in the test's namespace, at `api_version` (`policy/v1beta1`).
    pub fn objects(&self, api_version: &str, plural: &str) -> Api<DynamicObject> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: String::new(),
            plural: plural.into(),
        };
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    /// Objects of `plural` in API group `group` of the test's namespace, at the version the
    /// cluster prefers (found by discovery).
    pub async fn served(&self, group: &str, plural: &str) -> Api<DynamicObject> {
        let discovery = kube::Discovery::new(self.client.clone())
            .filter(&[group])
            .run()
            .await
            .unwrap();
        for g in discovery.groups() {
            for (ar, _) in g.recommended_resources() {
                if ar.plural == plural {
                    return Api::namespaced_with(self.client.clone(), &self.ns, &ar);
                }
            }
        }
        panic!("the cluster serves no {plural} in group {group:?}")
    }

    /// The names of the Deployments of the test's namespace, sorted.
    pub async fn deployment_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .deployments()
            .list(&ListParams::default())
            .await
            .map(|l| l.items.iter().map(|d| d.name_any()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The condition `type_` of resource `name`.
    pub async fn condition(&self, name: &str, type_: &str) -> Option<Value> {
        let c = self.celeries().get(name).await.ok()?;
        c.data["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    /// Waits until condition `type_` of resource `name` has `status`; returns it.
    pub async fn until_condition(
        &self,
        op: &Operator,
        name: &str,
        type_: &str,
        status: &str,
    ) -> Value {
        let what = format!("{type_} is {status}");
        wait(LONG, &what, op, || async {
            let c = self.condition(name, type_).await?;
            (c["status"] == status).then_some(c)
        })
        .await
    }

    /// Plays the kubelet until resource `name` is Ready.
    pub async fn until_ready(&self, op: &Operator, name: &str) {
        wait(LONG, "the resource is Ready", op, || async {
            self.make_ready().await;
            let ready = self.condition(name, "Ready").await?;
            (ready["status"] == "True").then_some(())
        })
        .await;
    }

    /// The Events (`events.k8s.io`) about Celery resources of the test's namespace with
    /// `reason`.
    pub async fn events(&self, reason: &str) -> Vec<Value> {
        let list = self
            .objects("events.k8s.io/v1", "events")
            .list(&ListParams::default())
            .await
            .unwrap();
        list.items
            .into_iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .filter(|e| e["reason"] == reason && e["regarding"]["kind"] == "Celery")
            .collect()
    }

    /// Waits until the operator settled: it sent no request and finished no reconcile for
    /// [`QUIET`]. Fails after [`LONG`]: an operator in a hot loop never settles.
    pub async fn settle(&self, op: &Operator) {
        self.settle_within(op, QUIET, LONG).await;
    }

    /// Waits until the operator sent no request and finished no reconcile for `quiet`;
    /// returns when that quiet period began. Fails after `limit`.
    pub async fn settle_within(&self, op: &Operator, quiet: Duration, limit: Duration) -> Instant {
        let start = Instant::now();
        let mut mark = self.mark();
        let mut reconciles = op.reconciles();
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Taken before reading: what comes in between is seen twice, never missed.
            let next = self.mark();
            let sent = self.sent_since(mark);
            let now = op.reconciles();
            if !sent.is_empty() || now != reconciles {
                quiet_since = Instant::now();
                reconciles = now;
            }
            mark = next;
            if quiet_since.elapsed() >= quiet {
                return quiet_since;
            }
            assert!(
                start.elapsed() < limit,
                "the operator did not settle within {limit:?}; last requests: {:#?}; operator log:\n{}",
                sent.iter().map(|s| &s.line).collect::<Vec<_>>(),
                op.log()
            );
        }
    }

    /// Once the operator settled: its writes since `mark`, as [`Sent::summary`] lines, in the
    /// order it sent them.
    pub async fn settled_writes(&self, op: &Operator, mark: u64) -> Vec<String> {
        self.settle(op).await;
        self.sent_since(mark)
            .into_iter()
            .filter(|s| s.write)
            .map(|s| s.summary())
            .collect()
    }

    /// Waits until the operator sent the `expected` writes to children since `mark` and
    /// settled, then checks that its writes to children are exactly those (in any order; the
    /// resource's status and Events aside); returns all its writes. Checks nothing where
    /// requests cannot be observed.
    pub async fn assert_child_writes(
        &self,
        op: &Operator,
        mark: u64,
        expected: &[&str],
        what: &str,
    ) -> Vec<String> {
        if !self.observes_requests() {
            return self.settled_writes(op, mark).await;
        }
        let what_sent = format!("{what}: the operator sent {expected:?}");
        wait(LONG, &what_sent, op, || async {
            let mut sent: Vec<String> = self
                .sent_since(mark)
                .into_iter()
                .filter(|s| s.write)
                .map(|s| s.summary())
                .collect();
            let all = expected
                .iter()
                .all(|e| match sent.iter().position(|s| s == e) {
                    Some(i) => {
                        sent.swap_remove(i);
                        true
                    }
                    None => false,
                });
            all.then_some(())
        })
        .await;
        let writes = self.settled_writes(op, mark).await;
        let mut children: Vec<&str> = writes
            .iter()
            .map(String::as_str)
            .filter(|w| is_child_write(w))
            .collect();
        children.sort();
        let mut expected = expected.to_vec();
        expected.sort();
        assert_eq!(
            children,
            expected,
            "{what}: the child writes; all writes: {writes:#?}; operator log:\n{}",
            op.log()
        );
        writes
    }

    /// The RBAC rules of the chart release the operator runs under, each with the namespace
    /// it applies in (None: every namespace, from a ClusterRole).
    pub fn chart_rules(&self) -> Vec<(Option<String>, Value)> {
        let Some((release, values)) = &self.chart else {
            return Vec::new();
        };
        let mut rules = Vec::new();
        for object in helm_template(release, &self.operator_ns, values) {
            let scope = match object["kind"].as_str() {
                Some("ClusterRole") => None,
                Some("Role") => Some(
                    object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or(&self.operator_ns)
                        .to_string(),
                ),
                _ => continue,
            };
            for rule in object["rules"].as_array().into_iter().flatten() {
                rules.push((scope.clone(), rule.clone()));
            }
        }
        rules
    }

    /// Checks that no request of the operator since `mark` was refused (the real authorizer
    /// has the chart's RBAC) and that the chart's rules allow every one of them (checked by
    /// the test on both tiers); returns what was used, as (API group, resource[/subresource],
    /// verb) with the namespace left out.
    pub fn assert_rbac(&self, mark: u64, op: &Operator) -> BTreeSet<(String, String, String)> {
        let forbidden = self.forbidden_since(mark);
        assert!(
            forbidden.is_empty(),
            "the chart's RBAC refused {forbidden:#?}; operator log:\n{}",
            op.log()
        );
        self.assert_chart_allows(mark)
    }

    /// Checks that the chart's RBAC rules allow every request of the operator since `mark`;
    /// returns what was used (see [`assert_rbac`](Self::assert_rbac)).
    pub fn assert_chart_allows(&self, mark: u64) -> BTreeSet<(String, String, String)> {
        let rules = self.chart_rules();
        let allows = |t: &Target, resource: &str, verb: &str| {
            rules.iter().any(|(scope, rule)| {
                let has = |field: &str, want: &str| {
                    rule[field]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|v| v == want || v == "*"))
                };
                (scope.is_none() || *scope == t.namespace)
                    && has("apiGroups", &t.group)
                    && has("resources", resource)
                    && has("verbs", verb)
            })
        };
        let mut used = BTreeSet::new();
        let mut uncovered = BTreeSet::new();
        for sent in self.sent_since(mark) {
            let Some(t) = sent.target() else { continue };
            let resource = match &t.sub {
                Some(sub) => format!("{}/{sub}", t.resource),
                None => t.resource.clone(),
            };
            for verb in sent.verbs() {
                if self.chart.is_some() && !allows(&t, &resource, verb) {
                    uncovered.insert(format!("{verb} {resource} ({})", sent.line));
                }
                used.insert((t.group.clone(), resource.clone(), verb.to_string()));
            }
        }
        assert!(
            uncovered.is_empty(),
            "requests the chart's RBAC rules do not allow: {uncovered:#?}"
        );
        used
    }
}

/// Applies a CRD and waits until it is served.
async fn install_crd(client: &Client, crd: Value) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd["metadata"]["name"].as_str().unwrap().to_string();
    crds.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
    super::eventually(
        Duration::from_secs(30),
        &format!("CRD {name} is established"),
        String::new,
        || async {
            let crd = crds.get(&name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        },
    )
    .await;
}

/// A client with the credentials of a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Server-side applies any object (its kind found by discovery).
pub async fn apply(client: &Client, object: &Value) {
    let (api, name) = api_for(client, object).await;
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {object}: {e}"));
}

async fn api_for(client: &Client, object: &Value) -> (Api<DynamicObject>, String) {
    let (group, version) = object["apiVersion"]
        .as_str()
        .unwrap()
        .split_once('/')
        .unwrap_or(("", object["apiVersion"].as_str().unwrap()));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
    let (ar, caps): (ApiResource, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovery of {gvk:?}: {e}"));
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    let api = match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    (api, name)
}

/// The CRD without `x-kubernetes-validations` (CEL rules need Kubernetes 1.25).
pub fn without_validation_rules(mut crd: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut crd);
    crd
}

/// The helm binary: on PATH, or where `scripts/setup.sh` installs it.
fn helm() -> PathBuf {
    let on_path = Command::new("helm")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return "helm".into();
    }
    let cache = std::env::var_os("CELERY_OPERATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/celery-operator")
        });
    let helm = cache.join("helm-v3.18.0/helm");
    assert!(
        helm.exists(),
        "helm is missing: run scripts/setup.sh (or scripts/test.sh), which installs it"
    );
    helm
}

/// The objects of the chart, rendered by `helm template` into `namespace`.
pub fn helm_template(release: &str, namespace: &str, args: &[String]) -> Vec<Value> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/celery-operator");
    let out = Command::new(helm())
        .args(["template", release, chart, "--namespace", namespace])
        .args(args)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// Applies the chart's ServiceAccount and RBAC objects (namespaced ones into `namespace`
/// unless they name their own); returns the ServiceAccount's name.
pub async fn install_rbac(client: &Client, objects: &[Value], namespace: &str) -> String {
    let mut account = None;
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        if !matches!(
            kind,
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            continue;
        }
        let mut object = object.clone();
        if object["metadata"]["namespace"].is_null() && !kind.starts_with("Cluster") {
            object["metadata"]["namespace"] = json!(namespace);
        }
        if kind == "ServiceAccount" {
            account = object["metadata"]["name"].as_str().map(String::from);
        }
        apply(client, &object).await;
    }
    account.expect("the chart renders a ServiceAccount")
}

/// A token of a ServiceAccount, from the TokenRequest API (valid for a day).
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(86_400),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a ServiceAccount token")
        .status
        .expect("the token")
        .token
}

/// What the kubelet and the Deployment controller would report, on a server that has
/// neither: every Deployment's pods ready for its current generation.
async fn make_deployments_ready(client: &Client, ns: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in api.list(&ListParams::default()).await.unwrap().items {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let s = d.status.clone().unwrap_or_default();
        if s.ready_replicas == Some(replicas) && s.observed_generation == d.metadata.generation {
            continue;
        }
        let status = json!({"status": {"observedGeneration": d.metadata.generation, "replicas": replicas,
                                       "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}});
        // A write may race the operator's own; the next call retries.
        let _ = api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await;
    }
}

/// What the kubelet reports for a started container: every pod of `ns` that is not ready yet
/// becomes Running and Ready (the ReplicaSet and Deployment controllers do the rest).
async fn make_pods_ready(client: &Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default()).await else {
        return;
    };
    let now = jiff::Timestamp::now().to_string();
    for pod in list.items {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let status = json!({"status": {"phase": "Running", "startTime": now,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ]}});
        let _ = pods
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await;
    }
}
