"""The real server in a subprocess under pressure: 48 concurrent decompression bombs and 160 requests
abandoned after a second. Every answer is a caption, a 4xx or a 503; the server's peak memory grows by
less than RSS_BUDGET; a normal request afterwards is answered within 10 s.

The budget follows from the limits, not from the host: decode_budget_mb=512 here (two 245 MB bomb
decodes at once, whatever the thread pool), 32 requests' 6 KB bodies, and RSS_SLACK for the
allocator, the uvicorn tasks and the captions' activations.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from test_serve import encode, free_port, png_bomb, scene

DECODE_BUDGET_MB = 512
RSS_SLACK_MB = 512
RSS_BUDGET_MB = DECODE_BUDGET_MB + RSS_SLACK_MB  # 1 GB, within the 2 GB asked of the server


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Make VmHWM start from the current RSS (Linux: 5 > clear_refs), so the model's load peak hides nothing."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:  # older kernels: VmHWM then also covers the load, which only makes the check stricter
        pass


def test_the_server_stays_bounded_under_bombs_and_abandoned_requests(embedded_ckpt):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "captioner.serve", f"ckpt={embedded_ckpt}", f"port={port}", "log_level=warning",
         f"limits.decode_budget_mb={DECODE_BUDGET_MB}", "limits.request_timeout_s=20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 600  # imports and the model load: seconds alone, minutes on a busy machine
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server was not ready within 10 minutes"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        normal = encode(scene(), "PNG")
        assert httpx.post(f"{url}/v1/captions", files={"images": ("a.png", normal, "image/png")}, timeout=30).status_code == 200
        reset_peak(server.pid)
        before = status_kb(server.pid, "VmHWM")
        bomb = png_bomb(7000)  # 6 KB that decode to 49 M pixels

        async def upload(client: httpx.AsyncClient):
            try:
                return await client.post(f"{url}/v1/captions", files={"images": ("bomb.png", bomb, "image/png")})
            except httpx.TimeoutException:
                return None  # gave up: the abandoned burst's whole point

        async def pressure():
            many = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=many) as patient, httpx.AsyncClient(timeout=1, limits=many) as impatient:
                kinds = [patient, impatient] * 48 + [impatient] * 112  # interleaved: both kinds get in
                answers = await asyncio.gather(*(upload(client) for client in kinds))
                return [a for a, c in zip(answers, kinds) if c is patient] + [a for a, c in zip(answers, kinds) if c is impatient]

        started = time.monotonic()
        responses = asyncio.run(pressure())
        elapsed = time.monotonic() - started
        answered = [r for r in responses[:48]]
        assert all(r is not None for r in answered), "a patient upload timed out: the server gave no answer within 60 s"
        for response in [r for r in responses if r is not None]:
            status = response.status_code
            assert status == 200 or 400 <= status < 500 or status == 503, (status, response.text[:300])
            if status == 200:
                assert response.json()["results"][0]["caption"]
        growth_mb = (status_kb(server.pid, "VmHWM") - before) / 1024
        assert growth_mb < RSS_BUDGET_MB, f"peak RSS grew by {growth_mb:.0f} MB under pressure (budget {RSS_BUDGET_MB} MB)"

        asked = time.monotonic()
        after = httpx.post(f"{url}/v1/captions", files={"images": ("a.png", normal, "image/png")}, timeout=10)
        assert after.status_code == 200 and after.json()["results"][0]["caption"], after.text
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["decode_bytes_peak"] <= DECODE_BUDGET_MB * 2**20
        statuses = sorted({r.status_code for r in responses if r is not None})
        print(f"pressure: {elapsed:.1f} s, statuses {statuses}, {sum(r is None for r in responses)} abandoned, "
              f"peak RSS +{growth_mb:.0f} MB, normal request after {time.monotonic() - asked:.2f} s, "
              f"dropped {health['dropped_requests']}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
