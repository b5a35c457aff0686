//! Real servers and Celery processes for tests: started on 127.0.0.1 with free ports and
//! temporary directories, stopped (killed) when dropped. The tools come from
//! `scripts/setup.sh`: `redis-server` from Debian, Celery in the Python virtualenv on PATH.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The test Celery app (`tests/celery_app`).
pub fn celery_app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/celery_app")
}

/// The path of a plugin component built by `host/build.rs` (`hpa`, `keda`, `queue-length`,
/// the fixtures of `plugins/testing/`: `hostile`, `future-version`, ...).
pub fn plugin_path(name: &str) -> String {
    format!("{}/{name}.wasm", env!("CELERY_PLUGIN_DIR"))
}

/// The bytes of a plugin component built by `host/build.rs` (see [`plugin_path`]).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = plugin_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn require(tool: &str, check: &mut Command) {
    let ok = check
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} is missing: run scripts/setup.sh (or scripts/test.sh), which installs it"
    );
}

/// A `redis-server` on 127.0.0.1, without persistence, in a temporary directory.
pub struct Redis {
    pub port: u16,
    process: Child,
    _dir: tempdir::Dir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// A Redis on `port`: to bring a stopped one back where its clients expect it.
    pub fn start_on(port: u16) -> Redis {
        require(
            "redis-server",
            Command::new("redis-server").arg("--version"),
        );
        let dir = tempdir::Dir::new("redis");
        let process = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Redis {
            port,
            process,
            _dir: dir,
        };
        wait_until(
            Duration::from_secs(10),
            "redis-server accepts connections",
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A container registry (Debian's `docker-registry`: the distribution registry v2) on
/// 127.0.0.1 over plain HTTP, storing in a temporary directory.
pub struct OciRegistry {
    pub port: u16,
    process: Option<Child>,
    dir: tempdir::Dir,
}

impl OciRegistry {
    pub fn start() -> OciRegistry {
        require(
            "docker-registry",
            Command::new("docker-registry").arg("--version"),
        );
        let mut registry = OciRegistry {
            port: free_port(),
            process: None,
            dir: tempdir::Dir::new("registry"),
        };
        registry.resume();
        registry
    }

    /// `host:port`, as references and `--insecure-registry` name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the registry (its storage stays, for [`OciRegistry::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn resume(&mut self) {
        let config = self.dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: '127.0.0.1:{}'}}\n",
                self.dir.path().join("data").display(),
                self.port
            ),
        )
        .unwrap();
        let process = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        self.process = Some(process);
        let port = self.port;
        wait_until(Duration::from_secs(10), "the registry serves /v2/", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A RabbitMQ node with its management plugin, on 127.0.0.1 only: AMQP, management,
/// Erlang distribution and its own `epmd` on free ports, data, logs and the Erlang cookie
/// in a temporary directory. The node and its epmd are killed when dropped.
pub struct Rabbitmq {
    pub amqp_port: u16,
    pub management_port: u16,
    epmd_port: u16,
    node: String,
    dir: tempdir::Dir,
    epmd: Child,
    server: Child,
}

/// Where Debian's `rabbitmq-server` package puts the scripts that run without switching to
/// the `rabbitmq` user.
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

impl Rabbitmq {
    pub fn start() -> Rabbitmq {
        let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        assert!(
            server.exists(),
            "rabbitmq-server is missing: run scripts/setup.sh (or scripts/test.sh), which installs it"
        );
        let dir = tempdir::Dir::new("rabbitmq");
        let (amqp_port, management_port) = (free_port(), free_port());
        let (dist_port, epmd_port) = (free_port(), free_port());
        let node = format!("test{amqp_port}@localhost");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 management.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {management_port}\n\
                 loopback_users = none\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("enabled_plugins"),
            "[rabbitmq_management].\n",
        )
        .unwrap();
        // Our own epmd, as a child, so that nothing is left running after the test.
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd starts");
        let mut command = Command::new(&server);
        command
            .envs(Self::env(dir.path(), &node, epmd_port))
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.path().join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                dir.path().join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", dir.path().join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.path().join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: the script, the Erlang VM and its helpers stop together.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let server = command.spawn().expect("rabbitmq-server starts");
        let rabbit = Rabbitmq {
            amqp_port,
            management_port,
            epmd_port,
            node,
            dir,
            epmd,
            server,
        };
        wait_until(
            Duration::from_secs(60),
            "RabbitMQ's management API answers",
            || rabbit.management_ready(),
        );
        rabbit
    }

    /// What every RabbitMQ tool needs to find this node.
    fn env(dir: &Path, node: &str, epmd_port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("HOME", dir.display().to_string()),
            ("RABBITMQ_NODENAME", node.to_string()),
            ("RABBITMQ_CONF_ENV_FILE", "/dev/null".into()),
            ("ERL_EPMD_PORT", epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
    }

    fn management_ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.management_port)) else {
            return false;
        };
        // guest:guest
        let request = "GET /api/overview HTTP/1.0\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n";
        let mut answer = String::new();
        s.write_all(request.as_bytes()).is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }

    /// The broker URL (default virtual host, user guest).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.amqp_port)
    }

    /// The management API's base URL.
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    /// Runs `rabbitmqctl` against this node: an independent view of its queues, through
    /// Erlang distribution rather than the management API.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .args(args)
            .envs(Self::env(self.dir.path(), &self.node, self.epmd_port))
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Rabbitmq {
    fn drop(&mut self) {
        let group = format!("-{}", self.server.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.server.wait();
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
    }
}

/// Probe samples as queue -> (ready, reserved).
pub fn as_map(
    samples: &[celery_operator::broker::QueueSample],
) -> std::collections::BTreeMap<String, (u64, u64)> {
    samples
        .iter()
        .map(|s| (s.name.clone(), (s.ready, s.reserved)))
        .collect()
}

/// Runs `celery-operator queues` with `args` against `broker` (given as CELERY_BROKER_URL);
/// returns the table's rows split on whitespace, the header left out.
pub fn queues_command(broker: &str, args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .arg("queues")
        .args(args)
        .env("CELERY_BROKER_URL", broker)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// Runs a script of the test Celery app with `python3` against `broker`.
pub fn python(broker: &str, args: &[&str]) -> Output {
    require(
        "python3 with celery",
        Command::new("python3").args(["-c", "import celery"]),
    );
    let out = Command::new("python3")
        .args(args)
        .current_dir(celery_app_dir())
        .env("CELERY_BROKER_URL", broker)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// kombu's own view of `queues` on a Redis `broker` (`tests/celery_app/truth.py`): queue ->
/// (ready, reserved).
pub fn kombu_truth(
    broker: &str,
    queues: &[&str],
) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut args = vec!["truth.py"];
    args.extend(queues);
    let out: serde_json::Value = serde_json::from_slice(&python(broker, &args).stdout).unwrap();
    out.as_object()
        .unwrap()
        .iter()
        .map(|(q, v)| {
            let count = |k: &str| v[k].as_u64().unwrap();
            (q.clone(), (count("ready"), count("reserved")))
        })
        .collect()
}

/// A real `celery worker` process of the test app.
pub struct Worker {
    pub process: Child,
}

impl Worker {
    pub fn start(broker: &str, queues: &str, prefetch: u32) -> Worker {
        let process = Command::new("celery")
            .args([
                "-A",
                "tasks",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "1",
                "--loglevel",
                "WARNING",
            ])
            .args([
                "--queues",
                queues,
                "--hostname",
                &format!("test-{}@%h", free_port()),
            ])
            .current_dir(celery_app_dir())
            .env("CELERY_BROKER_URL", broker)
            .env("PREFETCH", prefetch.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("celery worker starts");
        Worker { process }
    }
}

impl Worker {
    /// Runs `argv` (a worker's command line, as a pod would run it) in the test app's
    /// directory, with `env` on top of the broker URL. Its output goes to `log`.
    pub fn run(broker: &str, argv: &[String], env: &[(String, String)], log: &Path) -> Worker {
        let log = std::fs::File::create(log).unwrap();
        let process = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(celery_app_dir())
            .env("CELERY_BROKER_URL", broker)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("celery worker starts");
        Worker { process }
    }

    /// Sends SIGTERM, as the kubelet does when a pod is deleted.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.process.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Worker {
    /// A cold shutdown first (SIGQUIT: Celery terminates its pool's children, which a
    /// SIGKILL of the parent would leave running their task), then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            let _ = Command::new("kill")
                .args(["-QUIT", &self.process.id().to_string()])
                .status();
            for _ in 0..50 {
                if let Ok(Some(_)) = self.process.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Polls the async `check` every 100 ms until it returns `Some`, or fails the test after
/// `limit`, saying what it waited for and `context()` (a log, say).
pub async fn eventually<T, Fut>(
    limit: Duration,
    what: &str,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `ok` until it holds or `limit` passes (then fails the test, saying what it waited for).
pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory removed on drop (no extra crate needed for it).
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "celery-operator-{prefix}-{}-{}",
                std::process::id(),
                super::free_port()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
pub mod cluster;
pub mod hostile;
