"""Ground truth for the probe tests, read through kombu itself rather than the operator's code:
ready = kombu's own size of the queue (every priority list), reserved = entries of kombu's
unacked hash whose routing key is the queue. Prints JSON {queue: {"ready": n, "reserved": n}}.

truth.py QUEUE...
"""
import json
import sys

from tasks import app

with app.connection_for_read() as conn:
    channel = conn.default_channel
    client = channel.client
    unacked = [json.loads(v) for v in client.hvals(channel.unacked_key)]
    out = {}
    for queue in sys.argv[1:]:
        out[queue] = {
            "ready": channel._size(queue),
            "reserved": sum(1 for _, _, routing_key in unacked if routing_key == queue),
        }
print(json.dumps(out))
