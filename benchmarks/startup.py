"""Job start-up: seconds from process start to the first library call, per rule kind, before/after.

Every workflow job is a fresh Python process that runs one script of ``workflow/scripts``; before
the script's first library call it imports what its module level names, and that call may then
import more (sentence-transformers inside ``load_embedder``, scipy inside the entropy metrics).
With tiny models most of a job is this start-up, paid once per job.

For each rule of the default config this benchmark starts fresh processes that run exactly the
module-level imports of the rule's script (the ``script_setup`` line excepted) against that tree's
``src/``, and times

* ``first call``: process start to the end of those imports, i.e. to the script's first library
  call;
* ``job start``: the same plus the heavy modules that first call goes on to import
  (:data:`CALL_IMPORTS`), i.e. what the job pays before it does any work.

It does so for the current checkout ("after") and for a peer tree ("before": ``--before``, by
default the commit preceding the start-up cut, extracted with ``git archive`` into a temporary
directory), interleaved in the same run, median of ``--repeats`` rounds, and reports wall and CPU
seconds (CPU time is the fairer figure on a shared machine). The number of jobs of each rule comes
from ``snakemake -n`` of the default config in each tree, so the totals show what fewer jobs save.

Run: ``python benchmarks/startup.py [--before COMMIT] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The last commit before the start-up cut (the peer measured as "before").
BEFORE = "640bfcf"

#: Heavy modules a script's first library call imports on its own, per script: they are part of
#: what the job pays at start-up, whichever line imports them.
CALL_IMPORTS: dict[str, list[str]] = {
    "embed_rollouts.py": ["sentence_transformers"],
    "prompt_metrics.py": ["scipy.stats"],
    # Loading any model imports transformers.modeling_utils (with torch's compiler and
    # distributed packages behind it): about four times `import transformers` alone.
    "sample_rollouts.py": ["transformers.modeling_utils"],
    "pretrain_base_model.py": ["transformers.modeling_utils", "tokenizers"],
    "finetune_model.py": ["transformers.modeling_utils"],
}

# Run in the child: time.time() at the end of the imports and after the call's own imports.
_CHILD = """
import sys, time
sys.path.insert(0, {src!r})
{imports}
first = time.time()
{call_imports}
print(first, time.time())
"""


def script_imports(script: Path) -> list[str]:
    """The module-level import statements of a workflow script, in order, as source lines."""
    tree = ast.parse(script.read_text())
    lines = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.module == "script_setup":
                continue
            lines.append(ast.unparse(node))
    return lines


def rule_scripts(tree: Path) -> dict[str, str]:
    """Rule name -> script file name, from the rule files of ``tree``."""
    found: dict[str, str] = {}
    for smk in sorted((tree / "workflow" / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            match = re.match(r"rule (\w+):", line)
            if match:
                rule = match.group(1)
            match = re.match(r'\s+"\.\./scripts/(\w+\.py)"', line)
            if match and rule:
                found[rule] = match.group(1)
    return found


def planned_jobs(tree: Path) -> dict[str, int]:
    """Jobs per rule that ``snakemake -n`` plans for the default config of ``tree``."""
    with tempfile.TemporaryDirectory() as work:
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--directory", work],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
    jobs: dict[str, int] = {}
    in_stats = False
    for line in result.stdout.splitlines():
        if line.startswith("Job stats"):
            in_stats = True
            continue
        match = re.match(r"(\w+)\s+(\d+)$", line.strip())
        if in_stats and match and match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
        elif in_stats and line.startswith("total"):
            break
    return jobs


def time_child(tree: Path, script: str) -> tuple[float, float, float]:
    """(wall s to the first call, wall s to the job's start, CPU s) of one fresh process."""
    code = _CHILD.format(
        src=str(tree / "src"),
        imports="\n".join(script_imports(tree / "workflow" / "scripts" / script)),
        call_imports="\n".join(f"import {m}" for m in CALL_IMPORTS.get(script, [])),
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    first, ready = (float(x) for x in result.stdout.split()[-2:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return first - start, ready - start, cpu


def extract(commit: str, into: Path) -> Path:
    """The files of ``commit`` under ``into`` (``git archive``, no checkout touched)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
    ).stdout
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as handle:
        handle.extractall(into / "tree", filter="data")
    return into / "tree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="git commit of the 'before' peer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": extract(args.before, Path(tmp)), "after": REPO}
        scripts = {name: rule_scripts(tree) for name, tree in trees.items()}
        jobs = {name: planned_jobs(tree) for name, tree in trees.items()}
        rules = sorted(
            {r for name in trees for r in jobs[name] if r in scripts[name]},
            key=lambda r: -max(jobs["before"].get(r, 0), jobs["after"].get(r, 0)),
        )
        samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(args.repeats):
            for rule in rules:
                for name, tree in trees.items():  # interleaved: both see the same load
                    if rule in scripts[name] and rule in jobs[name]:
                        samples.setdefault((name, rule), []).append(
                            time_child(tree, scripts[name][rule])
                        )
    load = os.getloadavg()[0]
    print(
        f"start-up per job (median of {args.repeats}; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs); before = {args.before}, after = working tree"
    )
    header = (
        f"{'rule':26s} {'jobs b/a':>9s} {'first call b/a (s)':>19s} {'job start b/a (s)':>18s} "
        f"{'ratio':>6s} {'CPU b/a (s)':>12s} {'all jobs CPU b/a (s)':>21s}"
    )
    print(header)
    totals = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
    for rule in rules:
        row = {}
        for name in trees:
            values = samples.get((name, rule))
            count = jobs[name].get(rule, 0)
            if values:
                first, ready, cpu = (statistics.median(v[i] for v in values) for i in range(3))
            else:
                first = ready = cpu = 0.0
            row[name] = (count, first, ready, cpu)
            totals[name][0] += count * ready
            totals[name][1] += count * cpu
        b, a = row["before"], row["after"]
        ratio = f"{a[2] / b[2]:.2f}" if b[2] else "-"
        print(
            f"{rule:26s} {b[0]:>4d}/{a[0]:<4d} {b[1]:>9.2f}/{a[1]:<9.2f} {b[2]:>8.2f}/{a[2]:<9.2f} "
            f"{ratio:>6s} {b[3]:>5.2f}/{a[3]:<6.2f} {b[0] * b[3]:>10.1f}/{a[0] * a[3]:<10.1f}"
        )
    (wall_b, cpu_b), (wall_a, cpu_a) = totals["before"], totals["after"]
    print(
        f"all jobs of the default: start-up wall {wall_b:.1f} s -> {wall_a:.1f} s "
        f"(after/before {wall_a / wall_b:.2f}), CPU {cpu_b:.1f} s -> {cpu_a:.1f} s "
        f"(after/before {cpu_a / cpu_b:.2f})"
    )


if __name__ == "__main__":
    main()
