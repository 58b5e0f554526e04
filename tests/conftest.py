import os

import torch
from hypothesis import settings

# Property tests explore widely but stay fast enough for CI's two cores.
settings.register_profile("qparity", max_examples=int(os.environ.get("QPARITY_EXAMPLES", "25")), deadline=None,
                          print_blob=True)
settings.load_profile("qparity")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
