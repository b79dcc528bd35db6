#!/usr/bin/env python
"""Generate synthetic data from a real corpus (see docs/synthesis.md).

    python tools/synthesize.py --task rephrase --style wikipedia --generations 32 \
        --backend vllm --model /models/Llama-3.1-8B-Instruct --input real/ --out gen/rephrase
"""

import sys

from megadoc_pl.synth.cli import main

if __name__ == "__main__":
    sys.exit(main())
