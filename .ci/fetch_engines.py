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
# package spec -> (archive name prefix, extra pip arguments, environment, files to extract
# relative to the package root). Sdists are downloaded after pip prepares their metadata.
ENGINES = {
    "sglang==0.5.23": ("sglang-0.5.23", [], {}, ["sglang/srt/eplb/expert_location.py"]),
    # The sdist (47 MB, not the 336 MB wheel): it carries vLLM's own EPLB tests. Its metadata
    # needs torch and setuptools-rust; "empty" is vLLM's device-free build target.
    "vllm==0.33.0": ("vllm-0.33.0", ["--no-binary", "vllm"],
                     {"VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": "0.33.0"},
                     ["vllm/distributed/eplb/policy/abstract.py",
                      "vllm/distributed/eplb/policy/default.py",
                      "vllm/distributed/eplb/eplb_state.py",
                      "tests/distributed/test_eplb_algo.py"]),
    # Only an sdist: its metadata needs setuptools-scm and a SOC_VERSION (any Ascend chip).
    "vllm-ascend==0.23.0.post1": ("vllm_ascend-0.23.0.post1", [],
                                  {"SOC_VERSION": "ascend910b1"},
                                  ["vllm_ascend/eplb/core/eplb_utils.py",
                                   "vllm_ascend/ascend_config.py"]),
}


def download(spec: str, prefix: str, arguments: list[str], env: dict[str, str]
             ) -> Path | None:
    found = sorted(DOWNLOADS.glob(prefix + "*"))
    if not found:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                                 "--no-deps", "--no-build-isolation", *arguments, spec, "-d",
                                 str(DOWNLOADS)], env={**os.environ, **env},
                                capture_output=True, text=True)
        found = sorted(DOWNLOADS.glob(prefix + "*"))
        if result.returncode or not found:
            lines = [line for line in (result.stderr + result.stdout).splitlines()
                     if "rror" in line] or ["no file"]
            print(f"engine checks: SKIP {spec}: pip download failed: {lines[-1].strip()}")
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
    for spec, (prefix, arguments, env, files) in ENGINES.items():
        archive = download(spec, prefix, arguments, env)
        if archive is not None:
            extract(archive, files)
            print(f"engine checks: {spec}: {len(files)} loader files in {SOURCES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
