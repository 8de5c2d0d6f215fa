"""Fit the all-to-all kernels' constants to their published measurements and print how well
the cost model then reproduces them (moetuner.kernel_calibration: sources and the replayed setting).

    python bench/kernels.py            # print the fit table
    python bench/kernels.py --write    # also rewrite src/moetuner/data/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from moetuner.costmodel import CostCoefficients
from moetuner.kernel_calibration import (
    MEASUREMENTS,
    NORMAL_NVLINK,
    NORMAL_RDMA,
    NORMAL_SOURCE,
    fit,
    predicted,
)

OUT = Path(__file__).resolve().parent.parent / "src" / "moetuner" / "data" / "kernels.json"
H800_NVLINK, NIC = 200.0, 50.0  # GB/s per GPU per direction of the published machines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the shipped constants")
    args = parser.parse_args()
    kernels = {name: fit(m) for name, m in MEASUREMENTS.items()}
    rdma = np.array(list(NORMAL_RDMA.values()))
    kernels["deepep-normal"] = {
        direction: {"latency": 0.0, "intra_efficiency": NORMAL_NVLINK[d] / H800_NVLINK,
                    "inter_efficiency": float(rdma[:, d].mean()) / NIC}
        for d, direction in enumerate(("dispatch", "combine"))}
    coefficients = CostCoefficients(kernels=kernels)
    print("| kernel | EP | dispatch us (published / predicted / error) | "
          "combine us (published / predicted / error) |")
    print("|---|---|---|---|")
    for name, m in MEASUREMENTS.items():
        p = predicted(m, coefficients)
        for i, ep in enumerate(m.ep_sizes):
            cells = []
            for d, published in enumerate((m.dispatch, m.combine)):
                error = p[d, i] / published[i] - 1
                cells.append(f"{published[i] * 1e6:.0f} / {p[d, i] * 1e6:.0f} / "
                             f"{100 * error:+.1f}%")
            print(f"| {name} | {ep} | {cells[0]} | {cells[1]} |")
    print("\nconstants (latency s, intra / inter efficiency vs the link's nominal bandwidth):")
    print(json.dumps(kernels, indent=1))
    if args.write:
        provenance = {
            "fitted": datetime.date.today().isoformat(),
            "by": "python bench/kernels.py --write (moetuner.kernel_calibration)",
            "sources": {name: m.source for name, m in MEASUREMENTS.items()}
            | {"deepep-normal": NORMAL_SOURCE},
            "reference_links": "H800: NVLink 200 GB/s per direction; H100: 450 GB/s; "
                               "ConnectX-7 400 Gb/s = 50 GB/s per GPU per direction",
            "note": "efficiencies are effective: the replay counts no message to the "
                    "token's own GPU, so a kernel that moves those too can fit above 1; "
                    "deepep-normal's published figures are throughputs (latency 0)",
        }
        OUT.write_text(json.dumps({"kernels": kernels, "provenance": provenance}, indent=1)
                       + "\n")
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
