//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager, on 127.0.0.1 with free ports, in a temporary directory.
//!
//! The binaries are built once by `scripts/control-plane.sh` (Kubernetes 1.20.2 from Debian's
//! source package) and found in `$CELERY_CONTROL_PLANE_DIR`, or else in
//! `$CELERY_OPERATOR_CACHE/control-plane/v1.20.2` (default cache `~/.cache/celery-operator`).
//!
//! The API server runs as a cluster does: TLS with its own CA, RBAC authorization, the
//! `OwnerReferencesPermissionEnforcement` admission plugin, ServiceAccount tokens (the
//! TokenRequest API and the token controller), and an audit log of every request with the
//! authorizer's decision: the exact record of what a client sent. The controller manager
//! brings the garbage collector, Deployments, ReplicaSets and ServiceAccounts. There is no
//! kubelet and no scheduler: tests play the kubelet (they mark pods ready through
//! `pods/status`).
//!
//! ```no_run
//! let plane = test_control_plane::ControlPlane::shared();
//! plane.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"), plane.admin_token());
//! let writes = plane.audit_since(0).into_iter().filter(|e| e.is_write()).count();
//! ```

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Kubernetes version the binaries are built from.
pub const VERSION: &str = "v1.20.2";

/// Where the binaries are: `$CELERY_CONTROL_PLANE_DIR`, or the build cache of
/// `scripts/control-plane.sh`.
pub fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("CELERY_CONTROL_PLANE_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("CELERY_OPERATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/celery-operator")
        });
    cache.join("control-plane").join(VERSION)
}

/// Whether the binaries are built (and etcd installed).
pub fn installed() -> bool {
    let dir = binaries();
    dir.join("kube-apiserver").exists()
        && dir.join("kube-controller-manager").exists()
        && Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// One request as the API server's audit log records it.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// The Kubernetes verb the authorizer saw (`get`, `list`, `watch`, `create`, `patch`, ...).
    pub verb: String,
    /// Path and query.
    pub uri: String,
    /// Who sent it (`system:serviceaccount:<ns>:<name>` for a ServiceAccount token).
    pub user: String,
    /// HTTP status code of the answer.
    pub code: u16,
    /// `allow` or `forbid`, when the request was authorized.
    pub decision: Option<String>,
}

impl AuditEvent {
    /// A request that changes state.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    fn parse(line: &str) -> Option<AuditEvent> {
        let v: Value = serde_json::from_str(line).ok()?;
        let verb = v["verb"].as_str()?.to_string();
        // Long-running requests (watches) are recorded when they start; everything else when
        // it completes, with its status code.
        let wanted = if verb == "watch" {
            "ResponseStarted"
        } else {
            "ResponseComplete"
        };
        if v["stage"] != wanted {
            return None;
        }
        Some(AuditEvent {
            verb,
            uri: v["requestURI"].as_str()?.to_string(),
            user: v["user"]["username"].as_str().unwrap_or_default().into(),
            code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            decision: v["annotations"]["authorization.k8s.io/decision"]
                .as_str()
                .map(String::from),
        })
    }

    /// `verb uri -> code`, for assertion messages.
    pub fn line(&self) -> String {
        format!("{} {} -> {}", self.verb, self.uri, self.code)
    }
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    port: u16,
    admin_token: String,
    processes: Vec<Child>,
}

impl ControlPlane {
    /// Starts a control plane of its own, stopped (processes killed, files removed) when
    /// dropped. Takes a few seconds. Panics, saying how to build it, when the binaries are
    /// missing.
    pub fn start() -> ControlPlane {
        // Its ports are found free, then bound by the processes: in between, something else
        // of the test process (a server on a port of its own choosing) may take one. A process
        // that exits while starting is retried on new ports, twice.
        for attempt in 1.. {
            match std::panic::catch_unwind(ControlPlane::start_once) {
                Ok(plane) => return plane,
                Err(e) if attempt < 3 && panic_text(&*e).contains("exited") => {
                    eprintln!(
                        "control plane: a process exited while starting; again on other ports"
                    );
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn start_once() -> ControlPlane {
        let bin = binaries();
        assert!(
            installed(),
            "the real control plane is not built ({} has no kube-apiserver, or etcd is missing): \
             run scripts/control-plane.sh (scripts/test.sh does)",
            bin.display()
        );
        // etcd fsyncs every write: on tmpfs that costs nothing.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let port = free_port();
        let dir = base.join(format!(
            "celery-operator-control-plane-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("control plane directory");
        let mut plane = ControlPlane {
            dir,
            port,
            admin_token: format!("admin-{:x}", random()),
            processes: Vec::new(),
        };
        plane.write_files();
        let etcd = plane.start_etcd();
        plane.start_apiserver(&bin, etcd);
        plane.start_controller_manager(&bin);
        plane
    }

    /// One control plane for the whole test process, started on first use. Its processes
    /// die with the test process (they get SIGKILL when it exits) and its files are removed
    /// right after.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            // The processes are told to die with the thread that started them (see
            // `spawn`): a thread that lives as long as the process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let plane = ControlPlane::start();
                plane.remove_files_after(std::process::id());
                tx.send(plane)
                    .expect("the test waits for its control plane");
                loop {
                    std::thread::park();
                }
            });
            let mut plane = rx.recv().expect("the control plane started");
            // Never dropped (a static), and the processes must stay: forget them.
            plane.processes.clear();
            plane
        })
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA that signed the API server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A bearer token of a cluster administrator (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Writes a kubeconfig that authenticates with `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\n\
             users:\n- name: test\n  user:\n    token: {token}\n",
            self.url(),
            self.ca_file().display()
        );
        std::fs::write(path, text).expect("kubeconfig written");
    }

    /// A mark in the audit log: [`audit_since`](Self::audit_since) returns what came after.
    pub fn audit_mark(&self) -> u64 {
        std::fs::metadata(self.dir.join("audit.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The requests recorded in the audit log after `mark` (0: all of them).
    pub fn audit_since(&self, mark: u64) -> Vec<AuditEvent> {
        let Ok(mut file) = std::fs::File::open(self.dir.join("audit.log")) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(mark)).is_err() {
            return Vec::new();
        }
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| AuditEvent::parse(&l))
            .collect()
    }

    /// Sends `GET path` with `token` (see [`get`]).
    pub fn get(&self, token: &str, path: &str) -> String {
        get(&self.url(), &self.ca_file(), token, path)
    }

    /// The API server's log so far (for failure messages).
    pub fn apiserver_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("kube-apiserver.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn write_files(&self) {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("openssl runs (Debian's openssl package)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=test-ca",
                ][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.crt"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-nodes", "-subj", "/CN=kube-apiserver"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        );
        std::fs::write(
            self.dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("written");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        // ServiceAccount tokens are signed with this key.
        openssl(&["genrsa", "-out", "sa.key", "2048"]);
        openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(
            self.dir.join("tokens.csv"),
            format!("{},admin,admin,\"system:masters\"\n", self.admin_token),
        )
        .expect("written");
        std::fs::write(
            self.dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n\
             rules:\n- level: Metadata\n",
        )
        .expect("written");
        self.write_kubeconfig(&self.dir.join("admin.kubeconfig"), &self.admin_token);
    }

    /// Spawns a process whose output goes to `<name>.log`, killed when the thread that
    /// spawned it ends (so a test process that dies takes its control plane with it).
    fn spawn(&mut self, name: &str, command: &mut Command) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        self.processes.push(child);
    }

    fn start_etcd(&mut self) -> String {
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = self.path("etcd");
        self.spawn(
            "etcd",
            Command::new("etcd").args([
                "--name",
                "test",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("test={peer_url}"),
                "--log-level",
                "warn",
            ]),
        );
        self.wait("etcd accepts connections", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", client)).is_ok()
        });
        client_url
    }

    fn start_apiserver(&mut self, bin: &Path, etcd: String) {
        let port = self.port.to_string();
        let args = [
            format!("--etcd-servers={etcd}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            // 1.20 still serves an unauthenticated port (8080) unless told not to.
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", self.path("server.crt")),
            format!("--tls-private-key-file={}", self.path("server.key")),
            format!("--token-auth-file={}", self.path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", self.path("sa.pub")),
            format!("--service-account-signing-key-file={}", self.path("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--audit-policy-file={}", self.path("audit-policy.yaml")),
            format!("--audit-log-path={}", self.path("audit.log")),
            "--audit-log-mode=blocking".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", self.path("certs")),
        ];
        self.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args(&args),
        );
        let (url, token) = (self.url(), self.admin_token.clone());
        let ca = self.ca_file();
        self.wait("the API server is ready", Duration::from_secs(120), || {
            ready(&url, &ca, &token)
        });
    }

    fn start_controller_manager(&mut self, bin: &Path) {
        let args = [
            format!("--kubeconfig={}", self.path("admin.kubeconfig")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
            "--port=0".into(),
            format!("--cert-dir={}", self.path("kcm-certs")),
            // ServiceAccount token Secrets (pods need one to be admitted in 1.20).
            format!("--service-account-private-key-file={}", self.path("sa.key")),
            format!("--root-ca-file={}", self.path("ca.crt")),
            "--use-service-account-credentials=false".into(),
            "--profiling=false".into(),
            // Fast reaction in tests: the garbage collector and the Deployment controller
            // see changes through watches anyway.
            "--concurrent-deployment-syncs=5".into(),
            "--concurrent-replicaset-syncs=5".into(),
        ];
        self.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args(&args),
        );
    }

    fn wait(&mut self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            for p in &mut self.processes {
                if let Ok(Some(status)) = p.try_wait() {
                    panic!(
                        "a control-plane process exited ({status}) while waiting until {what}; logs in {}:\n{}",
                        self.dir.display(),
                        tail(&self.apiserver_log())
                    );
                }
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting until {what}; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes the directory once process `pid` is gone (for the shared plane, never dropped).
    fn remove_files_after(&self, pid: u32) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; sleep 1; rm -rf '{}'",
            self.dir.display()
        );
        let mut watchdog = Command::new("sh");
        watchdog
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let _ = watchdog.spawn();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for p in self.processes.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if !self.processes.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The message of a panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Sends `GET path` with a bearer token and returns the raw HTTP answer (status line, headers
/// and body). Sent through `openssl s_client` (already needed for the certificates), so
/// that this crate needs no TLS stack of its own.
pub fn get(url: &str, ca: &Path, token: &str, path: &str) -> String {
    let host = url.trim_start_matches("https://");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", host, "-CAfile"])
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    use std::io::Write;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(request.as_bytes());
    }
    child
        .wait_with_output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether `/readyz` answers `ok`.
fn ready(url: &str, ca: &Path, token: &str) -> bool {
    let answer = get(url, ca, token, "/readyz");
    answer.starts_with("HTTP/1.1 200") && answer.trim_end().ends_with("ok")
}

/// A random number for tokens (no crate needed for test credentials on loopback).
fn random() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    let a = h.finish();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(a);
    (u128::from(a) << 64) | u128::from(h.finish())
}
