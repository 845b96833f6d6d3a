# SysV IPC in the dumper's IPC namespace. Not supported yet: a task with a SysV shared
# memory segment attached is refused before any image is written (semaphore sets and
# message queues are namespace objects that outlive the tree and are left as they are).
from criu_py.errors import Unsupported


def plan_vma(ctx, plan) -> None:
    v = plan.vma
    raise Unsupported(f"pid {ctx.pid}: SysV shared memory segment {v.inode} attached at "
                      f"{v.start:#x} is not supported")
