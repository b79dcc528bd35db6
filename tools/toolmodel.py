#!/usr/bin/env python
"""MAGA tool models: SFT set from judged runs, fine-tuning, quantized export, Table 1 report
(see docs/synthesis.md, "Tool models").

    python tools/toolmodel.py dataset --gen gen/maga --split-file data/split.json --out tm/data
    python tools/toolmodel.py train --model /models/SmolLM2-360M-Instruct --data tm/data --out tm/slm
"""

import sys

from megadoc_pl.synth.toolmodel.cli import main

if __name__ == "__main__":
    sys.exit(main())
