"""The shared start of the workflow scripts: a job's failure and warnings reach the rule's log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from support.workflow import REPO


def run_job(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``body`` as a workflow script would, after ``setup``; return the process and its log."""
    log = tmp_path / "logs" / "job.log"
    script = tmp_path / "job.py"
    start = f"""
        import sys, types, warnings
        sys.path.insert(0, {str(REPO / "workflow" / "scripts")!r})
        from script_setup import setup
        smk = types.SimpleNamespace(log=[{str(log)!r}], threads=1, rule="some_rule")
        setup(smk)
        """
    script.write_text(textwrap.dedent(start) + textwrap.dedent(body))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    return result, log.read_text()


def test_an_uncaught_error_is_written_to_the_rules_log(tmp_path: Path) -> None:
    result, written = run_job(tmp_path, """raise ValueError("prompt 'p7' is too long")""")
    assert result.returncode == 1
    assert "canopy.rule.some_rule" in written
    assert "ValueError: prompt 'p7' is too long" in written
    assert "Traceback" in written
    # Still on stderr, where Snakemake shows it, and only once.
    assert result.stderr.count("Traceback") == 1


def test_a_library_warning_is_written_to_the_rules_log_once(tmp_path: Path) -> None:
    result, written = run_job(
        tmp_path,
        """
        from canopy.entropy import TruncationWarning
        warnings.warn("prompt 'p7': truncation rate 40%", TruncationWarning)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert written.count("TruncationWarning: prompt 'p7': truncation rate 40%") == 1
    assert result.stderr.count("TruncationWarning: prompt 'p7'") == 1


def test_a_figure_is_drawn_with_the_rules_settings_and_outputs_and_logged(tmp_path: Path) -> None:
    table = tmp_path / "summary.tsv"
    table.write_text(
        "sampling\tembedder\tslope_ratio\tslope_ratio_ci_low\tslope_ratio_ci_high\t"
        "slope_ratio_boot_ci_low\tslope_ratio_boot_ci_high\trho_difference\t"
        "rho_difference_ci_low\trho_difference_ci_high\n"
        "default\tminilm\t2.7\t1.9\t3.5\t2.0\t3.7\t0.21\t0.1\t0.3\n"
        "topk1000\tminilm\t2.2\t1.5\t2.9\t1.6\t3.0\t0.15\t0.02\t0.27\n"
    )
    pdf, png = tmp_path / "figures" / "forest.pdf", tmp_path / "figures" / "forest.png"
    result, written = run_job(
        tmp_path,
        f"""
        from script_setup import render_figure
        from canopy.figures import render_forest
        smk.params = types.SimpleNamespace(settings={{"width": 4.0, "dpi": 60}})
        smk.output = types.SimpleNamespace(pdf={str(pdf)!r}, png={str(png)!r})
        render_figure(smk, render_forest, {str(table)!r})
        """,
    )
    assert result.returncode == 0, result.stderr
    assert pdf.read_bytes().startswith(b"%PDF") and png.read_bytes().startswith(b"\x89PNG")
    # The PNG's width in pixels (its header's) is the settings' width in inches at their dpi.
    assert int.from_bytes(png.read_bytes()[16:20], "big") == 240
    assert f"wrote {pdf} and {png}" in written
