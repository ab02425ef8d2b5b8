"""A measurement server: ``python -m benchmarks.suite.worker ours|swift``, driven by ``benchmarks/run_suite.py``.

It imports torch, transformers, diffusers and one side's tuner library once (``build_ours`` or ``build_swift``;
the latter needs nothing from this package, so it runs under ms-swift's own virtual environment), then forks one
child process per configuration. Each child holds exactly one model, so its memory figures never include another
configuration's tensors, and the import cost (~20 s on a loaded machine) is paid once per side instead of once per
configuration. The parent itself never runs a torch operation, which keeps ``fork`` safe with OpenMP.

Protocol: one JSON object per line on stdin, one reply per line on the original stdout (library output is sent
to stderr so it cannot corrupt the protocol):

- ``{"op": "open", "id": ..., "spec": {...}}`` builds a configuration in a new child; replies its parameter counts;
- ``{"op": "call", "id": ..., "cmd": "step" | "forward" | "memory" | "save" | "load"}`` runs one measurement;
- ``{"op": "close", "id": ...}`` ends the child.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

from ..peak_memory import peak_bytes
from . import models


class Configuration:
    """One model (base, tuned, or tuned and merged) with its input and optimizer."""

    def __init__(self, builder, spec: dict) -> None:
        self.builder, self.spec = builder, spec
        family, size = spec["family"], spec["size"]
        self.batch = models.inputs(family, size)
        model = models.build(family, size)
        if spec.get("tuner"):
            model = builder.apply(model, spec["tuner"], spec.get("entry", "peft"), family, size)
        else:
            model.requires_grad_(False)  # the frozen base: no weight of it trains
        if spec.get("merged"):
            model = builder.merge(model)
            model.requires_grad_(False)  # only ever run forward
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            # The frozen base (and NEFTune, which has no weights): backward still runs through every activation,
            # as it must under any tuner, but no weight gradient is computed. That is the floor of any PEFT step.
            self._make_inputs_require_grad()
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        self.trainable = sum(p.numel() for p in trainable)
        self.total = sum(p.numel() for p in model.parameters())
        self.checkpoint = None

    def _make_inputs_require_grad(self) -> None:
        if "input_ids" in self.batch:
            embedding = next(m for m in self.model.modules() if isinstance(m, torch.nn.Embedding))
            embedding.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        else:
            for value in self.batch.values():
                if value.is_floating_point():
                    value.requires_grad_(True)

    def _step(self) -> None:
        models.loss(self.model(**self.batch)).backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for value in self.batch.values():
                value.grad = None

    def step(self) -> float:
        self.model.train()
        start = time.perf_counter()
        self._step()
        return time.perf_counter() - start

    def forward(self) -> float:
        self.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            self.model(**self.batch)
            return time.perf_counter() - start

    def memory(self) -> int:
        self.model.train()
        return peak_bytes(self._step)

    def save(self) -> float:
        if self.checkpoint:
            shutil.rmtree(self.checkpoint)
        self.checkpoint = tempfile.mkdtemp(prefix="suite-ckpt-")
        start = time.perf_counter()
        self.builder.save(self.model, self.checkpoint)
        return time.perf_counter() - start

    def checkpoint_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.checkpoint) for f in files)

    def load(self) -> float:
        spec = self.spec
        base = models.build(spec["family"], spec["size"], seed=1)  # built outside the timer
        start = time.perf_counter()
        self.builder.load(base, self.checkpoint, spec.get("entry", "peft"))
        return time.perf_counter() - start

    def close(self) -> None:
        if self.checkpoint:
            shutil.rmtree(self.checkpoint, ignore_errors=True)


def serve_configuration(conn, side: str, spec: dict) -> None:
    try:
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        config = Configuration(importlib.import_module(f"{__package__}.build_{side}"), spec)
        conn.send({"ok": {"trainable": config.trainable, "total": config.total}})
    except Exception:
        conn.send({"error": traceback.format_exc()})
        return
    while True:
        cmd = conn.recv()
        if cmd == "quit":
            config.close()
            return
        try:
            conn.send({"ok": getattr(config, cmd)()})
        except Exception:
            conn.send({"error": traceback.format_exc()})


def main() -> None:
    side = sys.argv[1]
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    builder = importlib.import_module(f"{__package__}.build_{side}")
    builder.prewarm()
    context = multiprocessing.get_context("fork")
    children: dict[str, tuple] = {}

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    reply({"ok": {"versions": builder.versions()}})
    for line in sys.stdin:
        message = json.loads(line)
        op, key = message["op"], message.get("id")
        if op == "open":
            parent, child = context.Pipe()
            process = context.Process(target=serve_configuration, args=(child, side, message["spec"]), daemon=True)
            process.start()
            children[key] = (process, parent)
            reply(parent.recv())
        elif op == "call":
            process, parent = children[key]
            parent.send(message["cmd"])
            reply(parent.recv())
        elif op == "close":
            process, parent = children.pop(key)
            if process.is_alive():
                parent.send("quit")
                process.join(30)
            reply({"ok": None})


if __name__ == "__main__":
    main()
