//! Broker probes: how many tasks wait in a pool's queues and how many are reserved by
//! workers, read the way Celery (kombu) stores them.

pub mod redis;

/// One queue, as a probe saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSample {
    /// Queue name.
    pub name: String,
    /// Messages waiting, over every priority level.
    pub ready: u64,
    /// Messages delivered to a worker and not yet acknowledged (prefetched, or running with
    /// `acks_late`).
    pub reserved: u64,
    /// Messages waiting per priority step (`0` is the queue itself), when the broker keeps
    /// priorities apart.
    pub by_priority: Vec<(u32, u64)>,
}

/// Why a probe failed. The scaler holds the pool's replicas when it does.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The broker could not be reached or answered an error.
    #[error("broker unreachable or failing: {0}")]
    Broker(String),
    /// The broker URL is not usable.
    #[error("invalid broker URL: {0}")]
    Url(String),
}
