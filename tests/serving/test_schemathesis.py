"""The published OpenAPI schema against the real service under generated input: schemathesis
(`--checks all`: no 5xx, only documented statuses, bodies and headers as documented, schema-valid
input accepted, schema-invalid input refused, auth not ignored, 405 with Allow) on every route,
with the keys given, a fixed seed and a bounded number of examples per route."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bstrec.serving.settings import Settings
from tests.conftest import REPO
from tests.serving.fixtures import Artifacts, running

KEY = "schemathesis-key"
# says why POST /events may answer schema-valid input with its documented 422, and no other route
CONFIG = REPO / "schemathesis.toml"


def test_the_service_conforms_to_its_schema(artifacts: Artifacts, tmp_path: Path) -> None:
    # a dev dependency, installed beside this interpreter: missing is a failure, not a skip
    exe = Path(sys.executable).parent / "schemathesis"
    assert exe.exists(), f"{exe} not found: pip install -e '.[dev]'"
    # the default limits: the tests' small ones (2 KiB bodies, 5 events) are under what the
    # schema allows, and a valid body refused with 413 would be a failure
    settings = Settings(bundle=artifacts.bundle, store_path=str(tmp_path / "store.sqlite"),
                        seed_events=artifacts.samples, api_key=KEY, store_retry_s=0.2)
    with running(settings) as (url, _):
        proc = subprocess.run(
            [str(exe), "--config-file", str(CONFIG), "--no-color", "run", f"{url}/openapi.json",
             "--checks", "all", "--header", f"X-API-Key: {KEY}", "--seed", "20261205",
             "--max-examples", "20", "--generation-database", "none",
             "--request-timeout", "30"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert proc.returncode == 0 and cases is not None, out[-6000:]
    generated, passed = map(int, cases.groups())
    assert generated == passed > 200, out[-3000:]
