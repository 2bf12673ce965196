"""`python -m ostnet_fast.train ...` and `torchrun --nproc_per_node N -m ostnet_fast.train ...`."""
import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
