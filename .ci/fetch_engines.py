"""Fetch the serving engines' own loader sources for tests/test_engine_sources.py (no GPU).

Downloads the pinned engine packages without their dependencies (``pip download --no-deps``)
into ``.engines/downloads`` and extracts only the files the engine checks import into
``.engines/src``. A package that cannot be had is reported and skipped: its checks then skip
with the reason. Run from the repository root: ``python .ci/fetch_engines.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".engines"
DOWNLOADS, SOURCES = ROOT / "downloads", ROOT / "src"
# package spec -> (file name prefix on PyPI, files to extract, relative to the package root)
ENGINES = {
    "sglang==0.5.23": ("sglang-0.5.23", ["sglang/srt/eplb/expert_location.py"]),
    "vllm==0.33.0": ("vllm-0.33.0", ["vllm/distributed/eplb/policy/abstract.py",
                                     "vllm/distributed/eplb/policy/default.py"]),
    # Only an sdist: pip prepares its metadata, which needs setuptools-scm and a SOC_VERSION.
    "vllm-ascend==0.23.0.post1": ("vllm_ascend-0.23.0.post1",
                                  ["vllm_ascend/eplb/core/eplb_utils.py",
                                   "vllm_ascend/ascend_config.py"]),
}


def download(spec: str, prefix: str) -> Path | None:
    found = sorted(DOWNLOADS.glob(prefix + "*"))
    if not found:
        env = {**os.environ, "SOC_VERSION": os.environ.get("SOC_VERSION", "ascend910b1")}
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                                 "--no-deps", "--no-build-isolation", spec, "-d",
                                 str(DOWNLOADS)], env=env, capture_output=True, text=True)
        found = sorted(DOWNLOADS.glob(prefix + "*"))
        if result.returncode or not found:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no file"]
            print(f"engine checks: SKIP {spec}: pip download failed: {tail[0]}")
            return None
    return found[0]


def extract(archive: Path, files: list[str]) -> None:
    for name in files:
        target = SOURCES / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                target.write_bytes(wheel.read(name))
        else:
            with tarfile.open(archive) as sdist:
                top = sdist.getnames()[0].split("/")[0]
                target.write_bytes(sdist.extractfile(f"{top}/{name}").read())


def main() -> int:
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    for spec, (prefix, files) in ENGINES.items():
        archive = download(spec, prefix)
        if archive is not None:
            extract(archive, files)
            print(f"engine checks: {spec}: {len(files)} loader files in {SOURCES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
