#!/usr/bin/env python3
"""Write a synthetic multi-vendor DICOM consortium (same as `medfed generate`).

python scripts/generate_consortium.py --output consortium --sites 3 data.slices=24
"""

import sys

from medfed.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
