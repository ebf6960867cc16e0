"""Every ```python block of the README runs, in order and in one namespace (as a reader would paste them), at a tiny
budget: ``learn`` runs a single update whatever ``total_timesteps`` it is given, and the batch sizes are shrunk by
substitution (``meta_batch_size=2``, ``n_steps=100``)."""

import re
from pathlib import Path

import pytest

from sb3_metacpo import CPO, MetaCPO

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = [(r"\bmeta_batch_size=\d[\d_]*", "meta_batch_size=2"), (r"\bn_steps=\d[\d_]*", "n_steps=100")]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    return [
        (text[: match.start()].count("\n") + 2, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


def shrink(code: str) -> str:
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


def test_the_readme_has_python_blocks():
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 3


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks save models in the working directory
    for cls in (MetaCPO, CPO):  # MetaTRPO inherits MetaCPO's learn

        def one_update(self, total_timesteps, *args, _learn=cls.learn, **kwargs):
            return _learn(self, 1, *args, **kwargs)

        monkeypatch.setattr(cls, "learn", one_update)
    namespace: dict = {"__name__": "readme"}
    for line, code in python_blocks(README.read_text(encoding="utf-8")):
        try:
            exec(compile(shrink(code), f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"the README's python block at line {line} fails: {type(error).__name__}: {error}")
    assert {"model", "dist", "env", "obs", "info"} <= set(namespace)  # every block ran to its end


def test_every_inline_task_distribution_call_of_the_readme_and_the_docs_runs():
    """The README's range override, ``make_task_distribution("Toy2DNav", train_ranges={"n_hazards": (2, 4)})``, raised
    (its integer range touched the held-out one); inline code is not in the python blocks run above."""
    from sb3_metacpo import make_task_distribution

    sources = [README, *sorted((README.parent / "docs" / "guide").glob("*.rst"))]
    calls = [
        (source.name, match.group(1))
        for source in sources
        for match in re.finditer(r"``?(make_task_distribution\([^`]*\))``?", source.read_text(encoding="utf-8"))
    ]
    assert len(calls) >= 3
    for where, call in calls:
        try:
            eval(call, {"make_task_distribution": make_task_distribution})
        except Exception as error:
            pytest.fail(f"{where}: {call} fails: {type(error).__name__}: {error}")
