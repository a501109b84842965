"""llama.cpp's side of the interop tests: its tools run on a GGUF file, their output parsed.

* ``tokens``: ``llama-tokenize --ids`` of a text file;
* ``perplexity``: ``llama-perplexity`` with ``--kl-divergence-base``, which also saves llama.cpp's log-probabilities
  of every scored position (read back by :class:`LogProbs`);
* ``continuation``: the text ``llama-simple`` (greedy sampler) prints after the prompt.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np


def run_tool(tool: Path, *args, timeout: int = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise AssertionError(f"{tool.name} {' '.join(map(str, args))} exited {done.returncode}:\n"
                             f"{done.stderr[-3000:]}")  # fmt: skip
    return done


def tokens(bin_dir: Path, model: Path, text_file: Path) -> list[int]:
    """llama.cpp's tokens of ``text_file`` (read verbatim; BOS as the file's ``add_bos_token`` says; special tokens
    not parsed, as llama-perplexity tokenizes)."""
    done = run_tool(bin_dir / "llama-tokenize", "-m", model, "-f", text_file, "--ids", "--no-parse-special",
                    "--log-disable")  # fmt: skip
    return [int(t) for t in re.findall(r"-?\d+", done.stdout.strip().splitlines()[-1])]


def perplexity(bin_dir: Path, model: Path, text_file: Path, n_ctx: int, chunks: int, threads: int,
               log_probs: Path) -> list[float]:  # fmt: skip
    """llama-perplexity's running values ``[1] … [chunks]`` over chunks of ``n_ctx`` tokens, float32 KV cache and no
    flash attention (so attention is float32 as in qcompile); the log-probabilities go to ``log_probs``.

    ``-f`` drops one trailing newline of the file: give it a text without one so that llama-tokenize sees the same."""
    done = run_tool(bin_dir / "llama-perplexity", "-m", model, "-f", text_file, "-c", n_ctx, "-b", n_ctx,
                    "--chunks", chunks, "-t", threads, "-ctk", "f32", "-ctv", "f32", "-fa", "off",
                    "--kl-divergence-base", log_probs)  # fmt: skip
    values = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", done.stdout + done.stderr)]
    assert len(values) == chunks, f"llama-perplexity printed {values}, expected {chunks} running values"
    return values


class LogProbs:
    """llama-perplexity's ``--kl-divergence-base`` file: ``tokens int32 [n_chunk * n_ctx]`` and, per chunk,
    ``chunk(i) -> float64 [n_ctx - 1 - n_ctx/2, n_vocab]``, the log-probabilities of the scored positions.

    Layout (perplexity.cpp, ``perplexity`` with a logits file): ``b"_logits_"``, int32 ``n_ctx``, ``n_vocab``,
    ``n_chunk``, the tokens int32 ``[n_chunk * n_ctx]``, then per scored position (positions ``n_ctx/2 … n_ctx-2``
    of each chunk, predicting the next token) ``nv = 2 * ceil(n_vocab / 2) + 4`` uint16: float32 ``scale``,
    float32 ``min_log_prob``, then ``q uint16 [n_vocab]``; the log-probability is ``min_log_prob + scale * q``
    (``min_log_prob`` is at least the top log-probability minus 16; ``q = 0``: at or below it)."""

    def __init__(self, path: Path):
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        if raw[:8].tobytes() != b"_logits_":
            raise ValueError(f"{path}: not a llama-perplexity logits file (magic {raw[:8].tobytes()!r})")
        self.n_ctx, self.n_vocab, self.n_chunk = np.frombuffer(raw[8:20].tobytes(), np.int32).tolist()
        end = 20 + 4 * self.n_chunk * self.n_ctx
        self.tokens = np.frombuffer(raw[20:end].tobytes(), np.int32)
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        self.scored = self.n_ctx - 1 - self.n_ctx // 2
        if raw.size - end != 2 * self.n_chunk * self.scored * nv:
            raise ValueError(f"{path}: {raw.size - end} bytes after the tokens, expected "
                             f"2 x {self.n_chunk} x {self.scored} x {nv}")  # fmt: skip
        self._rows = np.memmap(path, dtype=np.uint16, mode="r", offset=end, shape=(self.n_chunk, self.scored, nv))

    def chunk(self, i: int) -> np.ndarray:
        rows = np.asarray(self._rows[i])
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32).astype(np.float64)  # [position, 2]: scale, min
        return head[:, 1:2] + head[:, 0:1] * rows[:, 4 : 4 + self.n_vocab]


def continuation(bin_dir: Path, model: Path, prompt: str, new_tokens: int) -> str:
    """The text llama-simple prints after the prompt: it prints the prompt's pieces, then each new token's, and stops
    before an end-of-generation token."""
    out = run_tool(bin_dir / "llama-simple", "-m", model, "-n", new_tokens, prompt).stdout
    assert out.startswith(prompt), f"llama-simple's output does not start with the prompt: {out[:200]!r}"
    return out[len(prompt) :].removesuffix("\n")
