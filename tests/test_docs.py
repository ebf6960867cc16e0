"""Every code block of the docs runs, and the docs build offline.

Every ``.. code-block:: python`` of ``docs/**/*.rst`` and every ```python block of ``docs/**/*.md`` runs: the blocks
of a page in order and in one namespace (as a reader would paste them), in a fresh working directory, at a tiny
budget (``learn`` runs a single update whatever ``total_timesteps`` it is given; batch sizes and episode counts are
shrunk by substitution, as in ``tests/test_readme.py``). A block that fails fails its page's test. Blocks that are not
Python must say what they are (``bash``, ``console``, ``yaml``, ``text``): a block without a language (a ``::``
literal block, or ``code-block`` without an argument) or in any other language fails, so that no Python can hide in
a block this test does not run. ``literalinclude`` may only show files of ``examples/`` (run by
``tests/test_examples.py``).
"""

import re
from pathlib import Path

import matplotlib
import pytest

from sb3_metacpo import CPO, MetaCPO

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_RUN = {"bash", "console", "yaml", "text"}  # languages of blocks that are shown, not run
SHRINK = [
    (r"\bmeta_batch_size=\d[\d_]*", "meta_batch_size=2"),
    (r"\bn_steps=\d[\d_]*", "n_steps=100"),
    (r"\bn_eval_episodes=\d[\d_]*", "n_eval_episodes=1"),
    (r"\bn_episodes=\d[\d_]*", "n_episodes=1"),
    (r"\"num_workers\": \d+", '"num_workers": 1'),
]
DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>code-block|code|sourcecode)::[ \t]*(?P<lang>\S*)[ \t]*$")
LITERAL = re.compile(r"(?<!:)::[ \t]*$")  # a paragraph ending in "::" starts a literal block (not "x ::" of a directive)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*") if p.suffix in (".rst", ".md") and "_build" not in p.parts)


def _indented_block(lines: list[str], start: int, indent: int) -> tuple[str, int]:
    """The block of lines after ``start`` indented deeper than ``indent`` (options and blank lines skipped)."""
    index = start + 1
    while index < len(lines) and re.match(r"^\s+:[\w-]+:", lines[index]):  # directive options
        index += 1
    body: list[str] = []
    while index < len(lines) and (not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent):
        body.append(lines[index])
        index += 1
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    width = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
    return "\n".join(line[width:] for line in body) + "\n", index


def rst_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, language, code) of every code block and literal block of an rst text (language "" for a literal block)."""
    lines, blocks, index = text.splitlines(), [], 0
    while index < len(lines):
        line = lines[index]
        match = DIRECTIVE.match(line)
        if match:
            code, end = _indented_block(lines, index, len(match["indent"]))
            blocks.append((index + 1, match["lang"], code))
            index = end
            continue
        stripped = line.strip()
        if LITERAL.search(line) and not stripped.startswith(".."):
            indent = len(line) - len(line.lstrip())
            code, end = _indented_block(lines, index, indent)
            if code.strip():
                blocks.append((index + 1, "", code))
            index = end
            continue
        index += 1
    return blocks


def md_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, language, code) of every fenced block of a Markdown text (MyST directives such as {include} excepted)."""
    return [
        (text[: match.start()].count("\n") + 1, match.group(1), match.group(2))
        for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
        if not match.group(1).startswith("{")
    ]


def blocks_of(page: Path) -> list[tuple[int, str, str]]:
    text = page.read_text(encoding="utf-8")
    return md_blocks(text) if page.suffix == ".md" else rst_blocks(text)


def shrink(code: str) -> str:
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


PYTHON_PAGES = [page for page in pages() if any(lang == "python" for _, lang, _ in blocks_of(page))]


def test_the_extractor_finds_blocks_of_every_kind():
    text = (
        "Intro::\n\n    literal()\n\n"
        ".. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = a\nafter\n\n"
        "   .. code-block:: bash\n\n      ls\n\n.. note:: not a block\n"
    )
    assert rst_blocks(text) == [(1, "", "literal()\n"), (5, "python", "a = 1\n\nb = a\n"), (13, "bash", "ls\n")]
    assert md_blocks("# t\n```python\nx = 1\n```\n```{include} f.md\n```\n") == [(2, "python", "x = 1\n")]


def test_every_code_block_says_its_language():
    unmarked = [
        f"{page.relative_to(ROOT)}:{line} ({lang or 'no language'})"
        for page in pages()
        for line, lang, _ in blocks_of(page)
        if lang != "python" and lang not in NOT_RUN
    ]
    assert not unmarked, f"blocks that are neither python (run) nor {sorted(NOT_RUN)} (shown): {unmarked}"


def test_the_docs_have_python_blocks_on_the_guide_pages():
    names = {page.stem for page in PYTHON_PAGES}
    assert {"quickstart", "custom_tasks", "callbacks", "resuming", "constraints", "plots", "tasks"} <= names, names


def test_literalincludes_show_tested_examples_only():
    for page in pages():
        for target in re.findall(r"^\s*\.\. literalinclude:: (\S+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE):
            path = (page.parent / target).resolve()
            output = path.is_relative_to(ROOT / "benchmarks" / "results")  # a benchmark's printed output, not code
            assert (output or path.parent == ROOT / "examples") and path.is_file(), f"{page.name} includes {target}"


def test_intersphinx_reads_local_inventories_only():
    """The build must not need the network: every inventory in the mapping is a file under docs/_intersphinx."""
    namespace: dict = {"__file__": str(DOCS / "conf.py")}
    exec(compile((DOCS / "conf.py").read_text(encoding="utf-8"), "conf.py", "exec"), namespace)
    assert "sphinx.ext.intersphinx" in namespace["extensions"]
    assert {"stable_baselines3", "gymnasium", "torch", "numpy"} <= set(namespace["INTERSPHINX_PROJECTS"])
    assert "stable_baselines3" in namespace["intersphinx_mapping"]  # the API reference links into SB3's docs
    for name, (_url, inventory) in namespace["intersphinx_mapping"].items():
        assert inventory is not None and Path(inventory).is_file(), name
    fetch = (DOCS / "_intersphinx" / "fetch.sh").read_text(encoding="utf-8")
    for name in namespace["INTERSPHINX_PROJECTS"]:
        assert f"[{name}]=" in fetch, f"fetch.sh does not download {name}"


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(DOCS)) for p in PYTHON_PAGES])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write models, logs and plots in the working directory
    for cls in (MetaCPO, CPO):  # MetaTRPO inherits MetaCPO's learn

        def one_update(self, total_timesteps, *args, _learn=cls.learn, **kwargs):
            return _learn(self, 1, *args, **kwargs)

        monkeypatch.setattr(cls, "learn", one_update)
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    blocks = [(line, code) for line, lang, code in blocks_of(page) if lang == "python"]
    ray = None
    if any('sampler="ray"' in code for _, code in blocks):  # a small local Ray, which the sampler then uses
        import ray

        ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        for line, code in blocks:
            try:
                exec(compile(shrink(code), f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as error:
                pytest.fail(f"the python block at {page.relative_to(ROOT)}:{line} fails: {type(error).__name__}: {error}")
    finally:
        if ray is not None:
            ray.shutdown()


def test_the_changelog_has_the_current_version_and_is_in_the_toctree():
    version = (ROOT / "sb3_metacpo" / "version.txt").read_text(encoding="utf-8").strip()
    assert re.search(rf"^{re.escape(version)}\b", (DOCS / "changelog.rst").read_text(encoding="utf-8"), flags=re.MULTILINE)
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in ("changelog", "guide/quickstart", "guide/custom_tasks", "guide/callbacks", "guide/resuming"):
        assert re.search(rf"^\s+{page}$", index, flags=re.MULTILINE), page


ROLE = re.compile(r":(?:py:)?(class|meth|func|mod|attr|data|exc):`~?(sb3_metacpo[\w.]*)`")
DOCUMENTED = re.compile(r"^\.\. (automodule|autoclass|autoexception|autofunction):: (sb3_metacpo[\w.]*)\s*$", re.MULTILINE)


def _documented_names() -> dict[str, str]:
    """What the docs' ``auto*`` directives document (the API reference and the guide pages): name -> directive."""
    return {
        match.group(2): match.group(1)
        for page in pages()
        if page.suffix == ".rst"
        for match in DOCUMENTED.finditer(page.read_text(encoding="utf-8"))
    }


def _lookup(name: str) -> object:
    """The object ``name`` names (modules imported on the way), or AssertionError."""
    import importlib

    parts = name.split(".")
    obj: object = importlib.import_module(parts[0])
    for index, attribute in enumerate(parts[1:], start=1):
        if not hasattr(obj, attribute):
            try:
                obj = importlib.import_module(".".join(parts[: index + 1]))
                continue
            except ImportError:
                raise AssertionError(f"{name} does not exist ({attribute} is missing)") from None
        obj = getattr(obj, attribute)
    return obj


def check_link(role: str, name: str, documented: dict[str, str]) -> None:
    """AssertionError unless ``name`` exists and Sphinx documents it where the link looks for it: a module of the API
    reference (for ``:mod:``), or an object defined in one of its modules (not imported there: ``automodule`` leaves
    imported names out), a documented class or function, or a member of a documented class."""
    _lookup(name)
    if role == "mod":
        assert documented.get(name) == "automodule", f"the module {name} is not in the API reference"
        return
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        owner = ".".join(parts[:cut])
        if owner not in documented:
            continue
        if documented[owner] == "automodule":
            assert cut < len(parts), f"{name} is a module: link to it with :mod:"
            first = _lookup(".".join(parts[: cut + 1]))
            defined_in = getattr(first, "__module__", owner)
            assert defined_in == owner, f"{name} is imported into {owner} from {defined_in}: link to it there"
        return
    raise AssertionError(f"no module or class of {name} is in the API reference")


def test_check_link_finds_links_that_render_as_plain_text():
    documented = _documented_names()
    assert {"sb3_metacpo.MetaCPO", "sb3_metacpo.CPO", "sb3_metacpo.tasks.base", "sb3_metacpo.common.policies"} <= set(
        documented
    )
    for role, name in [
        ("class", "sb3_metacpo.tasks.base.TaskDistribution"),
        ("meth", "sb3_metacpo.tasks.base.TaskDistribution.make_env"),
        ("meth", "sb3_metacpo.MetaCPO.adapt"),  # inherited: MetaCPO's autoclass shows inherited members
        ("mod", "sb3_metacpo.common.constrained_step"),
    ]:
        check_link(role, name, documented)
    for role, name, message in [
        ("class", "sb3_metacpo.tasks.TaskDistribution", "no module or class"),  # importable, documented elsewhere
        ("class", "sb3_metacpo.common.envs.CostMonitor", "is imported into sb3_metacpo.common.envs"),
        ("meth", "sb3_metacpo.MetaCPO.adaptt", "does not exist"),
        ("mod", "sb3_metacpo.common.checks", "not in the API reference"),
    ]:
        with pytest.raises(AssertionError, match=message):
            check_link(role, name, documented)


@pytest.mark.parametrize("page", sorted((DOCS / "guide").glob("*.rst")), ids=lambda page: page.name)
def test_the_guide_links_only_to_names_the_api_reference_documents(page):
    """A cross-reference to a name Sphinx does not document renders as plain text without a warning (the build is not
    nitpicky: other libraries' type hints would flood it), so the guide's links into this package are checked here."""
    documented = _documented_names()
    for line_number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for role, name in ROLE.findall(line):
            try:
                check_link(role, name, documented)
            except AssertionError as error:
                pytest.fail(f"{page.relative_to(ROOT)}:{line_number}: :{role}:`{name}`: {error}")
