"""Benchmark ``ctsync backfill``: resources notified per minute under a throttle, against the ceiling.

commercetools-mock (tests/ctmock, behind the tests' ``SortingFront`` so id-cursor paging is right) holds N
resources created through its API (products, categories, customers and orders). ``ctsync backfill`` runs as a
subprocess, as users run it, against the tests' local hook server under a throttle of ``--limit`` requests per
``--window`` seconds with ``--batch`` notifications per request, once with the whole budget
(``--budget-share 1``) and once with the default half.

The rate is measured on the hook server's side once paging is warm: from the first request's arrival over
the whole windows that follow it (a moving-window limiter lets at most ``limit`` requests arrive in any
window), notifications accepted per minute. The ceiling is ``limit x batch x share`` per window. Target: the
rate is >= 95 % of the ceiling.

Run: ``.venv/bin/python -m bench.backfill [--resources N] [--limit 10 --window 2 --batch 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from tests.integration.test_backfill_integration import MockApi  # noqa: E402
from tests.servers.ctmockserver import SortingFront, start_ctmock  # noqa: E402
from tests.servers.hookserver import HookServer  # noqa: E402

CTSYNC = [sys.executable, "-m", "consumer.cli"]


def split(total: int) -> dict[str, int]:
    """Share ``total`` out like a catalogue: half products, the rest categories, customers and orders."""
    products = total // 2
    rest = total - products
    third = rest // 3
    return {"product": products, "category": third, "customer": third, "order": rest - 2 * third}


def measured_rate(hooks: HookServer, window: float) -> tuple[float, int, float]:
    """Return (notifications per minute, requests, seconds) over the whole windows after the first arrival."""
    records = sorted((r for r in hooks.requests if r.accepted), key=lambda r: r.arrival)
    first, last = records[0].arrival, records[-1].arrival
    windows = math.floor((last - first) / window)
    if windows < 1:
        raise SystemExit("too few resources for one whole window: raise --resources")
    span = windows * window
    inside = [r for r in records if r.arrival < first + span]
    notified = sum(r.count for r in inside)
    return notified * 60.0 / span, len(inside), span


def sweep(env: dict[str, str], workdir: Path, share: float) -> tuple[int, float]:
    started = time.monotonic()
    done = subprocess.run(
        [*CTSYNC, "backfill", "--budget-share", f"{share:g}", "--restart"],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(f"ctsync backfill failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.returncode, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=6000)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--shares", default="1,0.5")
    args = parser.parse_args()

    mock = start_ctmock()
    front = SortingFront(mock.port).start()
    try:
        project = "bench-" + secrets.token_hex(4)
        counts = split(args.resources)
        started = time.monotonic()

        async def create() -> None:
            async with MockApi(mock.url, project) as api:
                await api.create(counts)

        asyncio.run(create())
        print(
            f"created {args.resources:,} resources ({', '.join(f'{t} {n:,}' for t, n in counts.items())}) "
            f"in {time.monotonic() - started:.1f} s"
        )
        print(f"throttle {args.limit} requests per {args.window:g} s, {args.batch} notifications per request")
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            for share in (float(s) for s in args.shares.split(",")):
                with HookServer() as hooks:
                    env = {
                        k: v
                        for k, v in os.environ.items()
                        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_"))
                    }
                    env.update(
                        CTP_PROJECT_KEY=project,
                        CTP_CLIENT_ID="bench",
                        CTP_CLIENT_SECRET="bench-secret-0123",
                        CTP_AUTH_URL=front.url,
                        CTP_API_URL=front.url,
                        CTSYNC_STATE_URL=f"sqlite:///{workdir}/state-{share:g}.db",
                        CTSYNC_DEAD_LETTER_URL=f"file:{workdir}/dead.jsonl",
                        CTSYNC_LOG_LEVEL="WARNING",
                        CTSYNC_AUDIT="off",
                        IPAAS_HOOK_URL=hooks.url,
                        IPAAS_WEBHOOK_API_KEY=hooks.api_key,
                        IPAAS_THROTTLE_LIMIT=str(args.limit),
                        IPAAS_THROTTLE_SECONDS=f"{args.window:g}",
                        IPAAS_BATCH_SIZE=str(args.batch),
                    )
                    _, wall = sweep(env, workdir, share)
                    rate, requests, span = measured_rate(hooks, args.window)
                    share_limit = max(1, math.floor(args.limit * share))
                    ceiling = share_limit * args.batch * 60.0 / args.window
                    whole = args.limit * args.batch * 60.0 / args.window
                    total = sum(r.count for r in hooks.requests if r.accepted)
                    arrivals = [r.arrival for r in hooks.requests if r.accepted]
                    end_to_end = total * 60.0 / (max(arrivals) - min(arrivals) + args.window)
                    print(
                        f"share {share:g}: {rate:10,.0f} notified/min over {span:g} s ({requests} requests); "
                        f"ceiling {ceiling:,.0f}/min ({share_limit} x {args.batch} per {args.window:g} s) -> "
                        f"{rate / ceiling:.1%}; whole budget {whole:,.0f}/min -> {rate / whole:.1%}"
                    )
                    print(
                        f"          end to end {end_to_end:,.0f}/min ({end_to_end / ceiling:.1%} of the "
                        "ceiling; first arrival to one window after the last)"
                    )
                    print(
                        f"          all {total:,} notified in {hooks.request_count} requests, "
                        f"max {hooks.max_in_window(args.window)} in any {args.window:g} s window; "
                        f"wall time {wall:.1f} s (start, token, paging and the last window included)"
                    )
    finally:
        front.stop()
        mock.process.terminate()
        mock.process.wait(10)


if __name__ == "__main__":
    main()
