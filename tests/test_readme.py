"""The README's Python examples name what the package has: every `from centernet_ray... import`
line imports, and every imported name the example then calls is callable."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_s_python_imports_import_what_its_examples_call():
    blocks = _python_blocks()
    assert blocks, "no ```python block in README.md"
    checked = 0
    for block in blocks:
        for module, names in re.findall(r"^from (centernet_ray[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            for name in (n.strip() for n in names.split(",")):
                namespace: dict = {}
                exec(f"from {module} import {name}", namespace)  # as the reader runs it (a submodule too)
                if re.search(rf"\b{name}\(", block):
                    assert callable(namespace[name]), f"README calls {name}() but `from {module} import {name}` " \
                                                      f"gives {namespace[name]!r}"
                checked += 1
    assert checked >= 8, checked
