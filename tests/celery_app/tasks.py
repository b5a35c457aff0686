"""A Celery app for the operator's tests: tasks to fill queues and keep workers busy.

The broker URL comes from CELERY_BROKER_URL, as in the pods the operator creates.
"""
import os
import time

from celery import Celery
from celery.signals import before_task_publish

app = Celery("tasks", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    task_acks_late=True,  # a running task stays unacknowledged (reserved) until it finishes
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "2")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Celery >= 5.5 soft shutdown: on a cold shutdown (SIGQUIT, or SIGTERM with
    # REMAP_SIGTERM=SIGQUIT), running tasks get this long before they are requeued.
    worker_soft_shutdown_timeout=float(os.environ.get("SOFT_SHUTDOWN_TIMEOUT", "0")),
)


# The opt-in the operator documents for the oldest waiting task's age: stamp every task
# with the time it was sent.
@before_task_publish.connect
def stamp_published_at(headers=None, **kwargs):
    headers["published_at"] = time.time()


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def noop():
    return None


@app.task(bind=True)
def record(self, path, seconds):
    """Appends `started <id>` to the file at `path`, sleeps, then appends `finished <id>`:
    what a test reads to know which tasks ran to the end."""
    with open(path, "a") as f:
        f.write(f"started {self.request.id}\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"finished {self.request.id}\n")
