"""Test setup: which devices and backends the suite runs on.

DALLE_FAST_TEST_DEVICES (comma-separated, default "cpu") picks the devices; the GPU check script sets
"cuda". On CPU, Triton runs under its interpreter, which must be switched on before triton is imported.
Every backend expected on a device is tested there: one that cannot serve fails its tests, it is never
skipped.
"""

import os
import zlib

DEVICES = [d.strip() for d in os.environ.get("DALLE_FAST_TEST_DEVICES", "cpu").split(",") if d.strip()]
if "cuda" not in DEVICES:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# The kernel backends each device must serve; eager is the oracle and is tested too.
BACKENDS_BY_DEVICE = {"cpu": ("cpp", "triton", "eager"), "cuda": ("cuda", "triton", "eager")}
DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in BACKENDS_BY_DEVICE[d]]
# Files of CUDA-only tests are not collected at all without cuda (never counted as skipped coverage).
collect_ignore_glob = [] if "cuda" in DEVICES else ["test_*_cuda.py"]
KERNEL_DEVICE_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if b != "eager"]


def pytest_report_header(config):
    return f"dalle_fast test devices: {DEVICES}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


def pytest_configure(config):
    if "cuda" in DEVICES and not torch.cuda.is_available():
        raise pytest.UsageError("DALLE_FAST_TEST_DEVICES asks for cuda, but torch sees no CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of many small ops (a second thread only adds synchronisation, and
    stalls on a busy 2-core machine). Use as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
