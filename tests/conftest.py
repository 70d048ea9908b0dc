import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Under pytest-xdist (the README's test command runs ``-n auto``) every worker gets an equal share of
# the cores: torch in this process and in the run_quant.py/run_eval.py subprocesses the tests start
# (they inherit OMP_NUM_THREADS). Two torch processes at two threads each on two cores slow each
# other down many times over; at one thread each they both run at full speed.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = str(max(1, (os.cpu_count() or 1) // max(1, _workers)))
    os.environ["OMP_NUM_THREADS"] = _threads
    os.environ["MKL_NUM_THREADS"] = _threads
    import torch
    torch.set_num_threads(int(_threads))
