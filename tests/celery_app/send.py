"""Sends COUNT `sleep(SECONDS)` tasks to QUEUE with PRIORITY: send.py QUEUE COUNT PRIORITY SECONDS"""
import sys

from tasks import sleep

queue, count, priority, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for _ in range(count):
    sleep.apply_async((seconds,), queue=queue, priority=priority)
