"""README.md is the front page: its ``python`` examples run and print what it says, it stays short, and
its test command is the one CI runs.

``markdown_examples`` is shared with ``test_docs.py``, which runs the manual's pages the same way.
"""

import doctest
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: A fenced block of Python, indented or not (inside a list item): its body, up to the closing fence.
_PYTHON_BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)


def markdown_examples(path: Path) -> doctest.TestResults:
    """Run every ```python block of the Markdown file ``path`` as a doctest, top to bottom in one namespace.

    Each block is written as a console session (``>>>`` lines, then what they print), so a block's
    printed output is checked where the reader sees it. Everything outside the blocks is blanked, so a
    failure reports the page's own line number. A block without a ``>>>`` line would never run: it is a
    ValueError naming its line.
    """
    text = path.read_text(encoding="utf-8")
    kept = [""] * text.count("\n")
    for block in _PYTHON_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(2))
        if ">>> " not in block.group(2):
            raise ValueError(f"{path}:{first}: a ```python block without '>>> ' examples is never run; "
                             "write it as a console session")
        for i, line in enumerate(block.group(2).splitlines()):
            kept[first + i] = line
    test = doctest.DocTestParser().get_doctest("\n".join(kept), {"__name__": path.stem}, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    return doctest.TestResults(runner.failures, runner.tries)


def test_readme_examples():
    result = markdown_examples(README)
    assert result.attempted >= 10
    assert result.failed == 0


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


def test_readme_test_command_is_what_ci_runs():
    # .ci/run runs the README's test command, a line of its own, then the checks it cannot run itself
    readme = README.read_text(encoding="utf-8")
    commands = [block.strip() for block in readme.split("```bash\n")[1:]]
    tests = [block.split("\n```")[0] for block in commands if "-m pytest" in block.split("\n```")[0]]
    assert len(tests) == 1, tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests[0] in ci
