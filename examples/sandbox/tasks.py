"""The sandbox's demo Celery app: a task that works for as long as it is told, and an account
of every run kept in the broker's Redis, so that the sandbox can say which tasks completed,
which ran more than once and which were lost.

Workers run it as `celery -A tasks worker ...`, the command line the operator generates;
CELERY_BROKER_URL comes from the pod's environment, as in a cluster.
"""
import os
import time

import redis
from celery import Celery
from celery.signals import before_task_publish

BROKER = os.environ["CELERY_BROKER_URL"]

app = Celery("tasks", broker=BROKER)
app.conf.update(
    # A task is acknowledged when it finished, not when a worker took it: a worker stopped
    # in the middle (scale-down, crash) leaves it in the broker for another worker.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Redis redelivers a task a worker took but did not acknowledge after this long; longer
    # than any task of the sandbox, so a running task is never delivered twice.
    broker_transport_options={"visibility_timeout": 3600},
)

_account = redis.Redis.from_url(BROKER)


# Stamps every task with the time it was sent: the operator then reads the age of the oldest
# waiting task (status.scaling[].oldestWaitSeconds), and the task below its own wait.
@before_task_publish.connect
def stamp_published_at(headers=None, **kwargs):
    headers["published_at"] = time.time()


class Accounted(app.Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        _account.sadd("sandbox:failed", task_id)


@app.task(bind=True, base=Accounted)
def work(self, seconds):
    """Works (sleeps) `seconds`, counting its runs in `sandbox:runs` and marking itself done
    in `sandbox:done` when it finished (`sandbox:failed` if it raised). The first run
    records how long the task waited for a worker in `sandbox:wait:<queue>`."""
    if _account.hincrby("sandbox:runs", self.request.id, 1) == 1:
        published = getattr(self.request, "published_at", None)
        queue = (self.request.delivery_info or {}).get("routing_key", "")
        if published is not None:
            _account.rpush(f"sandbox:wait:{queue}", time.time() - published)
    time.sleep(seconds)
    _account.sadd("sandbox:done", self.request.id)
    return seconds
