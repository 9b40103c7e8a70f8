import os
import sys

# Tests share two cores; one intra-op thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)
