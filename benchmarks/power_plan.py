"""Time of the power planner (canopy.power.plan_power) on a panel of the Gemma run's shape.

Panel: one family x 2 variants x 4 tasks x 8 prompts (64 rows, as `config/gemma.yaml`), simulated
with known coefficients (benchmarks/simulate_panel.py) and fitted with the Gemma config's formula;
the planner then runs with ``stats.power``'s defaults (or ``--prompts``/``--simulations``) on
``--workers`` R processes. Prints the wall time, the CPU time of the R processes (user + system,
what two idle cores would need about half of) and the table. The issue's target: <= 15 minutes
on 2 cores for the Gemma run's panel.

Run: ``python benchmarks/power_plan.py [--workers 2] [--simulations 40]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path

import yaml

from canopy.power import plan_power
from canopy.stats import StatsSettings, fit_beta_glmm
from simulate_panel import simulate_panel

GEMMA = Path(__file__).resolve().parents[1] / "config" / "gemma.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--simulations", type=int, default=None)
    parser.add_argument("--prompts", type=int, nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    config = yaml.safe_load(GEMMA.read_text())
    stats = dict(config["stats"])
    power = dict(stats.get("power") or {})
    if args.simulations is not None:
        power["simulations"] = args.simulations
    if args.prompts is not None:
        power["prompts"] = args.prompts
    settings = StatsSettings.from_config({**stats, "power": power})
    n_prompts = {task["n_prompts"] for task in config["tasks"].values()}.pop()
    panel = simulate_panel(args.seed, families=tuple(config["families"]), n_prompts=n_prompts).panel
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit_beta_glmm(panel, settings, Path(tmp) / "fit")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        plan = plan_power(
            panel, Path(tmp) / "fit", settings, Path(tmp) / "power.tsv", workers=args.workers
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        f"panel: {len(panel)} rows; prompts {list(settings.power.prompts)}, "
        f"{settings.power.simulations} simulations per count and effect, "
        f"{len(plan.simulations)} refits on {args.workers} worker(s)"
    )
    print(f"wall {wall:.0f} s ({wall / 60:.1f} min); R processes' CPU {cpu:.0f} s")
    print(plan.table.to_string(index=False))


if __name__ == "__main__":
    main()
