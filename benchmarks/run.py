"""pytest-nsbox benchmarks: run as your normal user, from the repository root.

    python benchmarks/run.py            # full run: writes docs/performance.md and docs/performance.png
    python benchmarks/run.py --quick    # a smoke run of every benchmark (CI), writes nothing

Every comparison is measured in one run, interleaved (one sample of each contender per round), and
reported as medians and ratios.  Needs bubblewrap and util-linux's unshare for the comparisons
(`apt-get install bubblewrap`), and matplotlib for the plot (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_nsbox import Sandbox  # noqa: E402
from pytest_nsbox.archive import extract  # noqa: E402
from pytest_nsbox.rootfs import RootfsStore  # noqa: E402

DEFAULT_TARBALL = REPO.parent / "shared/alpine-mirror/v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
TARGETS = {
    "fresh_vs_bwrap": 1.0, "warm_vs_subprocess": 2.0, "fixture_overhead_ms": 5.0, "rss_flatness": 1.2,
    "warm_hit_ms": 5.0, "cold_extract_s": 0.5, "idle_mb": 5.0,
}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def interleaved(contenders: dict, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    for _ in range(warmup):
        for run in contenders.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
    return samples


# -- 1. a fresh sandbox against bubblewrap and unshare(1) ---------------------------------------
def bench_fresh(rootfs, rounds: int) -> dict:
    tree = str(rootfs.tree)
    bwrap = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", tree, "/", "--proc", "/proc",
             "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true"]
    unshare = ["unshare", "-Urmpf", "--mount-proc", "/bin/true"]

    def nsbox():
        with Sandbox(rootfs=rootfs) as box:
            box.run(["/bin/true"])

    contenders = {"nsbox": nsbox, "subprocess.run(true)": lambda: subprocess.run(["/bin/true"], check=True)}
    if shutil.which("bwrap"):
        contenders["bwrap"] = lambda: subprocess.run(bwrap, check=True)
    if shutil.which("unshare"):
        contenders["unshare -Urmpf"] = lambda: subprocess.run(unshare, check=True)
    samples = interleaved(contenders, rounds)
    no_spare = worker("fresh", rootfs, rounds, env={"NSBOX_PREFORK": "0"})
    samples["nsbox (no prebuilt spare)"] = no_spare["samples"]
    return {"samples": samples, "medians_ms": {k: median_ms(v) for k, v in samples.items()}}


# -- 2. a run in a warm sandbox against subprocess.run ------------------------------------------
def bench_warm(rootfs, rounds: int) -> dict:
    with Sandbox(rootfs=rootfs) as box:
        samples = interleaved({
            "nsbox run": lambda: box.run(["/bin/true"]),
            "subprocess.run": lambda: subprocess.run(["/bin/true"], capture_output=True),
        }, rounds * 3)
    return {"medians_ms": {k: median_ms(v) for k, v in samples.items()}}


# -- 3. per-test overhead of the sandbox fixture ------------------------------------------------
def bench_fixture(rootfs, tests: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_plain.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(tests)))
        Path(tmp, "test_box.py").write_text("".join(f"def test_{i}(sandbox):\n    pass\n" for i in range(tests)))
        env = {**os.environ, "NSBOX_ROOTFS": str(rootfs.tree)}
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp]
        runs = {"without plugin": base + ["-p", "no:nsbox", f"{tmp}/test_plain.py"],
                "sandbox fixture": base + [f"{tmp}/test_box.py"]}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, cmd in runs.items():
                started = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tmp)
                times[name].append(time.perf_counter() - started)
    plain, boxed = (statistics.median(times[k]) for k in runs)
    return {"tests": tests, "plain_s": plain, "sandbox_s": boxed,
            "overhead_ms_per_test": (boxed - plain) / tests * 1000}


# -- 4. scaling: the owner's size and concurrent sandboxes -------------------------------------
def bench_scaling(rootfs, rounds: int, sizes_mb: list[int], passes: int = 4) -> dict:
    # Interleaved too: each owner size runs in passes, in turn, so drift hits every size alike.
    samples: dict[int, list[float]] = {size: [] for size in sizes_mb}
    rss: dict[int, float] = {}
    for _ in range(passes):
        for size in sizes_mb:
            result = worker("fresh", rootfs, max(rounds // passes, 5), ballast_mb=size)
            samples[size] += result["samples"]
            rss[size] = result["rss_mb"]
    by_size = {f"{size} MB": {"rss_mb": rss[size], "median_ms": median_ms(samples[size])} for size in sizes_mb}
    medians = [v["median_ms"] for v in by_size.values()]
    concurrency = {}
    for threads in (1, 2, 4):
        concurrency[threads] = concurrent(rootfs, threads, max(rounds // 2, 10))
    return {"by_owner_rss": by_size, "spread": max(medians) / min(medians), "concurrency": concurrency}


def concurrent(rootfs, threads: int, per_thread: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def loop():
        for _ in range(per_thread):
            started = time.perf_counter()
            with Sandbox(rootfs=rootfs) as box:
                box.run(["/bin/true"])
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    return {"median_ms": median_ms(latencies), "sandboxes_per_s": len(latencies) / elapsed}


# -- 5. the rootfs store -------------------------------------------------------------------------
def bench_rootfs(tarball: Path, cache: Path, repeats: int) -> dict:
    cold = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            extract(tarball, Path(tmp))
            cold.append(time.perf_counter() - started)
    hits, local_hits = [], []
    for _ in range(repeats * 20):
        started = time.perf_counter()
        RootfsStore(cache, offline=True).resolve("alpine:3.20.3")
        hits.append(time.perf_counter() - started)
        started = time.perf_counter()
        RootfsStore(cache, offline=True).resolve(str(tarball))
        local_hits.append(time.perf_counter() - started)
    return {"cold_extract_s": statistics.median(cold), "warm_hit_ms": median_ms(hits),
            "local_tarball_hit_ms": median_ms(local_hits)}


# -- 6. host memory per idle sandbox ------------------------------------------------------------
def bench_idle_memory(rootfs, count: int) -> dict:
    return worker("idle", rootfs, count, env={"NSBOX_PREFORK": "0"})


# -- 7. a soak: many sandboxes in one process ----------------------------------------------------
def bench_soak(rootfs, count: int) -> dict:
    return worker("soak", rootfs, count)


# -- workers: measurements that need a process of their own --------------------------------------
def worker(kind: str, rootfs, count: int, ballast_mb: int = 0, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--count", str(count), "--tree", str(rootfs.tree),
           "--ballast-mb", str(ballast_mb)]
    out = subprocess.run(cmd, env={**os.environ, **(env or {})}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_worker(kind: str, tree: str, count: int, ballast_mb: int) -> dict:
    ballast = bytearray(ballast_mb << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page: resident, as a big test process would be
    rss_mb = _status_kb("VmRSS") / 1024
    if kind == "fresh":
        def once():
            with Sandbox(rootfs=tree) as box:
                box.run(["/bin/true"])
        samples = interleaved({"fresh": once}, count)["fresh"]
        return {"samples": samples, "rss_mb": rss_mb}
    if kind == "idle":
        Sandbox(rootfs=tree).start().close()  # the spawner exists before the baseline
        time.sleep(0.2)
        before = _used_kb()
        boxes = [Sandbox(rootfs=tree).start() for _ in range(count)]
        time.sleep(0.5)
        after = _used_kb()
        monitor_pss = statistics.median(_pss_kb(_monitor_of(b)) for b in boxes) / 1024
        for box in boxes:
            box.close()
        return {"sandboxes": count, "host_mb_per_sandbox": (after - before) / 1024 / count,
                "monitor_pss_mb": monitor_pss}
    if kind == "soak":
        def once():
            with Sandbox(rootfs=tree) as box:
                box.run(["/bin/true"])
        for _ in range(20):
            once()
        fds_before, rss_before = len(os.listdir("/proc/self/fd")), _status_kb("VmRSS")
        started = time.perf_counter()
        for _ in range(count):
            once()
        elapsed = time.perf_counter() - started
        fds_after, rss_after = len(os.listdir("/proc/self/fd")), _status_kb("VmRSS")
        return {"sandboxes": count, "seconds": elapsed, "fds_before": fds_before, "fds_after": fds_after,
                "rss_mb_before": rss_before / 1024, "rss_mb_after": rss_after / 1024}
    raise SystemExit(f"unknown worker {kind}")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _used_kb() -> int:
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return info["MemTotal"] - info["MemAvailable"]


def _monitor_of(box) -> int:
    stat = Path(f"/proc/{box.init_pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- reporting -----------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("bwrap") else "not installed"
    mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return {"date": time.strftime("%Y-%m-%d"), "kernel": platform.release(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "python": platform.python_version(),
            "bwrap": bwrap, "uid": os.getuid()}


def report(results: dict) -> str:
    m, fresh, warm = results["machine"], results["fresh"]["medians_ms"], results["warm"]["medians_ms"]
    fx, sc, rf = results["fixture"], results["scaling"], results["rootfs"]
    idle, soak = results["idle"], results["soak"]
    ratio_bwrap = fresh["nsbox"] / fresh["bwrap"] if "bwrap" in fresh else float("nan")
    ratio_warm = warm["nsbox run"] / warm["subprocess.run"]

    def ok(value, target, lower=True):
        return "yes" if (value <= target if lower else value >= target) else "**no**"

    rows = [
        ("fresh sandbox: create + run `/bin/true` + close", f"{fresh['nsbox']:.2f} ms",
         f"bwrap {fresh.get('bwrap', float('nan')):.2f} ms", f"{ratio_bwrap:.2f} ×", "≤ 1.0 × (stretch 0.7 ×)",
         ok(ratio_bwrap, TARGETS["fresh_vs_bwrap"])),
        ("… without the prebuilt spare", f"{fresh['nsbox (no prebuilt spare)']:.2f} ms",
         f"bwrap {fresh.get('bwrap', float('nan')):.2f} ms",
         f"{fresh['nsbox (no prebuilt spare)'] / fresh.get('bwrap', float('nan')):.2f} ×", "", ""),
        ("… `unshare -Urmpf --mount-proc true`", "", f"{fresh.get('unshare -Urmpf', float('nan')):.2f} ms", "", "", ""),
        ("… plain `subprocess.run(['/bin/true'])`", "", f"{fresh['subprocess.run(true)']:.2f} ms", "", "", ""),
        ("run in a warm sandbox", f"{warm['nsbox run']:.2f} ms", f"subprocess.run {warm['subprocess.run']:.2f} ms",
         f"{ratio_warm:.2f} ×", "≤ 2.0 ×", ok(ratio_warm, TARGETS["warm_vs_subprocess"])),
        (f"`sandbox` fixture overhead ({fx['tests']} tests)", f"{fx['overhead_ms_per_test']:.2f} ms/test",
         f"{fx['plain_s']:.2f} s without, {fx['sandbox_s']:.2f} s with", "", "≤ 5 ms",
         ok(fx["overhead_ms_per_test"], TARGETS["fixture_overhead_ms"])),
    ]
    for label, v in sc["by_owner_rss"].items():
        rows.append((f"fresh sandbox, owner at {v['rss_mb']:.0f} MB RSS", f"{v['median_ms']:.2f} ms", "", "", "", ""))
    rows.append(("… spread from smallest to largest owner", f"{sc['spread']:.2f} ×", "", "", "≤ 1.2 ×",
                 ok(sc["spread"], TARGETS["rss_flatness"])))
    for threads, v in sc["concurrency"].items():
        rows.append((f"{threads} concurrent thread(s) making sandboxes", f"{v['median_ms']:.2f} ms each",
                     f"{v['sandboxes_per_s']:.0f} sandboxes/s", "", "", ""))
    rows += [
        ("cold extraction of the Alpine tarball", f"{rf['cold_extract_s']:.3f} s", "", "", "≤ 0.5 s",
         ok(rf["cold_extract_s"], TARGETS["cold_extract_s"])),
        ("warm cache hit (`alpine:3.20.3`, new store)", f"{rf['warm_hit_ms']:.2f} ms", "", "", "≤ 5 ms",
         ok(rf["warm_hit_ms"], TARGETS["warm_hit_ms"])),
        ("warm cache hit (local tarball: hashes 3.4 MB)", f"{rf['local_tarball_hit_ms']:.2f} ms", "", "", "", ""),
        (f"host memory per idle sandbox ({idle['sandboxes']} sandboxes)", f"{idle['host_mb_per_sandbox']:.2f} MB",
         f"monitor PSS {idle['monitor_pss_mb']:.2f} MB", "", "≤ 5 MB", ok(idle["host_mb_per_sandbox"], TARGETS["idle_mb"])),
        (f"soak: {soak['sandboxes']} sandboxes in one process", f"{soak['seconds']:.1f} s",
         f"fds {soak['fds_before']} → {soak['fds_after']}, RSS {soak['rss_mb_before']:.1f} → {soak['rss_mb_after']:.1f} MB",
         "", "flat", "yes" if soak["fds_after"] <= soak["fds_before"] and
         soak["rss_mb_after"] - soak["rss_mb_before"] < 5 else "**no**"),
    ]
    head = (f"Measured {m['date']} on Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, "
            f"Python {m['python']}, {m['bwrap']}, as uid {m['uid']}. Medians; comparisons interleaved in one run.")
    table = ["| what | nsbox | compared with | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
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
    samples = results["fresh"]["samples"]
    names = [n for n in ("nsbox", "nsbox (no prebuilt spare)", "bwrap", "unshare -Urmpf", "subprocess.run(true)")
             if n in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    data = [[s * 1000 for s in samples[n]] for n in names]
    try:
        ax.boxplot(data, orientation="horizontal", showfliers=False)  # matplotlib >= 3.10
    except TypeError:
        ax.boxplot(data, vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xlabel("ms per sandbox (create, run /bin/true, tear down), from a Python process")
    ax.set_title(f"Per-sandbox cost, {results['machine']['date']}, Linux {results['machine']['kernel']}")
    ax.grid(axis="x", alpha=0.3)
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
    parser.add_argument("--tarball", type=Path, default=Path(os.environ.get("NSBOX_BENCH_TARBALL", DEFAULT_TARBALL)))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/latest.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs",
                        help="where performance.md and performance.png are written (full runs)")
    parser.add_argument("--worker")
    parser.add_argument("--count", type=int)
    parser.add_argument("--tree")
    parser.add_argument("--ballast-mb", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.tree, args.count, args.ballast_mb)))
        return 0
    if os.getuid() == 0:
        print("note: running as root; the figures that matter are a normal user's", file=sys.stderr)
    q = args.quick
    cache = args.cache_dir or REPO / "rootfs-cache"  # the repository's own, git-ignored cache
    rootfs = RootfsStore(cache, offline=True).resolve(str(args.tarball))
    results: dict = {"machine": machine(), "quick": q}
    steps = [
        ("fresh", lambda: bench_fresh(rootfs, 20 if q else 300)),
        ("warm", lambda: bench_warm(rootfs, 20 if q else 300)),
        ("fixture", lambda: bench_fixture(rootfs, 50 if q else 500, 1 if q else 3)),
        ("scaling", lambda: bench_scaling(rootfs, 15 if q else 100, [50, 500] if q else [50, 500, 2000])),
        ("rootfs", lambda: bench_rootfs(args.tarball, cache, 2 if q else 10)),
        ("idle", lambda: bench_idle_memory(rootfs, 5 if q else 50)),
        ("soak", lambda: bench_soak(rootfs, 200 if q else 10_000)),
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


if __name__ == "__main__":
    sys.exit(main())
