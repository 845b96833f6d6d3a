/* The one flat argument block handed to the PIE restorer (csrc/pie_restorer.c).
 * Python (criu_py/restore/pie.py) fills it inside the restorer region; every pointer
 * points into that region, because everything else is unmapped while the restorer runs.
 * The same layout is repeated in pie_restorer.cdef (cffi checks the two agree). */
#ifndef CRIU_PY_PIE_RESTORER_H
#define CRIU_PY_PIE_RESTORER_H
#include <stdint.h>

/* How one VMA comes back (pie_vma.kind). */
enum {
	PIE_VMA_ANON = 0,	/* mmap anonymous at start, contents from pages */
	PIE_VMA_FILE = 1,	/* mmap fd at pgoff (private or shared, per flags) */
	PIE_VMA_PREMAPPED = 2,	/* already mapped and filled at src (copy-on-write shared
				 * with the parent or the children): mremap into place */
	PIE_VMA_SYSVSHM = 3,	/* shmat the SysV segment fd (its id) at start */
};

struct pie_vma {
	uint64_t start;
	uint64_t end;
	uint64_t pgoff;		/* file offset in bytes (FILE) */
	uint64_t madv;		/* bit n set: madvise(start, len, n) once mapped and filled */
	uint64_t src;		/* PREMAPPED: where the VMA is now */
	int32_t prot;		/* final protection */
	int32_t map_prot;	/* protection to map with (+RW when pages are read into it) */
	int32_t flags;		/* mmap flags (MAP_PRIVATE/MAP_SHARED/MAP_ANONYMOUS/MAP_GROWSDOWN...) */
	int32_t fd;		/* FILE: fd parked at the top of the fd table; SYSVSHM: shmid */
	int32_t kind;
	int32_t pad;
};

/* One run of the pages file: read into [base, base + len), or (base 0) skip len bytes. */
struct pie_iovec {
	uint64_t base;
	uint64_t len;
};

/* One pages file and its runs: the dump's own, or a parent's (incremental dumps). */
struct pie_page_src {
	int32_t fd;
	int32_t pad;
	uint64_t off;		/* file offset of the first run */
	uint64_t iovs;		/* struct pie_iovec[nr_iovs]: this file's order */
	uint64_t nr_iovs;
};

/* Kernel struct prctl_mm_map, field for field. */
struct pie_mm_map {
	uint64_t start_code;
	uint64_t end_code;
	uint64_t start_data;
	uint64_t end_data;
	uint64_t start_brk;
	uint64_t brk;
	uint64_t start_stack;
	uint64_t arg_start;
	uint64_t arg_end;
	uint64_t env_start;
	uint64_t env_end;
	uint64_t auxv;		/* pointer into the region */
	uint32_t auxv_size;
	uint32_t exe_fd;
};

/* Kernel struct sigaction for rt_sigaction on x86_64. */
struct pie_sigaction {
	uint64_t handler;
	uint64_t flags;
	uint64_t restorer;
	uint64_t mask;
};

/* A thread's credentials, set last (they may drop the rights everything else needs). */
struct pie_creds {
	uint32_t uid, euid, suid, fsuid;
	uint32_t gid, egid, sgid, fsgid;
	uint32_t cap_inh[2], cap_prm[2], cap_eff[2], cap_bnd[2], cap_amb[2];
	uint32_t secbits;
	uint32_t no_new_privs;
	uint32_t cap_last_cap;
	uint32_t nr_groups;
	uint64_t groups;	/* uint32_t[nr_groups] */
	int32_t set;		/* 0: keep the current credentials */
	int32_t pad;
};

/* One thread of the task (threads[0] is the leader, which runs the rest). */
struct pie_thread {
	int32_t tid;
	int32_t pdeath_sig;
	uint64_t stack_top;	/* its restorer stack, inside the region */
	uint64_t sigframe;	/* rt_sigreturn runs with rsp = sigframe + 8 */
	uint64_t sigframe_src;	/* if not 0: the frame's bytes in the region, copied to sigframe */
	uint64_t sigframe_len;	/* (on the thread's own stack) once the memory is back */
	uint64_t fs_base;
	uint64_t gs_base;
	uint64_t clear_child_tid;
	uint64_t rseq;		/* the dumped registration; 0: none */
	uint32_t rseq_len;
	uint32_t rseq_sig;
	uint64_t robust_list;
	uint64_t robust_len;
	int32_t sched_policy;	/* < 0: leave as is */
	int32_t sched_prio;
	int32_t sched_nice;
	int32_t has_nice;
	uint64_t signals;	/* 128-byte siginfos queued to this thread */
	uint64_t nr_signals;
	char comm[16];
	struct pie_creds creds;
};

/* One fd of a vfork child's table: dup3(from, to) (from: parked by its parent). */
struct pie_fd_move {
	int32_t from;
	int32_t to;
	int32_t cloexec;
	int32_t pad;
};

/* Words shared by every task of the restore and the restore command (a MAP_SHARED
 * page inherited through fork): the stage barrier, futexes on `stage` and
 * `nr_in_progress`, and the first failure of any task's restorer. */
struct pie_sync {
	uint32_t stage;
	uint32_t nr_in_progress;
	int32_t err_stage;	/* first failure: PIE_STAGE_*, its -errno, the failing tid */
	int32_t err_tid;
	int64_t err_ret;
	uint64_t err_arg;
	uint32_t pages_compared;	/* copy-on-write pages the tasks compared, and of */
	uint32_t pages_skipped_cow;	/* those, kept shared (restore stats; Python adds) */
};

/* What the restorer writes to status_fd: one record on failure (stage, -errno) or
 * one with stage PIE_STAGE_DONE right before the task waits to be let go. */
struct pie_status {
	uint32_t magic;		/* PIE_STATUS_MAGIC */
	int32_t stage;
	int64_t ret;
	uint64_t arg;		/* stage-specific detail: VMA start, signal number, ... */
	int32_t pid;		/* the task that reports */
	int32_t pad;
};

enum {
	PIE_STAGE_RSEQ_UNREGISTER = 1,
	PIE_STAGE_UNMAP = 2,
	PIE_STAGE_MAP_VMA = 3,
	PIE_STAGE_REMAP_VMA = 4,
	PIE_STAGE_READ_PAGES = 5,
	PIE_STAGE_MPROTECT = 6,
	PIE_STAGE_VDSO = 7,
	PIE_STAGE_SIGACTION = 8,
	PIE_STAGE_MM_MAP = 9,
	PIE_STAGE_TID_ADDRESS = 10,
	PIE_STAGE_RSEQ_REGISTER = 11,
	PIE_STAGE_CLOSE = 12,
	PIE_STAGE_FS_BASE = 13,
	PIE_STAGE_CLONE_THREAD = 14,
	PIE_STAGE_ROBUST_LIST = 15,
	PIE_STAGE_SCHED = 16,
	PIE_STAGE_SIGNALS = 17,
	PIE_STAGE_CREDS = 18,
	PIE_STAGE_PRCTL = 19,
	PIE_STAGE_LOCKS = 20,
	PIE_STAGE_TIMERS = 21,
	PIE_STAGE_UFFD = 22,
	PIE_STAGE_DONE = 100,
	PIE_STATUS_MAGIC = 0x50494521,
	PIE_SYNC_ERROR = 0xffffffff,	/* pie_sync.stage when the restore is aborted */
};

/* A POSIX timer, created by the leader with its id once the threads exist and armed
 * right before the task returns to its code. */
struct pie_posix_timer {
	int32_t id;
	int32_t clockid;
	int32_t signo;
	int32_t notify;		/* SIGEV_* (| SIGEV_THREAD_ID) */
	int32_t thread_id;	/* SIGEV_THREAD_ID: the thread it signals */
	int32_t pad;
	uint64_t sival;
	int64_t isec, insec, vsec, vnsec;	/* interval, time left */
};

/* A timerfd of the task's table, armed right before the task returns to its code. */
struct pie_timerfd {
	int32_t fd;
	int32_t flags;		/* TFD_TIMER_ABSTIME: vsec/vnsec are added to the clock's now */
	int32_t clockid;
	int32_t pad;
	uint64_t ticks;		/* expirations not read yet (TFD_IOC_SET_TICKS) */
	int64_t isec, insec, vsec, vnsec;
};

/* A POSIX record lock (F_SETLK), taken after the restorer closed its own fds. */
struct pie_lock {
	int32_t fd;
	int32_t type;		/* F_RDLCK, F_WRLCK */
	int64_t start;
	int64_t len;
};

struct pie_args {
	uint64_t keep_start;	/* the region: [keep_start, keep_end) survives the big unmap */
	uint64_t keep_end;
	uint64_t premap_start;	/* premapped VMAs live here until they are moved: kept too */
	uint64_t premap_end;
	uint64_t task_size;	/* top of the user address space */

	uint64_t vmas;		/* struct pie_vma[nr_vmas] */
	uint64_t nr_vmas;

	uint64_t page_srcs;	/* struct pie_page_src[nr_page_srcs] */
	uint64_t nr_page_srcs;
	int32_t status_fd;
	int32_t pad_status;

	uint64_t vdso_vvar;	/* 0: none; else dumped start of [vvar] for ARCH_MAP_VDSO_64 */

	uint64_t sigactions;	/* struct pie_sigaction[64], index = signo - 1 */
	uint64_t sigaction_mask;	/* bit signo-1 set: restore that action */

	uint64_t old_rseq;	/* glibc's registration of this (Python) process */
	uint32_t old_rseq_len;
	uint32_t old_rseq_sig;

	int32_t has_mm_map;
	int32_t trap_before_sigreturn;	/* int3 right before rt_sigreturn (a tracer removes the region) */
	struct pie_mm_map mm_map;
	int32_t dumpable;	/* < 0: leave as is */
	int32_t tgid;

	uint64_t close_fds;	/* int32_t[nr_close_fds]; status_fd is closed last */
	uint64_t nr_close_fds;

	uint64_t signals;	/* 128-byte siginfos queued to the process */
	uint64_t nr_signals;

	uint64_t threads;	/* struct pie_thread[nr_threads], the leader first */
	uint64_t nr_threads;
	uint32_t threads_ready;	/* counted up by each thread once set up */
	uint32_t pad;
	uint64_t thread_stack;	/* size of each thread's restorer stack (below its stack_top) */

	uint64_t sync;		/* struct pie_sync (shared with the restore command); 0: none */
	uint64_t sync_len;
	uint32_t stage_ready;	/* the stage during which threads set themselves up */
	uint32_t stage_go;	/* the stage that lets them return into the task */

	/* A child that shares this task's memory (vfork(), clone(CLONE_VM)): its own struct
	 * pie_args, run by a clone3 with its clone_flags once this task is ready; 0: none. */
	uint64_t vfork_args;
	uint64_t clone_flags;	/* (in the child's args) CLONE_VM [| CLONE_VFORK | CLONE_SIGHAND
				 * | CLONE_FILES | CLONE_FS] */

	/* What a process created here (a vfork child) sets up for itself, since no Python
	 * ran in it: its fd table, fs, session, group, personality, limits, timers. */
	uint64_t fd_moves;	/* struct pie_fd_move[nr_fd_moves] */
	uint64_t nr_fd_moves;
	uint64_t rlimits;	/* uint64_t[2 * nr_rlimits]: cur, max in RLIMIT_* order */
	uint64_t nr_rlimits;
	uint64_t itimers;	/* uint64_t[3][4]: interval s, us, value s, us (real, virt, prof) */
	int32_t has_itimers;
	int32_t cwd_fd;		/* -1: keep */
	int32_t root_fd;	/* -1: keep */
	int32_t umask;		/* -1: keep */
	int32_t setsid;
	int32_t pgid;		/* > 0: setpgid(0, pgid) */
	int64_t personality;	/* -1: keep */
	char dot[8];		/* ".": chroot()'s argument after fchdir(root_fd) */

	/* Timers and locks of the process (the leader's args only). */
	uint64_t posix_timers;	/* struct pie_posix_timer[nr_posix_timers], by id */
	uint64_t nr_posix_timers;
	uint64_t timerfds;	/* struct pie_timerfd[nr_timerfds] */
	uint64_t nr_timerfds;
	uint64_t locks;		/* struct pie_lock[nr_locks] */
	uint64_t nr_locks;
	int32_t arm_itimers;	/* set the interval timers (itimers) at the very end */
	int32_t pad2;

	/* Lazy restore: the userfaultfd made by the task (the lazy-pages daemon holds it
	 * too) and the ranges registered with it in missing mode once the other pages are
	 * read; its memory then arrives from the daemon. uffd -1: none. */
	int32_t uffd;
	int32_t pad3;
	uint64_t lazy;		/* struct pie_iovec[nr_lazy]: (start, length) */
	uint64_t nr_lazy;

	/* Page filling: 1, or 2 to fill the second half of every pages file's bytes in a
	 * helper thread (any TID; it exits before anything else happens) while the leader
	 * fills the first: faulting and copying fresh memory is CPU-bound. */
	uint64_t fill_parts;
};

#endif
