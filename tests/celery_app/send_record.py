"""Sends COUNT `record(PATH, SECONDS)` tasks to QUEUE: send_record.py QUEUE COUNT PATH SECONDS"""
import sys

from tasks import record

queue, count, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
for _ in range(count):
    record.apply_async((path, seconds), queue=queue)
