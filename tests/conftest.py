import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# MKL may otherwise use fewer threads when the machine is busy, which changes summation order:
# the bitwise resume tests must not depend on load.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small copy of the demo task (shards + tokenizer), written once per test session."""
    from trainer.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo_data")
    write_demo(out, sizes={"train": 800, "heldout": 64})
    return out


# Images at their own aspect ratio, wide and tall, for native-resolution runs (the tiny preset's
# budget is 32 × 32 pixels: the larger ones are scaled into it).
NATIVE_DEMO_SIZES = [(48, 24), (24, 40), (32, 32), (40, 16), (16, 32)]


@pytest.fixture(scope="session")
def native_demo_data(tmp_path_factory):
    """The demo task with images of several aspect ratios."""
    from trainer.data.demo import write_demo

    out = tmp_path_factory.mktemp("native_demo_data")
    write_demo(out, sizes={"train": 400, "heldout": 32}, image_sizes=NATIVE_DEMO_SIZES)
    return out


@pytest.fixture
def tiny_overrides(demo_data, tmp_path):
    return [
        f"data.path={demo_data}",
        f"run.dir={tmp_path / 'run'}",
        "data.batch_size=8",
        "run.log_every=1000",
        # Tests that need W&B or the end-of-run plot turn them on (tests/trainer/test_metrics.py).
        "logging.wandb.mode=disabled",
        "logging.plot=false",
    ]
