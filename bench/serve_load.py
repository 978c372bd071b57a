"""Load test of `alnus serve` on loopback: concurrent clients, a fixed number of requests, latency and memory.

A model package of `--backbone` (default efficientnet_lite0) at its registry input size, with random weights (the
speed of a forward pass does not depend on what the weights learnt) and a frozen patient-level threshold, is served
by `alnus serve` in its own process (as a hospital would run it: token file, CPU). Phantom ultrasound images of
`--image-size` with their lesion boxes are posted by `--clients` concurrent httpx clients, first without heat maps,
then with them; meanwhile one more client asks /healthz every 50 ms. Each server configuration (`--configs`: the
default eager network, and `--compile`) gets its own server. Reported per phase: requests, errors (any answer but
200; must be 0), throughput, p50/p95/p99 latency of /v1/predict and p50/p95 of /healthz under that load; and the
server's resident memory (VmRSS) after the warm-up and after the phases. Each phase stops after its requests or after
`--max-seconds` per configuration, whichever comes first, and each server is stopped after its phases. Client and
server share this machine's cores, so the figures include the client's own work.

Writes the section between the serve-load markers of docs/performance.md (other sections are kept).

Usage: .venv/bin/python bench/serve_load.py [--backbone efficientnet_lite0] [--clients 4] [--requests 200]
       [--heatmap-requests 100] [--image-size 480x640] [--configs eager,compile] [--max-seconds 75]
       [--out docs/performance.md] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
HEALTH_INTERVAL_S = 0.05
# issue 9.8: p95 per image at 4 concurrent clients on this 2-core CPU, efficientnet_lite0.
GOALS_MS = {"predict": 100.0, "predict + heat map": 300.0}
# The server's resident memory may grow this much over the phases (allocator pools, lazily built kernels) and no more.
RSS_GROWTH_BOUND_MB = 100.0
TOKEN = "load-test-token-" + "0123456789abcdefghijklmnopqrstuvwxyz"
# Server configurations measured: `alnus serve` options. The clients all come from 127.0.0.1, so the per-client limit
# (which would answer all but two of them 429) is off: this measures the service's throughput, not that limit.
CONFIGS: dict[str, tuple[str, ...]] = {"eager": ("--per-client", "0"), "compile": ("--compile", "--per-client", "0")}


@dataclass
class Phase:
    """What one phase measured: each request's latency and status, and /healthz latencies meanwhile."""

    name: str
    clients: int
    heatmap: bool
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(status != 200 for status in self.statuses)

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.latencies) * 1000
        health = np.asarray(self.health) * 1000
        return {
            "phase": self.name,
            "clients": self.clients,
            "requests": len(self.statuses),
            "errors": self.errors,
            "per_s": len(self.statuses) / self.wall_s if self.wall_s else 0.0,
            **{f"p{q}": float(np.percentile(ms, q)) if ms.size else float("nan") for q in (50, 95, 99)},
            "health_p50": float(np.percentile(health, 50)) if health.size else float("nan"),
            "health_p95": float(np.percentile(health, 95)) if health.size else float("nan"),
            "health_n": int(health.size),
        }


async def run_phase(
    url: str,
    token: str,
    uploads: Sequence[tuple[bytes, str]],
    *,
    name: str,
    clients: int,
    requests: int,
    heatmap: bool,
    deadline: float,
) -> Phase:
    """Post `requests` images (cycling through `uploads`: PNG bytes and their `x,y,w,h` box) from `clients`
    concurrent clients, while one more client times /healthz; stop early at `deadline` (time.monotonic)."""
    import httpx

    phase = Phase(name=name, clients=clients, heatmap=heatmap)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {token}"}
    done = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            while time.monotonic() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                content, roi = uploads[i % len(uploads)]
                files = {"image": (f"image{i}.png", content, "image/png")}
                started = time.perf_counter()
                try:
                    response = await http.post(
                        "/v1/predict", files=files, data={"roi": roi, "heatmap": str(heatmap).lower()}
                    )
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                phase.latencies.append(time.perf_counter() - started)
                phase.statuses.append(status)

    async def prober() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while not done.is_set():
                started = time.perf_counter()
                response = await http.get("/healthz")
                if response.status_code == 200:
                    phase.health.append(time.perf_counter() - started)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), HEALTH_INTERVAL_S)

    started = time.perf_counter()
    probe = asyncio.create_task(prober())
    await asyncio.gather(*(client() for _ in range(clients)))
    phase.wall_s = time.perf_counter() - started
    done.set()
    await probe
    return phase


def phantom_uploads(n: int, size: tuple[int, int], seed: int = 0) -> list[tuple[bytes, str]]:
    """`n` phantom ultrasound PNGs of `size` (H, W) with their lesion boxes (from the phantom's masks)."""
    from PIL import Image

    from alnus.data.phantom import phantom_image
    from alnus.data.roi import box_from_mask, format_box

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        image, mask = phantom_image(rng, bool(k % 2), image_size=size)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append((buffer.getvalue(), format_box(box_from_mask(mask > 0))))
    return out


def make_package(folder: Path, backbone: str) -> Path:
    """A package of `backbone` with random weights, trained-on-boxes preprocessing and a frozen threshold."""
    import torch

    from alnus.data.dataset import PreprocessSpec
    from alnus.data.roi import RoiPolicy
    from alnus.models import create_model, get_spec
    from alnus.models.package import freeze_threshold, save_package

    torch.manual_seed(0)
    spec = PreprocessSpec(size=get_spec(backbone).input_size, roi=RoiPolicy("box", margin=0.15))
    save_package(folder, create_model(backbone), {"preprocess": spec.to_dict(), "label_names": ["benign", "malignant"],
                                                  "positive_label": "malignant", "run": "load-test"})  # fmt: skip
    point = {"value": 0.5, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}
    freeze_threshold(folder, point, reason="load test")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def served(
    package: Path, token_file: Path, port: int, log: Path, options: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """`alnus serve` in a subprocess, until it answers /healthz; stopped (SIGTERM, then SIGKILL) on exit."""
    import httpx

    command = [sys.executable, "-m", "alnus", "serve", str(package), "--port", str(port), "--token-file",
               str(token_file), "--device", "cpu", *options]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ALNUS_TOKEN": ""})
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"alnus serve exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("alnus serve did not answer /healthz within 180 s")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| server | phase | clients | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | goal p95 ms | "
        "/healthz p50 ms | /healthz p95 ms | CPU ms per request: server, client | memory MB (after warm-up -> after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = GOALS_MS.get(r["phase"])
        met = "" if goal is None else f"{goal:g} ({'met' if r['p95'] <= goal else 'not met'})"
        lines.append(
            f"| {r['server']} | {r['phase']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['per_s']:.1f} | "
            f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {met} | {r['health_p50']:.1f} | "
            f"{r['health_p95']:.1f} | {r['server_cpu_ms']:.0f}, {r['client_cpu_ms']:.0f} | "
            f"{r['rss_before']:.0f} -> {r['rss_after']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--heatmap-requests", type=int, default=100)
    parser.add_argument("--image-size", default="480x640", help="H x W of the phantom images")
    parser.add_argument("--configs", default="eager,compile", help=f"server configurations: {', '.join(CONFIGS)}")
    parser.add_argument("--max-seconds", type=float, default=75.0, help="per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.image_size.lower().split("x"))

    from alnus._hardware import environment_info

    env = environment_info()
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="alnus-serve-load-") as tmp:
        folder = Path(tmp)
        package = make_package(folder / "model", args.backbone)
        token_file = folder / "token.txt"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        uploads = phantom_uploads(16, (height, width))
        rows: list[dict[str, Any]] = []
        for config in args.configs.split(","):
            options = CONFIGS[config]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = folder / f"server-{config}.log"
            with served(package, token_file, port, log, options) as process:
                deadline = time.monotonic() + args.max_seconds  # from the first request on (compiling comes before)
                # Warm-up at the same concurrency, both kinds: batches of every size the phases will see are run
                # once, so the memory after it includes the allocator's pools and the growth is what the load adds.
                for heatmap in (False, True):
                    asyncio.run(run_phase(url, TOKEN, uploads, name="warm-up", clients=args.clients,
                                          requests=3 * args.clients, heatmap=heatmap, deadline=deadline))  # fmt: skip
                rss_before = rss_mb(process.pid)
                phases = []
                for name, n, heatmap in (("predict", args.requests, False),
                                         ("predict + heat map", args.heatmap_requests, True)):  # fmt: skip
                    server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
                    phase = asyncio.run(run_phase(url, TOKEN, uploads, name=name, clients=args.clients, requests=n,
                                                  heatmap=heatmap, deadline=deadline))  # fmt: skip
                    served_n = max(len(phase.statuses), 1)
                    phases.append({
                        **phase.summary(),
                        "server_cpu_ms": (cpu_seconds(process.pid) - server_cpu) * 1000 / served_n,
                        "client_cpu_ms": (time.process_time() - client_cpu) * 1000 / served_n,
                    })  # fmt: skip
                rss_after = rss_mb(process.pid)
                server = "alnus serve " + (shlex.join(options) if options else "(defaults)")
                for summary in phases:
                    rows.append({**summary, "server": server, "rss_before": rss_before, "rss_after": rss_after})
                    print(rows[-1], flush=True)
                if any(r["errors"] for r in phases):
                    print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    load_end, minutes = os.getloadavg()[0], (time.monotonic() - started) / 60
    errors = sum(r["errors"] for r in rows)
    growth = max(r["rss_after"] - r["rss_before"] for r in rows)
    bounded = growth <= RSS_GROWTH_BOUND_MB
    command = "python bench/serve_load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            "## Service under load (`alnus serve`)",
            "",
            f"Command: `{command.strip()}`; {dt.date.today().isoformat()}; CPU: {env['cpu']['model']} "
            f"({env['cpu']['usable_cores']} usable cores), torch {env['torch']}; load average (1 min) "
            f"{load_start:.2f} at the start, {load_end:.2f} at the end; the run took {minutes:.1f} min.",
            "",
            f"{args.backbone} at its input size with **random weights** (speed does not depend on what the weights "
            f"learnt), lesion-box crop, served by `alnus serve` in its own process on loopback; {height}x{width} "
            f"phantom PNGs with their lesion boxes posted by {args.clients} concurrent clients (httpx) running on the "
            "same cores, while one more client asks /healthz every 50 ms. Latency is per request, from the client: "
            "upload, decode, crop, forward pass (and Grad-CAM with its overlay), answer. CPU per request: the server "
            "process's CPU time (all its threads) and the client's, over the phase, divided by its requests.",
            "",
            _table(rows),
            "",
            f"Errors: {errors} (must be 0). Server memory (VmRSS) grew by at most {growth:+.0f} MB over the phases "
            f"(after the warm-up -> after the phases), {'within' if bounded else 'over'} the bound of "
            f"{RSS_GROWTH_BOUND_MB:g} MB; most of it is the libraries loaded at start (PyTorch, timm, "
            "FastAPI). `--compile`: torch.compile with frozen weights (compiled at start, before the first request is "
            "taken); heat maps always run the eager network (Grad-CAM needs its gradients).",
            "",
            "What limits it: one worker runs the predictions (the event loop keeps answering /healthz, see its "
            "column); requests that queue while it is busy share one forward pass, so at 4 clients each request "
            "waits for about one batch and then runs in the next. A heat map costs Grad-CAM's fp32 forward and "
            "backward pass per image (pytorch-grad-cam reads the activations as fp32 numpy, so bf16 cannot be used), "
            "plus the overlay on the original image and its PNG; the 4 clients, their uploads and the server share "
            f"the {env['cpu']['usable_cores']} cores.",
        ]
    )
    print(section)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _docs import write_section

        write_section(args.out, "serve-load", section)
        print(f"wrote {args.out}")
    return 0 if errors == 0 and bounded else 1


if __name__ == "__main__":
    raise SystemExit(main())
