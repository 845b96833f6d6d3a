# A CPython interpreter with a large dict and a SIGUSR1 handler: it logs
# "ready <pid> <digest>" once the dict is built, and on every SIGUSR1 recomputes the
# digest of the live dict and logs "state <pid> <digest>". A restore that loses any of
# the interpreter's memory, or the handler, cannot produce the same line again.
# usage: python pyworker.py LOG N_KEYS
import hashlib
import os
import signal
import sys
import time


def build(n):
    state = {}
    for i in range(n):
        state[f"key-{i:07d}"] = (i * 2654435761) % 4294967296
    state["list"] = [str(i) * 3 for i in range(1000)]
    state["nested"] = {"a": (1, 2.5, "three"), "b": b"\x00\x01" * 50}
    return state


def digest(state):
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(repr((key, value)).encode())
    return h.hexdigest()[:32]


def main():
    log = open(sys.argv[1], "a", buffering=1)
    state = build(int(sys.argv[2]))
    requests = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: requests.append(signum))
    log.write(f"ready {os.getpid()} {digest(state)}\n")
    ticks = 0
    while True:
        if requests:
            requests.clear()
            log.write(f"state {os.getpid()} {digest(state)} ticks {ticks}\n")
        time.sleep(0.01)
        ticks += 1


main()
