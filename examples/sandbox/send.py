"""The sandbox's task sender: reads lines `<count> <seconds> <queue>` on standard input and
sends `count` tasks `tasks.work(seconds)` to `queue`, recording every task id in
`sandbox:sent` before it is sent (a task that was sent is accounted for even if the sender
dies right after). Prints `sent <count>` after each line, for the sandbox to follow.
"""
import sys
import uuid

from tasks import _account, work


def main():
    for line in sys.stdin:
        count, seconds, queue = line.split()
        for _ in range(int(count)):
            task_id = uuid.uuid4().hex
            _account.sadd("sandbox:sent", task_id)
            work.apply_async(args=[float(seconds)], queue=queue, task_id=task_id)
        print(f"sent {count}", flush=True)


if __name__ == "__main__":
    main()
