"""The pytest configuration itself: what a machine without one of its plugins is told."""

from __future__ import annotations

from pathlib import Path

from helpers import run_python

ROOT = Path(__file__).resolve().parents[1]


def test_missing_timeout_plugin_is_named() -> None:
    # pyproject.toml sets `timeout`, an option of pytest-timeout; without the plugin, and
    # without `required_plugins`, --strict-config would only say "Unknown config option".
    args = ["-m", "pytest", "-p", "no:timeout", "-p", "no:cacheprovider", "--co"]
    result = run_python(*args, cwd=ROOT, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Missing required plugins: pytest-timeout" in output, output
