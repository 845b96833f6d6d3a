# CPython with threads: a producer thread feeds a queue.Queue, three worker threads take
# items from it and add them up, all under the GIL, with locks and condition variables
# (futexes) in play. It logs "tids <pid> <native ids>" and "ready <pid> <digest>" (the
# digest of a large dict that never changes), then every 50 ms
# "tick <pid> <produced> <sum of each worker>". On SIGUSR1 it logs
# "state <pid> <digest>" from the live dict. usage: python pythreads.py LOG N_KEYS
import hashlib
import os
import queue
import signal
import sys
import threading
import time


def digest(state):
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(repr((key, value)).encode())
    return h.hexdigest()[:32]


def main():
    log = open(sys.argv[1], "a", buffering=1)
    state = {f"key-{i:07d}": (i * 2654435761) % 4294967296 for i in range(int(sys.argv[2]))}
    items = queue.Queue(maxsize=100)
    produced = [0]
    sums = [0, 0, 0]
    lock = threading.Lock()
    requests = []

    def producer():
        n = 0
        while True:
            n += 1
            items.put(n)
            with lock:
                produced[0] = n
            time.sleep(0.002)

    def worker(i):
        while True:
            v = items.get()
            with lock:
                sums[i] += v
            items.task_done()

    threads = [threading.Thread(target=producer, daemon=True)]
    threads += [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    signal.signal(signal.SIGUSR1, lambda signum, frame: requests.append(signum))
    time.sleep(0.05)
    log.write(f"tids {os.getpid()} {' '.join(str(t.native_id) for t in threads)}\n")
    log.write(f"ready {os.getpid()} {digest(state)}\n")
    while True:
        if requests:
            requests.clear()
            log.write(f"state {os.getpid()} {digest(state)}\n")
        with lock:
            line = f"tick {os.getpid()} {produced[0]} {' '.join(map(str, sums))}\n"
        log.write(line)
        time.sleep(0.05)


main()
