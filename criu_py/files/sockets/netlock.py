# The network lock of --tcp-established (CRIU's --network-lock): from the moment a
# connection is put in repair mode at dump until the restored tree runs, packets of that
# connection are dropped both ways, so the peer neither gets a reset nor sees its data
# acknowledged by nobody. Methods, as CRIU: nftables (criu-py's default: these machines
# have no iptables binary, and nftables needs no more than the library), iptables,
# skip (no lock: the user keeps the peer quiet).
#
# nftables: the table CRIU makes, "inet CRIU-<run id>" (cut to 31 characters as CRIU's
# buffer cuts it) with input and output chains that accept packets marked 0xC114 and
# drop those whose (address, port, address, port) is in the sets conns4/conns6; each
# connection goes in both directions. The run id goes to inventory.dump_criu_run_id, so
# the restore (criu-py's or CRIU's) deletes the very table. Through libnftables
# (ctypes; the nftables package), else the nft binary.
# iptables: one DROP rule per connection and direction in INPUT and OUTPUT (iptables or
# ip6tables -w), deleted one by one by the restore, as CRIU does.
# shutil and subprocess are imported where a lock is taken or lifted: every
# dump imports this module for its run id, and most have no connection to lock.
import os

from criu_py.errors import CriuError
from criu_py.log import log

AF_INET, AF_INET6 = 2, 10

IPTABLES, NFTABLES, SKIP = 0, 1, 2        # inventory.network_lock_method, CRIU's numbers
METHODS = {"iptables": IPTABLES, "nftables": NFTABLES, "skip": SKIP, "none": SKIP}
METHOD_NAMES = {IPTABLES: "iptables", NFTABLES: "nftables", SKIP: "skip"}
SOCCR_MARK = 0xC114
DEFAULT = "nftables"


class NetLockError(CriuError):
    pass


def new_run_id() -> str:
    """A random UUID in its usual text form (CRIU's run id)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def table_name(run_id: str | None, root_pid: int) -> str:
    """The nftables table of a dump: as CRIU names it (its 32-byte buffer keeps 31)."""
    return (f"inet CRIU-{run_id}" if run_id else f"inet CRIU-{root_pid}")[:31]


# ---------------------------------------------------------------- nftables
class Nft:
    """Runs nft commands: libnftables when installed, else the nft binary."""

    def __init__(self):
        import ctypes
        import ctypes.util
        import shutil
        self._lib = None
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            lib = None
        if lib is not None:
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            self._lib = lib
        elif shutil.which("nft") is None:
            raise NetLockError("network lock nftables: neither libnftables nor the nft binary "
                               "is installed (Debian: apt-get install nftables), or use "
                               "--network-lock iptables|skip")

    def run(self, commands: str) -> str | None:
        """Run the commands; None on success, else nft's first error line."""
        if self._lib is not None:
            lib = self._lib
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                return "nft_ctx_new failed"
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                if lib.nft_run_cmd_from_buffer(ctx, commands.encode()) == 0:
                    return None
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                lib.nft_ctx_free(ctx)
        else:
            import subprocess
            res = subprocess.run(["nft", "-f", "-"], input=commands, capture_output=True,
                                 text=True, stdin=None)
            if res.returncode == 0:
                return None
            err = res.stderr
        lines = [x for x in err.splitlines() if x.strip()]
        return lines[0] if lines else "nft failed"


def _nft_table_commands(table: str) -> str:
    mark = f"meta mark {SOCCR_MARK:#x} accept"
    drop4 = "ip saddr . tcp sport . ip daddr . tcp dport"
    drop6 = "ip6 saddr . tcp sport . ip6 daddr . tcp dport"
    return "\n".join([
        f"add table {table}",
        f"add chain {table} output {{ type filter hook output priority 0; }}",
        f"add rule {table} output {mark}",
        f"add chain {table} input {{ type filter hook input priority 0; }}",
        f"add rule {table} input {mark}",
        f"add set {table} conns4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}",
        f"add rule {table} output {drop4} @conns4 drop",
        f"add rule {table} input {drop4} @conns4 drop",
        f"add set {table} conns6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}",
        f"add rule {table} output {drop6} @conns6 drop",
        f"add rule {table} input {drop6} @conns6 drop",
    ]) + "\n"


def _addr(family: int, raw: bytes) -> tuple[int, str]:
    """(family, text) of an address of a socket; IPv4-mapped IPv6 addresses are IPv4."""
    import ipaddress
    if family == AF_INET:
        return family, str(ipaddress.IPv4Address(raw[:4]))
    a = ipaddress.IPv6Address(raw[:16])
    if a.ipv4_mapped is not None:
        return AF_INET, str(a.ipv4_mapped)
    return family, str(a)


class Connection:
    """A TCP connection as the lock sees it: local and remote address and port."""
    __slots__ = ("family", "src", "sport", "dst", "dport")

    def __init__(self, family: int, src: bytes, sport: int, dst: bytes, dport: int):
        self.family, self.src, self.sport, self.dst, self.dport = family, src, sport, dst, dport

    def text(self) -> tuple:
        fam, src = _addr(self.family, self.src)
        _, dst = _addr(self.family, self.dst)
        return fam, src, dst

    def __str__(self):
        fam, src, dst = self.text()
        fmt = (lambda a, p: f"[{a}]:{p}") if fam == AF_INET6 else (lambda a, p: f"{a}:{p}")
        return f"{fmt(src, self.sport)} -> {fmt(dst, self.dport)}"


class NetLock:
    """The lock of one dump (method, run id), and what it did, to be undone if the dump
    fails or the tree runs on."""

    def __init__(self, method: int, run_id: str, root_pid: int):
        self.method = method
        self.run_id = run_id
        self.table = table_name(run_id, root_pid)
        self.locked = []             # Connection
        self._nft = None
        self._table_made = False

    def lock(self, conn: Connection) -> None:
        if self.method == SKIP:
            return
        if self.method == NFTABLES:
            if self._nft is None:
                self._nft = Nft()
            if not self._table_made:
                err = self._nft.run(_nft_table_commands(self.table))
                if err:
                    raise NetLockError(f"network lock (nftables): {err}")
                self._table_made = True
            fam, src, dst = conn.text()
            v = "4" if fam == AF_INET else "6"
            err = self._nft.run(
                f"add element {self.table} conns{v} {{ {dst} . {conn.dport} . {src} . {conn.sport} }}\n"
                f"add element {self.table} conns{v} {{ {src} . {conn.sport} . {dst} . {conn.dport} }}\n")
            if err:
                raise NetLockError(f"network lock (nftables) of {conn}: {err}")
        else:
            iptables_switch(conn, True)
        self.locked.append(conn)
        log.info("network lock (%s): %s", METHOD_NAMES[self.method], conn)

    def unlock(self) -> None:
        """Undo this dump's lock (the dump failed, or the tree runs on)."""
        if self.method == NFTABLES and self._table_made:
            err = self._nft.run(f"delete table {self.table}\n")
            if err:
                raise NetLockError(f"network unlock (nftables): {err}")
            self._table_made = False
        elif self.method == IPTABLES:
            for conn in self.locked:
                iptables_switch(conn, False)
        self.locked = []


def for_dump(opts: dict, run_id: str, root_pid: int) -> NetLock:
    name = opts.get("network_lock") or DEFAULT
    return NetLock(METHODS[name], run_id, root_pid)


# ---------------------------------------------------------------- iptables
def _iptables_rule(conn: Connection, lock: bool, input_: bool) -> list[str]:
    fam, src, dst = conn.text()
    cmd = "iptables" if fam == AF_INET else "ip6tables"
    # INPUT: packets from the peer to us; OUTPUT: ours to the peer
    a, ap, b, bp = (dst, conn.dport, src, conn.sport) if input_ else (src, conn.sport, dst, conn.dport)
    return [cmd, "-w", "-t", "filter", "-I" if lock else "-D", "INPUT" if input_ else "OUTPUT",
            "--protocol", "tcp", "-m", "mark", "!", "--mark", f"{SOCCR_MARK:#x}",
            "--source", a, "--sport", str(ap), "--destination", b, "--dport", str(bp), "-j", "DROP"]


def iptables_switch(conn: Connection, lock: bool) -> None:
    import shutil
    import subprocess
    for input_ in (True, False):
        argv = _iptables_rule(conn, lock, input_)
        if shutil.which(argv[0]) is None:
            raise NetLockError(f"network lock iptables: no {argv[0]} binary (Debian: apt-get "
                               f"install iptables), or use --network-lock nftables|skip")
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode:
            err = (res.stderr.strip().splitlines() or ["failed"])[0]
            raise NetLockError(f"network {'lock' if lock else 'unlock'} (iptables) of {conn}: {err}")


# ---------------------------------------------------------------- restore
def unlock_restored(method: int, run_id: str | None, root_pid: int, conns: list) -> None:
    """After a restore: lift the lock the dump took for `conns`."""
    if method == SKIP or not conns:
        return
    if method == NFTABLES:
        table = table_name(run_id, root_pid)
        err = Nft().run(f"delete table {table}\n")
        if err and "No such file" not in err:
            raise NetLockError(f"network unlock (nftables, table {table}): {err}")
        return
    for conn in conns:
        iptables_switch(conn, False)
