//! The processes a sandbox starts beside its API server: `redis-server`, the operator, the
//! task sender; and what it reads from Redis.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use redis::AsyncCommands;
use tokio::process::{Child, Command};

/// A free port on 127.0.0.1 (free when asked: bound and released).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A new file `path` for a child's standard output and error.
fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok((file.try_clone()?.into(), file.into()))
}

/// A `redis-server` on 127.0.0.1 without persistence; stopped when dropped.
pub struct Redis {
    pub port: u16,
    _process: Child,
}

impl Redis {
    /// Starts one whose working directory is `dir`, and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let process = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(log_file(&dir.join("redis.log"))?.0)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (Debian's redis-server package; scripts/setup.sh installs it)")?;
        let redis = Redis {
            port,
            _process: process,
        };
        for _ in 0..100 {
            if let Ok(mut c) = redis.client().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return Ok(redis);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer on port {port} within 5 s")
    }

    pub async fn client(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port))?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

/// The operator: `run` of the operator binary, against the sandbox's API server.
pub struct Operator {
    process: Child,
}

impl Operator {
    pub fn start(exe: &Path, kubeconfig: &Path, log: &Path) -> anyhow::Result<Operator> {
        let (stdout, stderr) = log_file(log)?;
        let process = Command::new(exe)
            .args(["run", "--namespace", super::NAMESPACE])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port()?)])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting the operator")?;
        Ok(Operator { process })
    }

    pub fn pid(&self) -> u32 {
        self.process.id().unwrap_or(0)
    }

    /// SIGTERM, and up to 10 s to exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.process.id() {
            // SAFETY: a plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
    }
}

/// The task sender (`send.py` of the app directory), reading `<count> <seconds> <queue>`
/// lines on its standard input.
pub fn sender(
    python: &Path,
    app_dir: &Path,
    broker_url: &str,
    log: &Path,
) -> anyhow::Result<Child> {
    let (stdout, stderr) = log_file(log)?;
    Command::new(python)
        .arg("send.py")
        .current_dir(app_dir)
        .env("CELERY_BROKER_URL", broker_url)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .context("starting the task sender")
}

/// Tasks sent, done and failed so far, in one round trip (zeros when Redis does not
/// answer).
pub async fn task_counts(broker: &mut redis::aio::MultiplexedConnection) -> (u64, u64, u64) {
    let figures: redis::RedisResult<(u64, u64, u64)> = redis::pipe()
        .scard("sandbox:sent")
        .scard("sandbox:done")
        .scard("sandbox:failed")
        .query_async(broker)
        .await;
    figures.unwrap_or_default()
}

/// How long each task sent to `queue` waited for a worker, in seconds, as the tasks recorded
/// it (`sandbox:wait:<queue>`).
pub async fn waits(
    broker: &mut redis::aio::MultiplexedConnection,
    queue: &str,
) -> anyhow::Result<Vec<f64>> {
    Ok(broker
        .lrange(format!("sandbox:wait:{queue}"), 0, -1)
        .await?)
}

/// The fate of every task sent, from what the tasks recorded.
pub async fn accounting(
    broker: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<super::Accounting> {
    let sent: std::collections::HashSet<String> = broker.smembers("sandbox:sent").await?;
    let done: std::collections::HashSet<String> = broker.smembers("sandbox:done").await?;
    let runs: std::collections::HashMap<String, u64> = broker.hgetall("sandbox:runs").await?;
    Ok(super::Accounting {
        sent: sent.len() as u64,
        completed: sent.intersection(&done).count() as u64,
        lost: sent.difference(&done).count() as u64,
        run_more_than_once: runs.values().filter(|&&n| n > 1).count() as u64,
    })
}
