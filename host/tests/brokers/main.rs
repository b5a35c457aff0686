//! The brokers for real: the Redis and RabbitMQ probes against real servers filled by the real
//! Celery client and drained by real Celery workers (`redis_probe`, `rabbitmq_probe`), and the
//! generated worker command line shutting down mid-task without losing one
//! (`worker_shutdown`), the sandbox end to end: the operator scaling real workers
//! (`sandbox`), the worker event stream on both brokers (`worker_events`), and the operator
//! following real workers' heartbeats (`worker_lifecycle`).

#[path = "../support/mod.rs"]
mod support;

mod rabbitmq_probe;
mod redis_probe;
mod sandbox;
mod worker_events;
mod worker_lifecycle;
mod worker_shutdown;
