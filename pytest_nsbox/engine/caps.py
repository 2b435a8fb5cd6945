"""Resource caps: how a sandbox's PIDs and memory are capped, chosen once per spawner.

Mechanisms, best first:

``cgroup2``   a cgroup v2 parent we may write: `<cgroup2 mount>/nsbox` as root; for a normal user
              the systemd scope with Delegate=yes that the spawner was started in (systemd.py),
              or a delegated directory named by NSBOX_CGROUP_PARENT.  One child cgroup per
              sandbox; `cgroup.kill` ends it at once.
``cgroup1``   the v1 `pids` (and `memory`) hierarchies where writable (root on hybrid hosts).
``rlimit``    RLIMIT_NPROC inside the sandbox's own user namespace, counted per user namespace since
              Linux 5.14; RLIMIT_AS caps memory per process.  The kernel exempts host root from
              RLIMIT_NPROC, so this is no cap when the owner is root.
``none``      PIDs are not capped; the header says so and --nsbox-require-caps makes it an error.

Per-sandbox cgroups are named `nsbox-<spawner pid>-<random>`: random because PIDs get reused, and
carrying the spawner's PID so that the next session can sweep the cgroups of a spawner that was
SIGKILLed before it could remove them.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from .kernel import read_text as _read

# This module runs in the spawner, whose size every sandbox pays for at fork (see spawner.py):
# plain classes and os.path, no dataclasses, pathlib, secrets or re.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PARENT_NAME = "nsbox"
#: Per-sandbox cgroups are `<prefix>-<owner pid>-<random>`: the spawner's, and isolate mode's (whose
#: owner is the pytest process).
SPAWNER_PREFIX = "nsbox"
TEST_PREFIX = "nsbox-test"
# Set by the test process for the spawner (see systemd.py): the scope it was started in, or why a
# scope was wanted but could not be had.
SCOPE_UNIT_ENV = "NSBOX_SCOPE_UNIT"
SCOPE_NOTE_ENV = "NSBOX_SCOPE_NOTE"
# Set by isolate mode in an isolated test whose own cgroup caps its processes: a sandbox made in
# there, where the cgroup tree is read-only, is still capped by it (with the test, not alone).
ENCLOSING_ENV = "NSBOX_ENCLOSING_PIDS_MAX"


class CapPlan:
    """The mechanism this spawner uses, and where its cgroups go."""

    __slots__ = ("mechanism", "parents", "note", "owns_parents")

    def __init__(self, mechanism: str, parents: dict[str, str] | None = None, note: str = "",
                 owns_parents: bool = True):
        self.mechanism = mechanism          # cgroup2 | cgroup1 | rlimit | enclosing | none
        self.parents = dict(parents or {})  # controller -> parent cgroup dir
        self.note = note
        # False for a scope or a directory the user delegated: not ours to remove.
        self.owns_parents = owns_parents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CapPlan) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"CapPlan({self.mechanism!r}, {self.parents!r}, {self.note!r})"

    @property
    def memory_mechanism(self) -> str:
        if "memory" in self.parents:
            return self.mechanism
        return "rlimit"  # RLIMIT_AS works for everyone

    def describe(self) -> str:
        note = self.note
        if self.mechanism in ("cgroup2", "cgroup1"):
            where = self.parents.get("pids", "")
            if note.startswith("systemd scope "):
                where, _, note = note.partition("; ")  # the unit says more than its long path
            text = f"PIDs capped by {self.mechanism} ({where})"
        elif self.mechanism == "rlimit":
            text = "PIDs capped by RLIMIT_NPROC in the sandbox's user namespace"
        elif self.mechanism == "enclosing":
            text = "PIDs capped by the cgroup of the isolated test this runs in"
        else:
            text = "PIDs NOT capped"
        memory = "cgroup" if self.memory_mechanism.startswith("cgroup") else "RLIMIT_AS per process"
        text += f"; memory capped by {memory}"
        return text + (f" ({note})" if note else "")

    def to_json(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "parents": self.parents, "note": self.note,
                "owns_parents": self.owns_parents}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CapPlan:
        return cls(data["mechanism"], dict(data.get("parents", {})), data.get("note", ""),
                   data.get("owns_parents", True))


# -- choosing a mechanism ------------------------------------------------------------------------
def detect(euid: int | None = None, mountinfo: str | None = None,
           environ: dict[str, str] | None = None, proc_cgroup: str | None = None) -> CapPlan:
    """Pick the best mechanism this process can use.  Arguments exist for tests on fake trees.

    `euid` is 0 for the host's (global) root, whatever user namespace it is in: the kernel exempts
    global root from RLIMIT_NPROC, and only global root may write the top of the cgroup tree.
    """
    euid = (0 if is_global_root() else max(1, os.geteuid())) if euid is None else euid
    mountinfo = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
    environ = dict(os.environ) if environ is None else environ
    v2_root, v1_roots = cgroup_mounts(mountinfo)
    reasons = []
    # Why a cgroup that was asked for (a systemd scope, NSBOX_CGROUP_PARENT) is not used: worth
    # saying whatever mechanism we end up with.
    notable = [environ[SCOPE_NOTE_ENV]] if environ.get(SCOPE_NOTE_ENV) else []

    candidates = []  # (parent, note, ours to remove)
    unit = environ.get(SCOPE_UNIT_ENV)
    if unit and v2_root:
        try:
            candidates.append((enter_scope(v2_root, unit, proc_cgroup), f"systemd scope {unit}", False))
        except OSError as exc:
            notable.append(f"cannot use the systemd scope {unit}: {exc.strerror or exc}")
    delegated = environ.get("NSBOX_CGROUP_PARENT")
    if delegated:
        candidates.append((delegated, "NSBOX_CGROUP_PARENT", False))
    if euid == 0 and v2_root:
        candidates.append((os.path.join(v2_root, PARENT_NAME), "", True))
    for parent, note, ours in candidates:
        why = _prepare_v2_parent(parent)
        if why is None:
            controllers = ("pids", "memory") if "memory" in _enabled(parent) else ("pids",)
            return CapPlan("cgroup2", dict.fromkeys(controllers, parent),
                           "; ".join(filter(None, [note, *notable])), ours)
        (reasons if ours else notable).append(why)

    parents = {}
    for controller in ("pids", "memory"):
        root = v1_roots.get(controller)
        if root and os.access(root, os.W_OK):
            parent = os.path.join(root, PARENT_NAME)
            try:
                os.makedirs(parent, exist_ok=True)
                parents[controller] = parent
            except OSError as exc:
                reasons.append(f"cannot create {parent}: {exc.strerror}")
    if "pids" in parents:
        return CapPlan("cgroup1", parents, note="; ".join(notable))
    if euid != 0:
        return CapPlan("rlimit", note="; ".join(notable + reasons) or "no writable cgroup")
    enclosing = environ.get(ENCLOSING_ENV, "")
    if enclosing.isdigit():
        return CapPlan("enclosing", note=f"at {enclosing} processes, shared with the test")
    reasons.append("no writable cgroup with the pids controller, and RLIMIT_NPROC does not bind root")
    return CapPlan("none", note="; ".join(notable + reasons))


def enter_scope(v2_root: str, unit: str, proc_cgroup: str | None = None) -> str:
    """Move this process into a leaf of the scope it was started in; return the scope's directory.

    Controllers can be enabled below a cgroup only while no process sits in it directly, so the
    spawner steps aside into `<scope>/spawner` and its sandboxes' cgroups become its siblings.
    """
    proc_cgroup = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    own = next((line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::")), "")
    scope = os.path.join(v2_root, own.lstrip("/"))
    if os.path.basename(scope) != unit:
        raise OSError(errno.ESRCH, f"this process is in {own or 'no v2 cgroup'}, not in {unit}")
    leaf = os.path.join(scope, "spawner")
    if not os.path.isdir(leaf):
        os.mkdir(leaf)
    with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return scope


def is_global_root(owner_of_sysctls: int | None = None, euid: int | None = None) -> bool:
    """Whether our effective uid is the host's root, however deep the user namespace we are in.

    A user namespace shows only one level of its uid map, so root inside a sandbox (or a rootless
    container) looks like root.  But the kernel's own sysctls belong to the host's root, and a file
    whose owner is unmapped here shows as the overflow uid: they show as owned by our euid only if
    we are that root.  Arguments exist for tests.
    """
    euid = os.geteuid() if euid is None else euid
    if owner_of_sysctls is None:
        try:
            owner_of_sysctls = os.stat("/proc/sys/kernel/ostype").st_uid
        except OSError:
            # The initial namespace's whole map: a nested one may also begin "0 0" (a sandbox
            # whose parent namespace names its user 0).
            owner_of_sysctls = 0 if _read("/proc/self/uid_map").split() == ["0", "0", "4294967295"] else -1
    return euid == 0 and owner_of_sysctls == 0


def cgroup_mounts(mountinfo: str) -> tuple[str | None, dict[str, str]]:
    """The cgroup2 mount point and the v1 mount point of each controller, from mountinfo."""
    v2_root = None
    v1: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, options = fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2" and v2_root is None:
            v2_root = mount_point
        elif fstype == "cgroup":
            for controller in ("pids", "memory"):
                if controller in options:
                    v1.setdefault(controller, mount_point)
    return v2_root, v1


def _prepare_v2_parent(parent: str) -> str | None:
    """Make `parent` ready to hold per-sandbox cgroups; None if it is, else why not.

    A new cgroup offers its children what its parent enabled in cgroup.subtree_control.
    """
    try:
        if os.path.exists(parent):
            available = _controllers(parent)
        else:
            grandparent = os.path.dirname(parent)
            _enable(grandparent, ("pids", "memory"), _controllers(grandparent))
            available = _enabled(grandparent)
            if "pids" not in available:
                return f"the pids controller is not available below {grandparent}"
            os.mkdir(parent)
        _enable(parent, ("pids", "memory"), available)
        if "pids" not in _enabled(parent):
            return f"cannot enable the pids controller below {parent}"
    except OSError as exc:
        return f"{parent}: {exc.strerror}"
    return None


def _controllers(path: str) -> list[str]:
    return _read(os.path.join(path, "cgroup.controllers")).split()


def _enabled(path: str) -> list[str]:
    return [c.lstrip("+") for c in _read(os.path.join(path, "cgroup.subtree_control")).split()]


def _enable(path: str, wanted: tuple[str, ...], available: list[str]) -> None:
    chosen = [f"+{c}" for c in wanted if c in available]
    if chosen and not set(c[1:] for c in chosen) <= set(_enabled(path)):
        try:
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join(chosen))
        except OSError:
            pass  # judged by what _enabled() reads back


# -- one sandbox's cgroup --------------------------------------------------------------------------
class SandboxCgroup:
    __slots__ = ("version", "dirs")

    def __init__(self, version: int, dirs: dict[str, str]):
        self.version = version
        self.dirs = dirs  # controller -> cgroup dir (the same dir twice for v2)

    @classmethod
    def create(cls, plan: CapPlan, owner_pid: int, pids_max: int | None,
               memory_max: int | None, prefix: str = SPAWNER_PREFIX) -> SandboxCgroup | None:
        if plan.mechanism not in ("cgroup1", "cgroup2"):
            return None
        name = f"{prefix}-{owner_pid}-{os.urandom(6).hex()}"
        # A memory cgroup only when memory is capped: removing one costs milliseconds (memcg
        # offlining), which every sandbox would otherwise pay on close.
        dirs = {controller: os.path.join(parent, name) for controller, parent in plan.parents.items()
                if controller == "pids" or (controller == "memory" and memory_max)}
        group = cls(2 if plan.mechanism == "cgroup2" else 1, dirs)
        for path in dict.fromkeys(dirs.values()):
            try:
                os.mkdir(path)
            except FileNotFoundError:
                # Another session's last spawner removed the shared parent just now: remake it.
                if group.version == 2:
                    _prepare_v2_parent(os.path.dirname(path))  # the mkdir below says if it failed
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                os.mkdir(path)
        if pids_max:
            group._write("pids", "pids.max", str(pids_max))
        if memory_max and "memory" in dirs:
            if group.version == 2:
                group._write("memory", "memory.max", str(memory_max))
                group._write("memory", "memory.swap.max", "0", optional=True)
            else:
                group._write("memory", "memory.limit_in_bytes", str(memory_max))
                group._write("memory", "memory.memsw.limit_in_bytes", str(memory_max), optional=True)
        return group

    def open(self) -> int:
        """A descriptor of the (v2) cgroup directory, for clone3's CLONE_INTO_CGROUP."""
        return os.open(self.dirs["pids"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def join(self, pid: int = 0) -> None:
        """Move `pid` (0: the caller) into every controller's cgroup."""
        for path in set(self.dirs.values()):
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(pid or os.getpid()))

    def _write(self, controller: str, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.dirs[controller], name), "w") as f:
                f.write(value)
        except FileNotFoundError:
            if not optional:
                raise

    def stats(self) -> dict[str, int]:
        """Counters that explain a death: pids cap hits, OOM kills, peaks where the kernel keeps them."""
        out: dict[str, int] = {}
        pids = self.dirs.get("pids")
        if pids:
            out["pids_current"] = _int(_read(f"{pids}/pids.current"))
            out["pids_max_hits"] = _keyed(_read(f"{pids}/pids.events"), "max")
            peak = _read(f"{pids}/pids.peak")
            if peak:
                out["pids_peak"] = _int(peak)
        memory = self.dirs.get("memory")
        if memory:
            if self.version == 2:
                out["oom_kills"] = _keyed(_read(f"{memory}/memory.events"), "oom_kill")
                out["memory_peak"] = _int(_read(f"{memory}/memory.peak"))
            else:
                out["oom_kills"] = _keyed(_read(f"{memory}/memory.oom_control"), "oom_kill")
                out["memory_peak"] = _int(_read(f"{memory}/memory.max_usage_in_bytes"))
        return out

    def destroy(self) -> None:
        """Kill whatever is left inside and remove the cgroup directories."""
        destroy_dirs(list(self.dirs.values()), self.version)


def destroy_dirs(dirs: list[str], version: int) -> None:
    for path in dict.fromkeys(dirs):
        if not os.path.isdir(path):
            continue
        if version == 2 and os.path.exists(f"{path}/cgroup.kill"):
            try:
                with open(f"{path}/cgroup.kill", "w") as f:
                    f.write("1")
            except OSError:
                pass
        deadline = time.monotonic() + 5
        pause = 0.0001  # the last task may be a zombie until its parent reaps it: microseconds
        while True:
            procs = [int(p) for p in _read(f"{path}/cgroup.procs").split()]
            for pid in procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(path)
                break
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.01)


def remove_parents(plan: CapPlan) -> None:
    """Remove the shared `nsbox` parents if no other session uses them (EBUSY otherwise)."""
    if not plan.owns_parents:
        return  # a systemd scope (systemd removes it) or the user's own delegated cgroup
    for parent in dict.fromkeys(plan.parents.values()):
        try:
            os.rmdir(parent)
        except OSError:
            pass


def sweep_stale(plan: CapPlan) -> list[str]:
    """Remove the cgroups of spawners that no longer exist (killed before they could clean up)."""
    removed = []
    version = 2 if plan.mechanism == "cgroup2" else 1
    for parent in dict.fromkeys(plan.parents.values()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            owner = _owner(name)
            if owner is not None and not _owner_alive(*owner):
                try:
                    destroy_dirs([os.path.join(parent, name)], version)
                    removed.append(os.path.join(parent, name))
                except OSError:
                    pass
    return removed


def _owner(name: str) -> tuple[int, str] | None:
    """(owner PID, prefix) of a cgroup named `<prefix>-<pid>-<hex>` by us, or None for any other."""
    prefix, _, rest = name.rpartition("-")
    prefix, _, pid = prefix.rpartition("-")
    if prefix in (SPAWNER_PREFIX, TEST_PREFIX) and pid.isdigit() and rest and \
            all(c in "0123456789abcdef" for c in rest):
        return int(pid), prefix
    return None


def _owner_alive(pid: int, prefix: str) -> bool:
    """The process that made a cgroup is alive (a zombie will clean up nothing): a spawner, by its
    name, or for an isolated test's cgroup the pytest process (no name to check: a reused PID then
    keeps an empty cgroup until that process exits)."""
    stat = _read(f"/proc/{pid}/stat")
    state = stat.rsplit(")", 1)[1].split()[0] if ")" in stat else "Z"
    if state == "Z":
        return False
    return prefix == TEST_PREFIX or _read(f"/proc/{pid}/comm").strip() == "nsbox-spawner"


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _keyed(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


# -- the tmpfs budget ------------------------------------------------------------------------------
#: Without a memory cap a sandbox's files get this much, or an eighth of the RAM if less.
DEFAULT_TMPFS_SIZE = 1 << 30
MIN_TMPFS_SIZE = 1 << 20  # settings.MIN_TMPFS_SIZE; settings is not loaded here (dataclasses)


def default_tmpfs_size() -> int:
    """1 GiB, or an eighth of the RAM if less, in whole MiB (what tmpfs would round it to anyway)."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return min(DEFAULT_TMPFS_SIZE, (int(line.split()[1]) * 1024 // 8) >> 20 << 20)
    return DEFAULT_TMPFS_SIZE


def tmpfs_size(explicit: int | None, memory_max: int | None, default: int) -> int:
    """A sandbox's tmpfs budget: as asked, else half of memory_max — so that files filling it end
    in ENOSPC, leaving the processes room, rather than in an out-of-memory kill — else `default`."""
    if explicit:
        return explicit
    if memory_max:
        return max(MIN_TMPFS_SIZE, min(default, memory_max // 2))
    return default
