"""The shared start of the workflow scripts: a job's failure is written to the rule's log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from workflow_helpers import REPO


def test_an_uncaught_error_is_written_to_the_rules_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "job.log"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, types
            sys.path.insert(0, {str(REPO / "workflow" / "scripts")!r})
            from script_setup import setup
            smk = types.SimpleNamespace(log=[{str(log)!r}], threads=1, rule="some_rule")
            setup(smk)
            raise ValueError("prompt 'p7' is too long")
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1
    written = log.read_text()
    assert "canopy.rule.some_rule" in written
    assert "ValueError: prompt 'p7' is too long" in written
    assert "Traceback" in written
    # Still on stderr, where Snakemake shows it, and only once.
    assert result.stderr.count("Traceback") == 1


def test_a_library_warning_is_written_to_the_rules_log_once(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "job.log"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, types, warnings
            sys.path.insert(0, {str(REPO / "workflow" / "scripts")!r})
            from script_setup import setup
            smk = types.SimpleNamespace(log=[{str(log)!r}], threads=1, rule="some_rule")
            setup(smk)
            from canopy.entropy import TruncationWarning
            warnings.warn("prompt 'p7': truncation rate 40%", TruncationWarning)
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log.read_text().count("TruncationWarning: prompt 'p7': truncation rate 40%") == 1
    assert result.stderr.count("TruncationWarning: prompt 'p7'") == 1
