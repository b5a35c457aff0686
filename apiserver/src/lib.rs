//! A Kubernetes API server in memory, on 127.0.0.1 (the sandbox's and the tests'): enough of the API for the real
//! `kube::Client` and kube-runtime's `Controller` to run unchanged against it. See
//! `apiserver/README.md` for what it emulates and where it approximates.
//!
//! ```no_run
//! # async fn demo() {
//! let mut server = memory_apiserver::ApiServer::start().await;
//! server.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"));
//! server.set_faults(memory_apiserver::Faults { error_share: 0.1, ..Default::default() });
//! server.stop().await;      // connections and watches drop, the port refuses
//! server.restart().await;   // same port, same objects
//! # }
//! ```

pub mod fields;
mod http;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use store::Store;

/// Faults injected into every request (watches included) until changed.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Added before answering.
    pub latency: Duration,
    /// Share of requests answered `500 InternalError`.
    pub error_share: f64,
    /// Share of requests answered `429 TooManyRequests` (with `Retry-After: 1`).
    pub throttle_share: f64,
    /// Share of writes answered `409 Conflict`.
    pub conflict_share: f64,
    /// Writes whose path contains one of these strings are answered `403 Forbidden`, every
    /// time (as an authorizer, a quota or an admission webhook refuses them):
    /// `vec!["/services/".into()]` refuses every write to a Service.
    pub forbidden_writes: Vec<String>,
}

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// Status code sent.
    pub status: u16,
    /// A watch request.
    pub watch: bool,
    /// Who sent it: the bearer token of its `Authorization` header, when it has one. The
    /// server authenticates nobody; this only tells clients apart (give each its own token in
    /// its kubeconfig, see [`ApiServer::write_kubeconfig_with_token`]).
    pub user: Option<String>,
}

impl Request {
    /// A write: anything but GET (and watches).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// State shared by the connections.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) requests: Mutex<Vec<Request>>,
    pub(crate) random: Mutex<u64>,
    /// How often watches that allow them get a bookmark.
    pub(crate) bookmark_interval: Mutex<Duration>,
}

impl Shared {
    /// A number in [0, 1) (xorshift; deterministic per server).
    pub(crate) fn random(&self) -> f64 {
        let mut s = self.random.lock().expect("random lock");
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A running test API server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
}

impl ApiServer {
    /// Starts a server with the built-in kinds and namespaces `default` and `kube-system`,
    /// on a free port of 127.0.0.1.
    pub async fn start() -> ApiServer {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            random: Mutex::new(0x9e37_79b9_7f4a_7c15),
            bookmark_interval: Mutex::new(Duration::from_secs(2)),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("bound");
        let mut server = ApiServer {
            shared,
            addr,
            stop: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = watch::channel(false);
        self.stop = Some(tx);
        tokio::spawn(http::serve(listener, self.shared.clone(), rx));
    }

    /// The server's URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig file pointing to this server (no authentication).
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_user(path, "{}");
    }

    /// Writes a kubeconfig file pointing to this server whose client sends `token` as a bearer
    /// token: nothing is authenticated, but its requests are told apart by
    /// [`Request::user`].
    pub fn write_kubeconfig_with_token(&self, path: &Path, token: &str) {
        self.write_kubeconfig_user(path, &format!("{{token: {token}}}"));
    }

    fn write_kubeconfig_user(&self, path: &Path, user: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\nusers:\n- name: test\n  user: {user}\n",
            self.url()
        );
        std::fs::write(path, text).expect("kubeconfig written");
    }

    /// Stops answering: open connections (watches included) are cut and the port refuses
    /// connections until [`restart`](Self::restart). The objects are kept.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        self.store().drop_watches();
        // Let the connection tasks see the signal and close their sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Serves again on the same port, with the same objects.
    pub async fn restart(&mut self) {
        // The old socket may take a moment to be released.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries >= 100 => panic!("cannot bind {} again: {e}", self.addr),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    /// Sets the faults injected from now on.
    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().expect("faults lock") = faults;
    }

    /// Ends every open watch now (clients see the stream end and watch again).
    pub fn drop_watches(&self) {
        self.store().drop_watches();
    }

    /// How often bookmarks are sent to watches that allow them (default 2 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_interval.lock().expect("lock") = every;
    }

    /// The objects and the server's settings (`history_limit`), to read or change directly.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().expect("store lock")
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// How many requests were answered so far (a mark for [`requests_since`](Self::requests_since)).
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("requests lock").len()
    }

    /// The requests answered after `mark`.
    pub fn requests_since(&self, mark: usize) -> Vec<Request> {
        self.shared.requests.lock().expect("requests lock")[mark..].to_vec()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
    }
}
