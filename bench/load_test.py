"""Load test of `protein-llava serve` on loopback: N concurrent clients for M seconds, then the same with a
share of abusive requests, to show that abuse does not slow or fail the valid ones.

    python bench/load_test.py --model checkpoints/smollm2-demo-stage2/export [--clients 4] [--seconds 60] [--abuse 0.1]

Each run starts its own server (127.0.0.1, a free port) and a realistic mix of valid requests: short
questions on /v1/answer, long proteins (300-1000 residues) on /v1/chat/completions, and two-turn chats.
With `--abuse F` a share F of the requests are abusive instead: a 100,000-character question, a huge
`max_tokens`, garbage bodies, 1,000 sequences, and streamed requests that hang up after the first event.
Reports throughput, p50/p95/p99 latency of valid requests, status codes by kind, and the server's peak
memory (VmHWM). Writes the figures to `--out` (JSON) and prints them. Bounded: at most `--seconds` of
load per run, requests time out after 300 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
QUESTIONS = ["What is the function of this protein?", "Where in the cell is this protein found?", "Is this an enzyme?"]


def protein(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(RESIDUES) for _ in range(rng.randint(low, high)))


def valid_request(rng: random.Random) -> tuple[str, str, dict]:
    kind = rng.choices(["short", "long_protein", "chat"], weights=[4, 3, 3])[0]
    if kind == "short":
        return kind, "/v1/answer", {"sequences": [protein(rng, 30, 120)], "question": rng.choice(QUESTIONS), "max_new_tokens": 16}
    if kind == "long_protein":
        content = [{"type": "text", "text": rng.choice(QUESTIONS) + " "}, {"type": "protein", "sequence": protein(rng, 300, 1000)}]
        return kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}
    seq = protein(rng, 50, 200)
    messages = [
        {"role": "user", "content": f"{rng.choice(QUESTIONS)} <seq> {' '.join(seq)} </seq>"},
        {"role": "assistant", "content": "It binds ATP."},
        {"role": "user", "content": "And where is it expressed?"},
    ]
    return kind, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0}


def abusive_request(rng: random.Random) -> tuple[str, str, dict | bytes]:
    kind = rng.choice(["huge_question", "huge_max_tokens", "garbage", "many_sequences", "hang_up"])
    if kind == "huge_question":
        return kind, "/v1/answer", {"sequences": ["MKT"], "question": "why " * 25_000, "max_new_tokens": 16}
    if kind == "huge_max_tokens":
        return kind, "/v1/completions", {"prompt": "MKT", "max_tokens": 10**9}
    if kind == "garbage":
        return kind, "/v1/chat/completions", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
    if kind == "many_sequences":
        return kind, "/v1/answer", {"sequences": ["MKTAYIAKQR"] * 1000, "question": "ok?"}
    return kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi <seq> M K T </seq>"}], "max_tokens": 512, "stream": True}


async def one_request(client: httpx.AsyncClient, rng: random.Random, abusive: bool) -> dict:
    kind, path, body = abusive_request(rng) if abusive else valid_request(rng)
    started = time.perf_counter()
    try:
        if kind == "hang_up":
            async with client.stream("POST", path, json=body) as response:
                async for _ in response.aiter_lines():
                    break  # the first event, then the client goes away
                status = response.status_code
        elif isinstance(body, bytes):
            status = (await client.post(path, content=body, headers={"content-type": "application/json"})).status_code
        else:
            status = (await client.post(path, json=body)).status_code
    except httpx.HTTPError as error:
        status = type(error).__name__
    return {"abusive": abusive, "kind": kind, "status": status, "seconds": time.perf_counter() - started}


async def load(url: str, clients: int, seconds: float, abuse: float, seed: int) -> list[dict]:
    results: list[dict] = []
    stop_at = time.monotonic() + seconds

    async def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        # Exactly a share `abuse` of each client's requests is abusive, spread evenly (offset per client).
        offset, sent = index / clients, 0
        async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:
            while time.monotonic() < stop_at:
                abusive = int((sent + 1) * abuse + offset) > int(sent * abuse + offset)
                results.append(await one_request(client, rng, abusive))
                sent += 1

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return results


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def peak_memory_mib(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(args, abuse: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "protein_llava.cli", "serve", "--model", args.model, "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        # One request first, so the first measured one does not pay for lazy initialisation.
        httpx.post(f"{url}/v1/answer", json={"sequences": ["MKTAYIAKQR"], "question": "ok?", "max_new_tokens": 2}, timeout=300, trust_env=False)
        started = time.monotonic()
        results = asyncio.run(load(url, args.clients, args.seconds, abuse, args.seed))
        wall = time.monotonic() - started
        health = httpx.get(f"{url}/health", timeout=10, trust_env=False).json()
        memory = peak_memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    valid = [r for r in results if not r["abusive"]]
    latencies = [r["seconds"] for r in valid if r["status"] == 200]
    return {
        "abuse": abuse,
        "wall_s": round(wall, 1),
        "requests": len(results),
        "valid_requests": len(valid),
        "valid_ok": len(latencies),
        "valid_failed": len(valid) - len(latencies),
        "valid_throughput_per_s": round(len(latencies) / wall, 3),
        "valid_latency_s": {f"p{q}": round(percentile(latencies, q), 3) for q in (50, 95, 99)} if latencies else None,
        "status_by_kind": {
            kind: dict(Counter(str(r["status"]) for r in results if r["kind"] == kind)) for kind in sorted({r["kind"] for r in results})
        },
        "server_peak_memory_mib": round(memory, 1) if memory else None,
        "server_batching": health["batching"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported ProteinLLM folder")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--abuse", type=float, default=0.1, help="share of abusive requests in the second run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "load_test.json")
    args = parser.parse_args()
    if not 0 < args.abuse < 1:
        parser.error("--abuse must be between 0 and 1")
    clean = run_once(args, 0.0)
    abused = run_once(args, args.abuse)
    ratio = None
    if clean["valid_latency_s"] and abused["valid_latency_s"]:
        ratio = round(abused["valid_latency_s"]["p95"] / clean["valid_latency_s"]["p95"], 3)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": date.today().isoformat(),
        "command": " ".join(["python", "bench/load_test.py", *sys.argv[1:]]),
        "clean": clean,
        "abusive": abused,
        "valid_p95_abusive_over_clean": ratio,
        "target": "valid p95 under abuse <= 2x clean, and no valid request fails",
        "target_met": ratio is not None and ratio <= 2 and abused["valid_failed"] == 0 and clean["valid_failed"] == 0,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
