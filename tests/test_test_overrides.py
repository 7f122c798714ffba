"""Every environment variable the tests read is in the README's "Run the tests" table, with its default:
an override that only the test code names is one a new machine cannot find."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: ``os.environ.get("NAME", default)``, ``os.environ["NAME"]``, ``os.getenv("NAME")``
READ = re.compile(r"""(?:environ\.get|getenv)\(\s*["']([A-Z0-9_]+)["']|environ\[\s*["']([A-Z0-9_]+)["']\s*\]""")


def read_by_the_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        if path == Path(__file__).resolve():  # its own patterns name no variable
            continue
        for match in READ.finditer(path.read_text()):
            names.add(match.group(1) or match.group(2))
    return names


def test_every_variable_the_tests_read_is_documented_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", section, re.M)}
    names = read_by_the_tests()
    assert {"IM_TEST_POSTGRES_DSN", "REDIS_TEST_URL", "IM_TEST_AMQP_URL", "IM_CHROMIUM"} <= names
    missing = sorted(names - set(rows))
    assert not missing, f"read by the tests, not in README's Run the tests table: {missing}"
    assert rows["IM_TEST_POSTGRES_DSN"] == "postgresql://postgres@127.0.0.1:5432/test"
