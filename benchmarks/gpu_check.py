"""One-shot GPU validation of the kit on one CUDA GPU (~8 minutes, no download); see qlora_med.bench.gpu_check.

    python benchmarks/gpu_check.py                       # on the GPU machine: results in benchmarks/results/gpu_check/
    python benchmarks/gpu_check.py --tiny --cpu --skip-tests --out /tmp/gpu_check   # the same logic, tiny, on CPU
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if "--cpu" in sys.argv:  # before torch is imported anywhere
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from qlora_med.bench.gpu_check import main

    sys.exit(main())
