"""Record routing traces from Hugging Face transformers MoE models with forward hooks.

Every MoE layer of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE and GPT-OSS has a
router module (``*TopKRouter`` in transformers >= 5) whose forward returns ``(logits,
top-k weights [tokens, k], top-k ids [tokens, k])``. A hook on each router keeps the ids and
weights of every forward pass: the prefill pass over the prompts and, with ``decode_tokens``,
one pass per generated token. Padding tokens are dropped; ids are re-ordered so the primary
(highest-weight) expert comes first (DeepSeek's routers return them unsorted).

Output: a canonical trace (``moetuner.trace``) with one sequence per request and phase:
labels ``seq_request`` (index of the text), ``seq_phase`` (``prefill`` / ``decode``) and
``seq_dataset`` when the JSONL records name one. Batches are written to a chunk folder beside
the output as they finish; the final ``.npz`` is assembled from them and written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.errors import InputError
from moetuner.io import write_npz
from moetuner.trace import Trace

COLLECT_HINT = "torch and transformers (pip install 'moetuner[collect]')"


def read_texts(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl`` (``text`` or ``prompt``
    per line, optional ``dataset``). Returns the texts and their datasets (or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file", "an existing .txt or .jsonl file of prompts")
    try:
        lines = [line for line in path.read_bytes().decode().splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise InputError(path, "file", "UTF-8 text", exc.reason) from None
    if path.suffix != ".jsonl":
        texts, datasets = lines, None
    else:
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                text = record["text"] if "text" in record else record["prompt"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise InputError(path, f"line {number}",
                                 'a JSON object with a "text" (or "prompt") string') from None
            records.append((str(text), record.get("dataset")))
        texts = [text for text, _ in records]
        named = [dataset for _, dataset in records]
        datasets = [str(d) for d in named] if all(d is not None for d in named) else None
    if not texts:
        raise InputError(path, "file", "at least one prompt")
    return texts, datasets


def find_routers(model: Any) -> list[Any]:
    """The router module of every MoE layer, in layer order."""
    routers = [module for module in model.modules()
               if type(module).__name__.lower().endswith("topkrouter")]
    if not routers:
        raise InputError(type(model).__name__, "routers",
                         "an MoE model with *TopKRouter modules (Mixtral, Qwen2/3-MoE, "
                         "DeepSeek-V2/V3, OLMoE, GPT-OSS in transformers >= 5)")
    return routers


class RouterRecorder:
    """Forward hooks on routers that keep each pass's top-k ids and weights.

    After a forward pass, ``take()`` returns ``ids [n, L, k]`` and ``weights [n, L, k]``
    for the pass's n flattened (batch x sequence) positions, primary expert first.
    """

    def __init__(self, routers: list[Any]) -> None:
        self.layers: list[list[tuple[Any, Any]]] = [[] for _ in routers]
        self.handles = [router.register_forward_hook(self._hook(index))
                        for index, router in enumerate(routers)]

    def _hook(self, layer: int) -> Callable:
        def record(module: Any, inputs: Any, output: Any) -> None:
            _, weights, ids = output
            self.layers[layer].append((ids.detach(), weights.detach().float()))

        return record

    def passes(self) -> int:
        return len(self.layers[0])

    def take(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """All recorded passes as ``(ids [n, L, k], weights [n, L, k])``, then forget them."""
        import torch

        counts = {len(layer) for layer in self.layers}
        if counts != {self.passes()} or not self.passes():
            raise InputError("--model", "routers", "every MoE layer's router called once per "
                             "forward pass (a fused kernel that bypasses the router module "
                             "hides the routing; load the model without hub kernels)",
                             f"calls per layer {[len(layer) for layer in self.layers]}")
        out = []
        for step in range(self.passes()):
            ids = torch.stack([layer[step][0] for layer in self.layers], dim=1)
            weights = torch.stack([layer[step][1] for layer in self.layers], dim=1)
            order = torch.argsort(weights, dim=2, descending=True, stable=True)
            out.append((ids.gather(2, order).cpu().numpy().astype(np.int64),
                        weights.gather(2, order).cpu().numpy().astype(np.float32)))
        self.layers = [[] for _ in self.layers]
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def collect_batch(model: Any, tokenizer: Any, texts: list[str], max_length: int,
                  decode_tokens: int) -> dict[str, np.ndarray]:
    """Run one batch; return its trace arrays (prefill sequences, then decode sequences).

    Returns ``topk_ids``/``topk_weights [tokens, L, k]``, ``seq_lens``, ``seq_index`` (row in
    the batch) and ``seq_phase`` per sequence.
    """
    import torch

    recorder = RouterRecorder(find_routers(model))
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length).to(model.device)
        with torch.no_grad():
            if decode_tokens:
                model.generate(**batch, max_new_tokens=decode_tokens,
                               min_new_tokens=decode_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
            else:
                # Positions count real tokens only, as generate does under left padding.
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                model(**batch, position_ids=positions)
        passes = recorder.take()
    finally:
        recorder.remove()
    mask = batch["attention_mask"].bool().cpu().numpy()              # [B, S]
    B, S = mask.shape
    ids, weights = passes[0]
    shape = (B, S, *ids.shape[1:])
    ids, weights = ids.reshape(shape)[mask], weights.reshape(shape)[mask]
    seq_lens = [mask.sum(axis=1)]
    phases = [np.full(B, "prefill")]
    if len(passes) > 1:
        # Each decode pass routes one new token per row: [T, B, L, k] -> row after row.
        steps = len(passes) - 1
        dec_ids = np.stack([p[0] for p in passes[1:]]).swapaxes(0, 1).reshape(B * steps,
                                                                              *ids.shape[1:])
        dec_w = np.stack([p[1] for p in passes[1:]]).swapaxes(0, 1).reshape(dec_ids.shape)
        ids, weights = np.concatenate([ids, dec_ids]), np.concatenate([weights, dec_w])
        seq_lens.append(np.full(B, steps))
        phases.append(np.full(B, "decode"))
    return {"topk_ids": ids, "topk_weights": weights,
            "seq_lens": np.concatenate(seq_lens).astype(np.int64),
            "seq_index": np.tile(np.arange(B), len(phases)),
            "seq_phase": np.concatenate(phases)}


def load_model(name: str, device: str | None = None) -> tuple[Any, Any]:
    """A local model and tokenizer (never downloads: ``local_files_only``)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InputError("--model", "dependencies", COLLECT_HINT) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype="auto")
    except (OSError, ValueError) as exc:
        raise InputError("--model", "model", "a local model folder or a cached Hugging Face "
                         "model (collect never downloads)", exc) from None
    return model.to(device).eval(), tokenizer


def collect_trace(model: Any, tokenizer: Any, texts: list[str], out: str | os.PathLike,
            datasets: list[str] | None = None, batch_size: int = 8, max_length: int = 512,
            decode_tokens: int = 0, progress: Callable[[int], None] | None = None) -> Trace:
    """Record the routing of ``texts`` through ``model`` into the trace file ``out``.

    Args:
        model: a transformers MoE causal LM (see ``find_routers``).
        tokenizer: its tokenizer (padding side set to left for generation).
        texts: prompts; each becomes a ``prefill`` sequence (and a ``decode`` one).
        out: the ``.npz`` trace to write (atomically, from per-batch chunks).
        datasets: a dataset name per text (label ``seq_dataset``), or None.
        batch_size: prompts per forward pass.
        max_length: prompt tokens kept (truncation).
        decode_tokens: tokens to generate greedily per prompt (0: prefill only); the last
            generated token is never fed back, so a decode sequence has ``decode_tokens - 1``
            routed tokens.
        progress: called with the number of prompts done after each batch.
    """
    out = Path(out)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parts = out.with_name(f".{out.name}.chunks")
    parts.mkdir(parents=True, exist_ok=True)
    try:
        for number, start in enumerate(range(0, len(texts), batch_size)):
            arrays = collect_batch(model, tokenizer, texts[start : start + batch_size],
                                   max_length, decode_tokens)
            arrays["seq_request"] = arrays.pop("seq_index") + start
            write_npz(parts / f"{number:06d}.npz", compress=False, **arrays)
            if progress is not None:
                progress(min(batch_size, len(texts) - start))
        trace = _assemble(sorted(parts.glob("*.npz")), int(find_routers(model)[0].num_experts),
                          datasets, str(out))
        trace.save(out)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return trace


def _assemble(chunks: list[Path], num_experts: int, datasets: list[str] | None, source: str
              ) -> Trace:
    parts = [dict(np.load(chunk, allow_pickle=False)) for chunk in chunks]
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    labels = {"seq_request": joined["seq_request"], "seq_phase": joined["seq_phase"]}
    if datasets is not None:
        labels["seq_dataset"] = np.asarray(datasets)[joined["seq_request"]]
    return Trace(topk_ids=joined["topk_ids"], num_experts=num_experts,
                 topk_weights=joined["topk_weights"], seq_lens=joined["seq_lens"],
                 seq_labels=labels, source=source)
