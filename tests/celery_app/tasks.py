"""A Celery app for the operator's tests: tasks to fill queues and keep workers busy.

The broker URL comes from CELERY_BROKER_URL, as in the pods the operator creates.
"""
import os
import time

from celery import Celery

app = Celery("tasks", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    task_acks_late=True,  # a running task stays unacknowledged (reserved) until it finishes
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "2")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def noop():
    return None
