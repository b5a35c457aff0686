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
        require(
            "redis-server",
            Command::new("redis-server").arg("--version"),
        );
        let dir = tempdir::Dir::new("redis");
        let port = free_port();
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

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
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
