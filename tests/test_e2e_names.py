# Names that are not UTF-8 (Linux paths and task names are bytes): a program whose file
# name holds the byte 0xe7, started in a directory and logging to a file whose names hold
# it too, is dumped and restored (same PID, next count), and crit decodes its images.
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import Log, Task

ODD = b"\xe7"


def test_program_with_non_utf8_names(h, workload_bins):
    base = os.fsencode(str(h.dir))
    odd_dir = base + b"/dir" + ODD
    os.mkdir(odd_dir)
    exe = odd_dir + b"/coun" + ODD + b"ter"
    shutil.copy(os.fsencode(str(workload_bins["counter"])), exe)
    log_path = odd_dir + b"/log" + ODD
    p = subprocess.Popen([exe, log_path], cwd=odd_dir, start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    task = Task(p.pid, "coun", Log(Path(os.fsdecode(log_path))), p)
    task.is_ours = lambda: os.path.exists(f"/proc/{p.pid}")          # cmdline is not UTF-8
    h.tasks.append(task)
    task.log.wait(rf"{p.pid} 3")
    assert open(f"/proc/{p.pid}/comm", "rb").read().rstrip(b"\n") == b"coun" + ODD + b"ter"
    images = h.dump(task)
    dumped = int(task.log.lines()[-1].split()[1])
    h.restore(images, task=task)
    task.log.wait(rf"{p.pid} {dumped + 2}")
    assert os.readlink(os.fsencode(f"/proc/{p.pid}/exe")) == exe
    assert os.readlink(os.fsencode(f"/proc/{p.pid}/cwd")) == odd_dir
    assert open(f"/proc/{p.pid}/comm", "rb").read().rstrip(b"\n") == b"coun" + ODD + b"ter"
    crit = [str(Path(sys.executable).parent / "crit-py")]
    for name in ("files.img", f"core-{p.pid}.img"):
        res = subprocess.run(crit + ["decode", "-i", images / name], capture_output=True, text=True)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        json.loads(res.stdout)
    res = subprocess.run(crit + ["x", images, "ps"], capture_output=True, text=True)
    assert res.returncode == 0 and str(p.pid) in res.stdout, res.stderr
