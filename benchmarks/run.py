"""pytest-nsbox benchmarks: one command, every figure of docs/performance.md from one run.

    python benchmarks/run.py            # full run, as yourself: rewrites docs/performance.md and .png
    python benchmarks/run.py --quick    # a smoke run of every benchmark (CI), writes nothing
    sudo python benchmarks/run.py --as USER --python USERS_VENV/bin/python
                                        # every measurement as USER; root only reads the idle
                                        # sandboxes' PSS (their init is not dumpable)

Rules, so that the figures do not flatter us:
- Contenders run in blocks, interleaved: a block of N sandboxes of one contender, then a block of
  the next, round after round.  A block makes the prebuilt spares keep up with their own use, as in
  a test run, instead of being rebuilt during the other contenders' turns.
- Every contender lives in a process of its own, including nsbox without spares, so all of them are
  measured in the same rounds.
- CPU per sandbox counts every process: the contender's own, its children's, and for nsbox the
  spawner and every init it made, live or reaped, read after the spawner has rebuilt its spares —
  background work is charged to the sandboxes it serves.
- Memory per idle sandbox is the PSS of its processes plus the kernel memory (slab, page tables,
  stacks) that making them added.
Needs bubblewrap and util-linux's unshare for the comparisons (`apt-get install bubblewrap`) and
matplotlib for the plot (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_TARBALL = REPO.parent / "shared/alpine-mirror/v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
# Issue 13's targets (medians, unprivileged, interleaved in one run), and the earlier ones.
TARGETS = {"fresh_vs_bwrap": 0.8, "fresh_stretch": 0.7, "nospare_vs_bwrap": 1.2, "cpu_vs_bwrap": 1.5,
           "fixture_trivial_ms": 2.5, "fixture_20ms_ms": 1.5, "plugin_ms": 10.0, "idle_mb": 1.5,
           "warm_vs_subprocess": 2.0, "rss_flatness": 1.2, "warm_hit_ms": 5.0, "cold_extract_s": 0.5,
           "isolate_ms": 5.0, "image_vs_tree": 1.10}
BENCH_ENV_DROP = ("PYTHONDONTWRITEBYTECODE",)  # users have bytecode caches: measure with them


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# -- contenders: one persistent process each --------------------------------------------------------
CONTENDERS = {
    "nsbox": {},
    "nsbox, no spares": {"NSBOX_PREFORK": "0"},
    "nsbox, seccomp off": {},
    "nsbox, cached 3-layer image": {},
    "bwrap --ro-bind": {},
    "bwrap --tmp-overlay": {},
    "unshare -Urmpf": {},
    "subprocess.run(true)": {},
}


class Contender:
    """A worker process that makes blocks of sandboxes on request and reports time and CPU."""

    def __init__(self, name: str, tree: str, runner: list[str], extra_env: dict[str, str]):
        self.name = name
        env = {k: v for k, v in os.environ.items() if k not in BENCH_ENV_DROP}
        self.process = subprocess.Popen(runner + [__file__, "--worker", "contender",
                                                  "--name", name, "--tree", tree],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**env, **extra_env})
        self.latencies: list[float] = []
        self.cpu = 0.0
        self.count = 0

    def block(self, n: int) -> None:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        self.latencies += result["latencies"]
        self.cpu += result["cpu"]
        self.count += n

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait()

    def summary(self) -> dict:
        return {"median_ms": median_ms(self.latencies), "cpu_ms": self.cpu / self.count * 1000,
                "samples": self.latencies}


def available_contenders() -> dict[str, str]:
    """name -> why it is left out ('' if it runs)."""
    out = dict.fromkeys(CONTENDERS, "")
    if not shutil.which("bwrap"):
        out["bwrap --ro-bind"] = out["bwrap --tmp-overlay"] = "bubblewrap is not installed"
    elif "--tmp-overlay" not in subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout:
        out["bwrap --tmp-overlay"] = f"absent: {bwrap_version()} has no --tmp-overlay (0.9+)"
    if not shutil.which("unshare"):
        out["unshare -Urmpf"] = "util-linux's unshare is not installed"
    return out


def bench_fresh(tree: str, runner: list[str], rounds: int, block: int) -> dict:
    skipped = {name: why for name, why in available_contenders().items() if why}
    contenders = [Contender(name, tree, runner, env) for name, env in CONTENDERS.items() if name not in skipped]
    try:
        for contender in contenders:
            contender.block(max(3, block // 5))  # warm up: caches, the spawner, the first spares
            contender.latencies.clear()
            contender.cpu, contender.count = 0.0, 0
        for _ in range(rounds):
            for contender in contenders:
                contender.block(block)
    finally:
        for contender in contenders:
            contender.close()
    return {"contenders": {c.name: c.summary() for c in contenders}, "skipped": skipped,
            "rounds": rounds, "block": block}


def run_contender(name: str, tree: str) -> None:
    """Worker: read a block size per line, make that many sandboxes, report latency and CPU."""
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    rootfs = _image_over(tree) if name == "nsbox, cached 3-layer image" else Rootfs(tree, Path(tree))
    argv = {"bwrap --ro-bind": ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", tree, "/",
                                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true"],
            "bwrap --tmp-overlay": ["bwrap", "--unshare-all", "--die-with-parent", "--overlay-src", tree,
                                    "--tmp-overlay", "/", "--proc", "/proc", "--dev", "/dev",
                                    "--tmpfs", "/tmp", "/bin/true"],
            "unshare -Urmpf": ["unshare", "-Urmpf", "--mount-proc", "/bin/true"],
            "subprocess.run(true)": ["/bin/true"]}.get(name)
    seccomp = name != "nsbox, seccomp off"

    def once() -> None:
        if argv is not None:
            subprocess.run(argv, check=True)
        else:
            with Sandbox(rootfs=rootfs, seccomp=seccomp) as box:
                box.run(["/bin/true"])

    for line in sys.stdin:
        n = int(line)
        cpu_before = tree_cpu()
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            once()
            latencies.append(time.perf_counter() - started)
        settle()
        print(json.dumps({"latencies": latencies, "cpu": tree_cpu() - cpu_before}), flush=True)


def _image_over(tree: str):  # -> Rootfs
    """An OCI image of three layers — the Alpine tree, then two small ones, a whiteout among them —
    pulled into a cache of its own before the clock starts, as the Alpine tree is extracted before."""
    import atexit
    import tarfile

    from pytest_nsbox.rootfs.store import RootfsStore
    from tests.images import Entry, layer_tar, oci_layout
    work = Path(tempfile.mkdtemp(prefix="nsbox-bench-image-"))
    atexit.register(shutil.rmtree, work, True)
    base = work / "base.tar"
    with tarfile.open(base, "w") as tar:
        tar.add(tree, arcname=".")
    layers = [base.read_bytes(), layer_tar([Entry("srv/app", b"app\n"), Entry("etc/app.conf", b"x = 1\n")]),
              layer_tar([Entry("etc/.wh.motd", b""), Entry("srv/version", b"2\n")])]
    oci_layout(work / "layout", layers)
    store = RootfsStore(work / "cache", offline=True)
    atexit.register(store.prune)  # first: trees of many ids are removed as their root (mapped.py)
    return store.resolve(f"oci:{work / 'layout'}")


def spawner_pid() -> int | None:
    from pytest_nsbox.engine import client
    spawner = client.Spawner._instance
    return spawner.process.pid if spawner is not None and spawner.alive() else None


def tree_cpu() -> float:
    """CPU seconds of this process, its reaped children, and the spawner with all its inits."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    pid = spawner_pid()
    if pid is not None:
        total += _proc_cpu(pid, with_reaped=True)
        for child in _children(pid):
            total += _proc_cpu(child, with_reaped=True)
    return total


def settle(quiet: float = 0.03, limit: float = 2.0) -> None:
    """Wait until the spawner has finished rebuilding its spares (its CPU stops moving)."""
    pid = spawner_pid()
    if pid is None:
        return
    deadline = time.monotonic() + limit
    last = -1.0
    while time.monotonic() < deadline:
        now = _proc_cpu(pid, with_reaped=True) + sum(_proc_cpu(c, with_reaped=True) for c in _children(pid))
        if now == last:
            return
        last = now
        time.sleep(quiet)


def _proc_cpu(pid: int, with_reaped: bool) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if with_reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# -- a command in a warm sandbox ---------------------------------------------------------------------
def bench_warm(tree: str, runner: list[str], rounds: int, block: int) -> dict:
    return _worker(runner, tree, "warm", rounds, block)  # the block size travels as --ballast-mb


def run_warm(tree: str, rounds: int, block: int) -> dict:
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    samples: dict[str, list[float]] = {"nsbox run": [], "subprocess.run": []}
    with Sandbox(rootfs=Rootfs(tree, Path(tree))) as box:
        runs = {"nsbox run": lambda: box.run(["/bin/true"]),
                "subprocess.run": lambda: subprocess.run(["/bin/true"], capture_output=True)}
        for run in runs.values():
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                for _ in range(block):
                    started = time.perf_counter()
                    run()
                    samples[name].append(time.perf_counter() - started)
    return {"medians_ms": {k: median_ms(v) for k, v in samples.items()}}


def _worker(runner: list[str], tree: str, kind: str, count: int, ballast_mb: int = 0,
            env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(runner + [__file__, "--worker", kind, "--tree", tree,
                                   "--count", str(count), "--ballast-mb", str(ballast_mb)],
                         check=True, capture_output=True, text=True, env={**_pytest_env(tree), **(env or {})})
    return json.loads(out.stdout)


# -- whole pytest runs: the plugin's fixed cost, the fixture's overhead -----------------------------
def pytest_runs(runs: dict[str, list[str]], cwd: str, repeats: int, runner: list[str],
                env: dict[str, str], cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall time of each pytest run, the runs interleaved; `cpu` gets the CPU time of each (the
    pytest process and everything it reaped: spawner, sandboxes, isolated tests)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    base = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", cwd]
    for name, args in runs.items():  # warm up: bytecode, the page cache
        subprocess.run(runner + base + args, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    for _ in range(repeats):
        for name, args in runs.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(runner + base + args, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if cpu is not None:
                cpu.setdefault(name, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return times


def bench_plugin(tree: str, runner: list[str], repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="nsbox-bench-") as tmp:
        os.chmod(tmp, 0o755)
        Path(tmp, "test_plain.py").write_text("def test_a():\n    pass\n")
        env = _pytest_env(tree)
        times = pytest_runs({"-p no:nsbox": ["-p", "no:nsbox", "test_plain.py"], "plugin": ["test_plain.py"]},
                            tmp, repeats, runner, env)
    plain, with_plugin = (statistics.median(times[k]) for k in ("-p no:nsbox", "plugin"))
    return {"plain_ms": plain * 1000, "plugin_ms": with_plugin * 1000, "cost_ms": (with_plugin - plain) * 1000}


def bench_fixture(tree: str, runner: list[str], tests: int, repeats: int, sleep_ms: int) -> dict:
    body = f"    time.sleep({sleep_ms / 1000})\n" if sleep_ms else "    pass\n"
    with tempfile.TemporaryDirectory(prefix="nsbox-bench-") as tmp:
        os.chmod(tmp, 0o755)
        Path(tmp, "test_plain.py").write_text("import time\n" + "".join(f"def test_{i}():\n{body}" for i in range(tests)))
        Path(tmp, "test_box.py").write_text("import time\n" + "".join(f"def test_{i}(sandbox):\n{body}" for i in range(tests)))
        times = pytest_runs({"without plugin": ["-p", "no:nsbox", "test_plain.py"], "sandbox fixture": ["test_box.py"]},
                            tmp, repeats, runner, _pytest_env(tree))
    plain, boxed = (statistics.median(times[k]) for k in ("without plugin", "sandbox fixture"))
    return {"tests": tests, "sleep_ms": sleep_ms, "plain_s": plain, "sandbox_s": boxed,
            "overhead_ms_per_test": (boxed - plain) / tests * 1000}


def bench_isolate(tree: str, runner: list[str], tests: int, repeats: int, ballast_mb: int) -> dict:
    """--nsbox-isolate against a plain run of the same trivial tests, in a pytest process grown to
    ~`ballast_mb` MB more by its conftest (the fork copies page tables; the child's writes copy pages)."""
    with tempfile.TemporaryDirectory(prefix="nsbox-bench-") as tmp:
        os.chmod(tmp, 0o755)
        Path(tmp, "conftest.py").write_text(
            f"BALLAST = bytearray({ballast_mb} << 20)\n"
            "BALLAST[::4096] = b'\\x01' * len(range(0, len(BALLAST), 4096))  # resident, private\n")
        Path(tmp, "test_many.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(tests)))
        cpu: dict[str, list[float]] = {}
        times = pytest_runs({"plain": ["test_many.py"], "isolated": ["--nsbox-isolate", "test_many.py"]},
                            tmp, repeats, runner, _pytest_env(tree), cpu)
    plain, isolated = (statistics.median(times[k]) for k in ("plain", "isolated"))
    plain_cpu, isolated_cpu = (statistics.median(cpu[k]) for k in ("plain", "isolated"))
    return {"tests": tests, "ballast_mb": ballast_mb, "plain_s": plain, "isolated_s": isolated,
            "overhead_ms_per_test": (isolated - plain) / tests * 1000,
            "cpu_ms_per_test": (isolated_cpu - plain_cpu) / tests * 1000}


# -- published ports: forwarded into a private network vs a direct loopback connection ----------------
SERVERS = """
import socket, sys, threading
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)
def sink(c):
    while c.recv(1 << 20):
        pass
    c.close()
def serve(port, handle):
    s = socket.create_server(("127.0.0.1", port))
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(int(sys.argv[2]), sink), daemon=True).start()
serve(int(sys.argv[1]), echo)
"""


def bench_ports(tree: str, runner: list[str], rounds: int, megabytes: int) -> dict:
    return _worker(runner, tree, "ports", rounds, megabytes)


def run_ports(rounds: int, megabytes: int) -> dict:
    """Round trips of 64 bytes and a one-way transfer, to servers on the host's loopback and to the
    same servers in a sandbox's private network through published ports; interleaved rounds."""
    from pytest_nsbox import Sandbox
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    results: dict[str, dict[str, list[float]]] = {k: {"rtt_us": [], "mb_s": [], "cpu_s_per_gb": []}
                                                  for k in ("direct loopback", "published port")}
    free = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ports = [s.getsockname()[1] for s in free]
    for s in free:
        s.close()
    host_servers = subprocess.Popen([python, "-c", SERVERS, *map(str, ports)])
    try:
        with Sandbox(rootfs="host", network="none", pids_max=64) as box:
            box.spawn([python, "-c", SERVERS, "8080", "8081"])
            forwarded = (box.wait_for_port(8080, timeout=20), box.wait_for_port(8081, timeout=20))
            _wait_for(("127.0.0.1", ports[0]))
            targets = {"direct loopback": (("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])),
                       "published port": forwarded}
            for _ in range(rounds):
                for name, (echo, sink) in targets.items():
                    results[name]["rtt_us"].append(_round_trips(echo, 500))
                    seconds, cpu = _transfer(sink, megabytes)
                    results[name]["mb_s"].append(megabytes / seconds)
                    results[name]["cpu_s_per_gb"].append(cpu / megabytes * 1024)
    finally:
        host_servers.kill()
        host_servers.wait()
    return {name: {k: statistics.median(v) for k, v in data.items()} for name, data in results.items()}


def _wait_for(address: tuple[str, int]) -> None:
    for _ in range(200):
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)


def _round_trips(address: tuple[str, int], count: int) -> float:
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, times = b"x" * 64, []
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _transfer(address: tuple[str, int], megabytes: int) -> tuple[float, float]:
    """Seconds to push `megabytes` through to the sink and see it close; the CPU this process (the
    client and, for a published port, the relay's threads) spent on it."""
    chunk = b"\0" * (1 << 20)
    cpu = time.process_time()
    started = time.perf_counter()
    with socket.create_connection(address) as sock:
        for _ in range(megabytes):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    return time.perf_counter() - started, time.process_time() - cpu


def _pytest_env(tree: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BENCH_ENV_DROP}
    return {**env, "NSBOX_ROOTFS": tree, "PYTHONPATH": str(REPO)}


# -- scaling: the owner's size, and threads making sandboxes at once --------------------------------
def bench_scaling(tree: str, runner: list[str], rounds: int, sizes_mb: list[int]) -> dict:
    by_size = {f"{size} MB": _worker(runner, tree, "owner", rounds, size) for size in sizes_mb}
    medians = [v["median_ms"] for v in by_size.values()]
    # (the thread count travels as --ballast-mb: one integer argument is all a worker takes)
    concurrency = {threads: _worker(runner, tree, "threads", max(rounds // 2, 10), threads) for threads in (1, 2, 4)}
    return {"by_owner_rss": by_size, "spread": max(medians) / min(medians), "concurrency": concurrency}


def run_owner(tree: str, count: int, ballast_mb: int) -> dict:
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    ballast = bytearray(ballast_mb << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # resident, as a big test process would be
    rootfs = Rootfs(tree, Path(tree))
    samples = []
    for i in range(count + 5):
        started = time.perf_counter()
        with Sandbox(rootfs=rootfs) as box:
            box.run(["/bin/true"])
        if i >= 5:
            samples.append(time.perf_counter() - started)
    return {"rss_mb": _status_kb("VmRSS") / 1024, "median_ms": median_ms(samples)}


def run_threads(tree: str, per_thread: int, threads: int) -> dict:
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    rootfs = Rootfs(tree, Path(tree))
    latencies: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        for _ in range(per_thread):
            started = time.perf_counter()
            with Sandbox(rootfs=rootfs) as box:
                box.run(["/bin/true"])
            with lock:
                latencies.append(time.perf_counter() - started)

    Sandbox(rootfs=rootfs).start().close()
    started = time.perf_counter()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"median_ms": median_ms(latencies), "sandboxes_per_s": len(latencies) / (time.perf_counter() - started)}


# -- the rootfs store ---------------------------------------------------------------------------------
def bench_rootfs(runner: list[str], tarball: Path, cache: Path, repeats: int) -> dict:
    return _worker(runner, str(tarball), "rootfs", repeats, env={"NSBOX_CACHE_DIR": str(cache)})


def run_rootfs(tarball: Path, cache: Path, repeats: int) -> dict:
    from pytest_nsbox.rootfs.archive import extract
    from pytest_nsbox.rootfs.store import RootfsStore
    cold = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            extract(tarball, Path(tmp))
            cold.append(time.perf_counter() - started)
    hits, local_hits = [], []
    for _ in range(repeats * 20):
        if _pinned_cached(cache):
            started = time.perf_counter()
            RootfsStore(cache, offline=True).resolve("alpine:3.20.3")
            hits.append(time.perf_counter() - started)
        started = time.perf_counter()
        RootfsStore(cache, offline=True).resolve(str(tarball))
        local_hits.append(time.perf_counter() - started)
    return {"cold_extract_s": statistics.median(cold), "warm_hit_ms": median_ms(hits) if hits else None,
            "local_tarball_hit_ms": median_ms(local_hits)}


def _pinned_cached(cache: Path) -> bool:
    return any(cache.glob("trees/sha256-d4e6fd67dcf7*"))


# -- cold pulls from a registry on 127.0.0.1 ----------------------------------------------------------
SERVICE_LAYOUT = Path("/var/tmp/nsbox-images/redis")  # .ci/run builds it: Debian + redis-server, one layer


def bench_pull(runner: list[str], tarball: Path, rounds: int) -> dict:
    """Pull one image from a local docker-registry into an empty cache, interleaved with `skopeo
    copy` of it to an OCI layout (download and verify, no extraction), and with nsbox making the
    same image's trees from a layout on disk (no download)."""
    missing = [tool for tool in ("docker-registry", "skopeo") if not shutil.which(tool)]
    if missing:
        return {"skipped": f"needs {' and '.join(missing)} (Debian packages docker-registry, skopeo)"}
    sys.path.insert(0, str(REPO))
    from tests.images import alpine_layer, app_layers, oci_layout
    from tests.registry import start_registry
    work = Path(tempfile.mkdtemp(prefix="nsbox-bench-pull-"))
    os.chmod(work, 0o755)
    registry = start_registry(work / "registry")
    try:
        if (SERVICE_LAYOUT / "index.json").exists():
            layout, what = SERVICE_LAYOUT, "Debian bookworm + redis-server (.ci/run's service image)"
        else:
            layout, what = work / "layout", "Alpine + two small layers"
            oci_layout(layout, [alpine_layer(tarball), *app_layers()])
            subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
        subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:latest",
                        f"docker://{registry.host}/bench/image:latest"], check=True, timeout=300,
                       env={**os.environ, "HOME": str(work)})
        size = sum(f.stat().st_size for f in (layout / "blobs/sha256").iterdir())
        ref = f"docker://{registry.host}/bench/image:latest"
        as_user, python = runner[:-1], runner[-1]
        nsbox = [python, "-m", "pytest_nsbox", "rootfs"]
        contenders = {
            "nsbox rootfs pull docker://": lambda d: nsbox + ["pull", "--cache-dir", f"{d}/cache", ref],
            "skopeo copy docker:// oci:": lambda d: ["skopeo", "--insecure-policy", "copy", "-q",
                                                     "--src-tls-verify=false", ref, f"oci:{d}/layout:latest"],
            "nsbox rootfs pull oci: (extraction alone)": lambda d: nsbox + ["pull", "--cache-dir", f"{d}/cache",
                                                                            f"oci:{layout}:latest"],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        cpu: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, argv in contenders.items():
                seconds, cpu_s = _pull_once(as_user, python, argv, work)
                times[name].append(seconds)
                cpu[name].append(cpu_s)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"image": what, "mb": size / 1e6, "rounds": rounds,
            "contenders": {name: {"s": statistics.median(times[name]), "cpu_s": statistics.median(cpu[name]),
                                  "mb_s": size / 1e6 / statistics.median(times[name])} for name in contenders}}


def _pull_once(as_user: list[str], python: str, argv, work: Path) -> tuple[float, float]:
    """One cold pull into a fresh directory the user owns; its wall and CPU seconds."""
    d = Path(tempfile.mkdtemp(dir=work))
    if as_user:
        shutil.chown(d, as_user[2])  # runuser -u USER --
    env = {**os.environ, "HOME": str(d), "NSBOX_CACHE_DIR": str(d / "cache")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(as_user + argv(d), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if (d / "cache").exists():  # trees of many ids are removed as their root
        subprocess.run(as_user + [python, "-m", "pytest_nsbox", "rootfs", "prune", "--all", "--cache-dir",
                                  str(d / "cache")], check=True, env=env, stdout=subprocess.DEVNULL)
    shutil.rmtree(d)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


# -- memory of idle sandboxes ---------------------------------------------------------------------------
def bench_idle(tree: str, runner: list[str], count: int) -> dict:
    env = {**_pytest_env(tree), "NSBOX_PREFORK": "0"}
    worker = subprocess.Popen(runner + [__file__, "--worker", "idle", "--tree", tree,
                                        "--count", str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert worker.stdout and worker.stdin
    before = json.loads(worker.stdout.readline())  # the spawner exists already
    inits = json.loads(worker.stdout.readline())
    kernel = _kernel_kb() - before["kernel_kb"]
    anon = _anon_kb() - before["anon_kb"]
    pss = [_pss_kb(pid) for pid in inits["pids"]]
    worker.stdin.write("done\n")
    worker.stdin.close()
    worker.wait()
    readable = all(p is not None for p in pss)
    kernel_mb = kernel / 1024 / count
    if readable:
        pss_mb, method = statistics.median(pss) / 1024, "PSS of init (smaps_rollup)"  # type: ignore[type-var]
    else:
        # A normal user cannot read init's PSS (it is not dumpable): what the machine's anonymous
        # memory grew by is the pages the inits wrote, which is their PSS but for shared pages.
        pss_mb, method = anon / 1024 / count, "AnonPages+Shmem growth (init is not dumpable: --as USER for its PSS)"
    return {"sandboxes": count, "pss_mb": pss_mb, "kernel_mb": kernel_mb, "total_mb": pss_mb + kernel_mb,
            "method": method}


def run_idle(tree: str, count: int) -> None:
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    rootfs = Rootfs(tree, Path(tree))
    Sandbox(rootfs=rootfs).start().close()
    time.sleep(0.3)
    print(json.dumps({"kernel_kb": _kernel_kb(), "anon_kb": _anon_kb()}), flush=True)
    boxes = [Sandbox(rootfs=rootfs).start() for _ in range(count)]
    for box in boxes:
        box.run(["true"])  # idle, but used: as a session-scoped sandbox between tests
    time.sleep(0.5)
    print(json.dumps({"pids": [box.init_pid for box in boxes]}), flush=True)
    sys.stdin.readline()
    for box in boxes:
        box.close()


def _meminfo() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}


def _kernel_kb() -> int:
    """Kernel memory that namespaces, mounts and processes take: slab, page tables, stacks."""
    info = _meminfo()
    return info["Slab"] + info["PageTables"] + info["KernelStack"]


def _anon_kb() -> int:
    """Memory processes wrote (their own copies of copy-on-write pages among it), and tmpfs."""
    info = _meminfo()
    return info["AnonPages"] + info["Shmem"]


def _pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- a soak ---------------------------------------------------------------------------------------------
def bench_soak(tree: str, runner: list[str], count: int) -> dict:
    return _worker(runner, tree, "soak", count)


def run_soak(tree: str, count: int) -> dict:
    from pytest_nsbox import Sandbox
    from pytest_nsbox.rootfs.store import Rootfs
    rootfs = Rootfs(tree, Path(tree))

    def once() -> None:
        with Sandbox(rootfs=rootfs) as box:
            box.run(["/bin/true"])

    for _ in range(20):
        once()
    fds_before, rss_before = len(os.listdir("/proc/self/fd")), _status_kb("VmRSS")
    started = time.perf_counter()
    for _ in range(count):
        once()
    return {"sandboxes": count, "seconds": time.perf_counter() - started, "fds_before": fds_before,
            "fds_after": len(os.listdir("/proc/self/fd")), "rss_mb_before": rss_before / 1024,
            "rss_mb_after": _status_kb("VmRSS") / 1024}


# -- reporting ----------------------------------------------------------------------------------------
def bwrap_version() -> str:
    if not shutil.which("bwrap"):
        return "bubblewrap not installed"
    return subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()


def machine(user: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return {"date": time.strftime("%Y-%m-%d"), "kernel": platform.release(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "python": platform.python_version(),
            "bwrap": bwrap_version(), "user": user}


def report(results: dict) -> str:
    m, fresh = results["machine"], results["fresh"]["contenders"]
    bwrap = fresh.get("bwrap --ro-bind")

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f} ×" if b else "n/a"

    def ok(value: float | None, target: float) -> str:
        if value is None:
            return "n/a"
        return "yes" if value <= target else "**no**"

    b_ms, b_cpu = (bwrap["median_ms"], bwrap["cpu_ms"]) if bwrap else (None, None)
    rows = []
    for name, s in fresh.items():
        rows.append((f"fresh sandbox: {name}", f"{s['median_ms']:.2f} ms", f"{s['cpu_ms']:.2f} ms",
                     ratio(s["median_ms"], b_ms), ratio(s["cpu_ms"], b_cpu), "", ""))
    for name, why in results["fresh"]["skipped"].items():
        rows.append((f"fresh sandbox: {name}", why, "", "", "", "", ""))
    ns, no_spare = fresh["nsbox"], fresh["nsbox, no spares"]
    rows += [
        ("**target**: fresh sandbox vs bwrap --ro-bind", f"{ns['median_ms']:.2f} ms", "", ratio(ns["median_ms"], b_ms),
         "", "≤ 0.8 × (stretch 0.7 ×)", ok(ns["median_ms"] / b_ms if b_ms else None, TARGETS["fresh_vs_bwrap"])),
        ("**target**: fresh sandbox without spares vs bwrap", f"{no_spare['median_ms']:.2f} ms", "",
         ratio(no_spare["median_ms"], b_ms), "", "≤ 1.2 ×",
         ok(no_spare["median_ms"] / b_ms if b_ms else None, TARGETS["nospare_vs_bwrap"])),
        ("**target**: CPU per sandbox vs bwrap", "", f"{ns['cpu_ms']:.2f} ms", "", ratio(ns["cpu_ms"], b_cpu),
         "≤ 1.5 ×", ok(ns["cpu_ms"] / b_cpu if b_cpu else None, TARGETS["cpu_vs_bwrap"])),
    ]
    image = fresh.get("nsbox, cached 3-layer image")
    if image:
        rows.append(("**target**: fresh sandbox over a cached 3-layer image vs over the Alpine tree",
                     f"{image['median_ms']:.2f} ms", f"{image['cpu_ms']:.2f} ms",
                     ratio(image["median_ms"], ns["median_ms"]), ratio(image["cpu_ms"], ns["cpu_ms"]), "≤ 1.1 ×",
                     ok(image["median_ms"] / ns["median_ms"], TARGETS["image_vs_tree"])))
    seccomp_off = fresh.get("nsbox, seccomp off")
    if seccomp_off:
        rows.append(("… cost of the seccomp filter (on − off)", f"{ns['median_ms'] - seccomp_off['median_ms']:+.2f} ms",
                     f"{ns['cpu_ms'] - seccomp_off['cpu_ms']:+.2f} ms", "", "", "", ""))
    warm = results["warm"]["medians_ms"]
    rows.append(("a command in a warm sandbox", f"{warm['nsbox run']:.2f} ms", "",
                 f"{warm['nsbox run'] / warm['subprocess.run']:.2f} × subprocess.run ({warm['subprocess.run']:.2f} ms)",
                 "", "≤ 2.0 ×", ok(warm["nsbox run"] / warm["subprocess.run"], TARGETS["warm_vs_subprocess"])))
    for key, target in (("fixture", TARGETS["fixture_trivial_ms"]), ("fixture_20ms", TARGETS["fixture_20ms_ms"])):
        fx = results[key]
        kind = "trivial tests" if not fx["sleep_ms"] else f"{fx['sleep_ms']} ms tests"
        rows.append((f"**target**: `sandbox` fixture overhead, {fx['tests']} {kind}",
                     f"{fx['overhead_ms_per_test']:.2f} ms/test", "",
                     f"{fx['plain_s']:.2f} s without, {fx['sandbox_s']:.2f} s with", "", f"≤ {target:g} ms",
                     ok(fx["overhead_ms_per_test"], target)))
    for key in ("isolate", "isolate_200mb"):
        iso = results[key]
        size = f", pytest {iso['ballast_mb']} MB bigger" if iso["ballast_mb"] else ""
        label = "**target**: " if iso["ballast_mb"] else ""
        rows.append((f"{label}`--nsbox-isolate` overhead, {iso['tests']} trivial tests{size}",
                     f"{iso['overhead_ms_per_test']:.2f} ms/test", f"{iso['cpu_ms_per_test']:.2f} ms/test",
                     f"{iso['plain_s']:.2f} s without, {iso['isolated_s']:.2f} s with", "",
                     "≤ 5 ms at 200 MB" if iso["ballast_mb"] else "",
                     ok(iso["overhead_ms_per_test"], TARGETS["isolate_ms"]) if iso["ballast_mb"] else ""))
    ports = results.get("ports")
    if ports:
        direct, published = ports["direct loopback"], ports["published port"]
        rows.append(("published port: 64-byte round trip", f"{published['rtt_us']:.0f} µs", "",
                     f"{published['rtt_us'] / direct['rtt_us']:.2f} × direct loopback ({direct['rtt_us']:.0f} µs)",
                     "", "", ""))
        rows.append(("published port: throughput", f"{published['mb_s']:.0f} MB/s",
                     f"{published['cpu_s_per_gb']:.2f} s/GB",
                     f"{published['mb_s'] / direct['mb_s']:.2f} × direct loopback ({direct['mb_s']:.0f} MB/s)",
                     f"{direct['cpu_s_per_gb']:.2f} s/GB direct", "", ""))
    plugin = results["plugin"]
    rows.append(("**target**: the plugin's fixed cost per pytest run", f"{plugin['cost_ms']:.1f} ms", "",
                 f"{plugin['plain_ms']:.0f} ms with `-p no:nsbox`", "", "≤ 10 ms", ok(plugin["cost_ms"], TARGETS["plugin_ms"])))
    idle = results["idle"]
    total = idle["total_mb"]
    rows.append((f"**target**: idle sandbox, memory + kernel ({idle['sandboxes']} sandboxes)", f"{total:.2f} MB",
                 "", f"{idle['pss_mb']:.2f} MB by {idle['method']} + kernel {idle['kernel_mb']:.2f} MB", "",
                 "≤ 1.5 MB", ok(total, TARGETS["idle_mb"])))
    sc = results["scaling"]
    for label, v in sc["by_owner_rss"].items():
        rows.append((f"fresh sandbox, owner at {v['rss_mb']:.0f} MB RSS", f"{v['median_ms']:.2f} ms", "", "", "", "", ""))
    rows.append(("… spread from smallest to largest owner", f"{sc['spread']:.2f} ×", "", "", "", "≤ 1.2 ×",
                 ok(sc["spread"], TARGETS["rss_flatness"])))
    for threads, v in sc["concurrency"].items():
        rows.append((f"{threads} thread(s) making sandboxes at once", f"{v['median_ms']:.2f} ms each", "",
                     f"{v['sandboxes_per_s']:.0f} sandboxes/s", "", "", ""))
    rf, soak = results["rootfs"], results["soak"]
    rows += [
        ("cold extraction of the Alpine tarball", f"{rf['cold_extract_s']:.3f} s", "", "", "", "≤ 0.5 s",
         ok(rf["cold_extract_s"], TARGETS["cold_extract_s"])),
        ("warm cache hit (`alpine:3.20.3`, new store)",
         f"{rf['warm_hit_ms']:.2f} ms" if rf["warm_hit_ms"] is not None else "n/a (not cached)", "", "", "", "≤ 5 ms",
         ok(rf["warm_hit_ms"], TARGETS["warm_hit_ms"])),
        ("warm cache hit (local tarball: hashes 3.4 MB)", f"{rf['local_tarball_hit_ms']:.2f} ms", "", "", "", "", ""),
        (f"soak: {soak['sandboxes']} sandboxes in one process", f"{soak['seconds']:.1f} s", "",
         f"fds {soak['fds_before']} → {soak['fds_after']}, RSS {soak['rss_mb_before']:.1f} → {soak['rss_mb_after']:.1f} MB",
         "", "flat", "yes" if soak["fds_after"] <= soak["fds_before"] and soak["rss_mb_after"] - soak["rss_mb_before"] < 5
         else "**no**"),
    ]
    pull = results.get("pull")
    if pull and "skipped" in pull:
        rows.append(("cold pull from a local registry", pull["skipped"], "", "", "", "", ""))
    elif pull:
        c = pull["contenders"]
        ours, skopeo = c["nsbox rootfs pull docker://"], c["skopeo copy docker:// oci:"]
        extract = c["nsbox rootfs pull oci: (extraction alone)"]
        for name, v in c.items():
            rows.append((f"cold pull, {pull['image']} ({pull['mb']:.1f} MB): {name}", f"{v['s']:.2f} s",
                         f"{v['cpu_s']:.2f} s", f"{v['mb_s']:.0f} MB/s", "", "", ""))
        rows.append(("… our cold pull (download, verify, extract) vs skopeo copy (download, verify)",
                     f"{ours['s']:.2f} s", f"{ours['cpu_s']:.2f} s", ratio(ours["s"], skopeo["s"]),
                     ratio(ours["cpu_s"], skopeo["cpu_s"]), "", ""))
        rows.append(("… our extraction from a layout vs skopeo copy", f"{extract['s']:.2f} s", f"{extract['cpu_s']:.2f} s",
                     ratio(extract["s"], skopeo["s"]), ratio(extract["cpu_s"], skopeo["cpu_s"]), "", ""))
    f = results["fresh"]
    head = (f"Measured {m['date']} on Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, "
            f"Python {m['python']}, {m['bwrap']}, as {m['user']}. Medians; the fresh-sandbox contenders in "
            f"{f['rounds']} rounds of blocks of {f['block']}, each in a process of its own; CPU counts every "
            "process involved, spares included.")
    table = ["| what | latency | CPU | compared | CPU compared | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return head + "\n\n" + "\n".join(table) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fresh = results["fresh"]["contenders"]
    names = list(fresh)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    data = [[s * 1000 for s in fresh[n]["samples"]] for n in names]
    try:
        left.boxplot(data, orientation="horizontal", showfliers=False)  # matplotlib >= 3.10
    except TypeError:
        left.boxplot(data, vert=False, showfliers=False)
    left.set_yticks(range(1, len(names) + 1), names)
    left.set_xlabel("ms per sandbox (create, run /bin/true, close), from a Python process")
    left.grid(axis="x", alpha=0.3)
    right.barh(range(1, len(names) + 1), [fresh[n]["cpu_ms"] for n in names])
    right.set_yticks(range(1, len(names) + 1), ["" for _ in names])
    right.set_xlabel("CPU ms per sandbox, all processes")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Per-sandbox cost, {results['machine']['date']}, Linux {results['machine']['kernel']}, "
                 f"as {results['machine']['user']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_markdown(results: dict, path: Path) -> None:
    text = path.read_text() if path.exists() else "<!-- results -->\n<!-- /results -->\n"
    start, end = text.index("<!-- results -->"), text.index("<!-- /results -->")
    path.write_text(text[:start] + "<!-- results -->\n" + report(results) + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few rounds of everything; writes no docs")
    parser.add_argument("--as", dest="user", help="(as root) run every measurement as this user")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter the measurements run in (with --as: one that user may run)")
    parser.add_argument("--tarball", type=Path, default=Path(os.environ.get("NSBOX_BENCH_TARBALL", DEFAULT_TARBALL)))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/latest.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs",
                        help="where performance.md and performance.png are written (full runs)")
    parser.add_argument("--worker")
    parser.add_argument("--name")
    parser.add_argument("--count", type=int)
    parser.add_argument("--tree")
    parser.add_argument("--ballast-mb", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    runner, user = [args.python], pwd.getpwuid(os.getuid()).pw_name
    if args.user:
        if os.getuid() != 0:
            raise SystemExit("--as USER needs root")
        runner, user = ["runuser", "-u", args.user, "--", args.python], args.user
    elif os.getuid() == 0:
        print("note: running as root; the figures that matter are a normal user's (--as USER)", file=sys.stderr)
    q = args.quick
    cache = args.cache_dir or REPO / "rootfs-cache"  # the repository's own, git-ignored cache
    tree = _worker(runner, str(args.tarball), "resolve", 0, env={"NSBOX_CACHE_DIR": str(cache)})["tree"]
    results: dict = {"machine": machine(user), "quick": q}
    steps = [
        ("fresh", lambda: bench_fresh(tree, runner, 2 if q else 6, 10 if q else 50)),
        ("warm", lambda: bench_warm(tree, runner, 2 if q else 6, 10 if q else 50)),
        ("plugin", lambda: bench_plugin(tree, runner, 3 if q else 21)),
        ("fixture", lambda: bench_fixture(tree, runner, 30 if q else 500, 1 if q else 3, 0)),
        ("fixture_20ms", lambda: bench_fixture(tree, runner, 20 if q else 300, 1 if q else 3, 20)),
        ("isolate", lambda: bench_isolate(tree, runner, 20 if q else 300, 1 if q else 3, 0)),
        ("isolate_200mb", lambda: bench_isolate(tree, runner, 20 if q else 300, 1 if q else 3, 200)),
        ("ports", lambda: bench_ports(tree, runner, 2 if q else 5, 64 if q else 512)),
        ("scaling", lambda: bench_scaling(tree, runner, 10 if q else 100, [50, 500] if q else [50, 500, 2000])),
        ("rootfs", lambda: bench_rootfs(runner, args.tarball, cache, 2 if q else 10)),
        ("pull", lambda: bench_pull(runner, args.tarball, 1 if q else 5)),
        ("idle", lambda: bench_idle(tree, runner, 5 if q else 50)),
        ("soak", lambda: bench_soak(tree, runner, 200 if q else 10_000)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        results[name] = step()
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    if not q:
        write_markdown(results, args.docs / "performance.md")
        plot(results, args.docs / "performance.png")
    soak = results["soak"]
    if soak["fds_after"] > soak["fds_before"]:
        print(f"LEAK: descriptors grew from {soak['fds_before']} to {soak['fds_after']}", file=sys.stderr)
        return 1
    return 0


def run_worker(args: argparse.Namespace) -> int:
    if args.worker == "contender":
        run_contender(args.name, args.tree)
    elif args.worker == "owner":
        print(json.dumps(run_owner(args.tree, args.count, args.ballast_mb)))
    elif args.worker == "threads":
        print(json.dumps(run_threads(args.tree, args.count, args.ballast_mb)))
    elif args.worker == "idle":
        run_idle(args.tree, args.count)
    elif args.worker == "ports":
        print(json.dumps(run_ports(args.count, args.ballast_mb)))
    elif args.worker == "soak":
        print(json.dumps(run_soak(args.tree, args.count)))
    elif args.worker == "warm":
        print(json.dumps(run_warm(args.tree, args.count, args.ballast_mb)))
    elif args.worker == "rootfs":
        print(json.dumps(run_rootfs(Path(args.tree), Path(os.environ["NSBOX_CACHE_DIR"]), args.count)))
    elif args.worker == "resolve":
        from pytest_nsbox.rootfs.store import RootfsStore
        print(json.dumps({"tree": str(RootfsStore(os.environ["NSBOX_CACHE_DIR"]).resolve(args.tree).tree)}))
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
