"""im's gRPC process settings (im.grpc_runtime): applied by the command line before grpc reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from im.grpc_runtime import GRPC_EXPERIMENTS_DEFAULT, use_grpc_defaults


def test_the_default_is_set_when_the_environment_has_none() -> None:
    env: dict[str, str] = {}
    use_grpc_defaults(env)
    assert env == {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS_DEFAULT}


def test_an_operator_s_own_value_is_kept() -> None:
    env = {"GRPC_EXPERIMENTS": "event_engine_client"}
    use_grpc_defaults(env)
    assert env == {"GRPC_EXPERIMENTS": "event_engine_client"}


def test_the_command_line_applies_them_before_grpc_is_imported() -> None:
    """grpc reads GRPC_EXPERIMENTS once, when it is imported: importing the command line must not import
    it, so that main() sets the value first."""
    script = (
        "import json, os, sys\n"
        "import im.cli\n"
        "before = 'grpc' in sys.modules\n"
        "try:\n"
        "    im.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps([before, os.environ.get('GRPC_EXPERIMENTS')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, value = json.loads(out.stdout.strip().splitlines()[-1])
    assert before is False  # grpc was not imported by `import im.cli`
    assert value == GRPC_EXPERIMENTS_DEFAULT
