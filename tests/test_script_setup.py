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
