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


# The files whose tests take minutes go first. pytest-xdist (--dist loadfile) hands files to the workers
# in collection order; the SmolLM2 end-to-end tests (~5 min each) taken late leave the other worker idle
# at the end. Longest first, the rest in their usual order (the sort is stable).
_LONG_FILES = ("test_smollm2_quality.py", "test_smollm2.py", "test_gguf.py", "test_e2e_real.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_LONG_FILES)))
