"""Two jobs on one node: mosaicml-streaming's shared memory and local caches never collide, and a
reader killed without cleanup (a lost worker) does not lock the next attempt out of its cache."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.config import DataConfig, StreamConfig
from trainer.data.stream import local_dir, run_cache_key

REPO = Path(__file__).resolve().parents[2]

# One process = one job's data loader: StepBatches over the given data config, a few steps.
READER = """
import json, os, signal, sys

from trainer.config import load_config
from trainer.data.decode import SampleDecoder
from trainer.data.stream import StepBatches
from trainer.distributed import WorldInfo
from trainer.data.decode import load_tokenizer, tokenizer_dir

args = json.loads(sys.argv[1])
cfg = load_config("yaml/tiny.yaml", args["overrides"])
decoder = SampleDecoder(load_tokenizer(tokenizer_dir(cfg.data)), cfg.model, cfg.data.max_tokens)
batches = StepBatches(cfg.data, decoder, WorldInfo(), cache_key=args["cache_key"])
steps = []
for _ in range(args["steps"]):
    batches.next_step()
    steps.append(batches.last_sample_ids)
print("IDS " + json.dumps(steps), flush=True)
if args.get("close"):
    batches.close()
if args.get("die"):
    # With its process group, as Ray ends a worker: Python's resource tracker (a child) would
    # otherwise unlink the shared memory, and its streaming registration stays behind.
    os.killpg(0, signal.SIGKILL)
"""


def start_reader(
    overrides: list[str], cache_key: str = "", steps: int = 6, die: bool = False, close=False
):
    args = {"overrides": overrides, "cache_key": cache_key, "steps": steps, "die": die}
    args["close"] = close
    return subprocess.Popen(
        [sys.executable, "-c", READER, json.dumps(args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=die,
    )


def finish(reader) -> tuple[int, list, str]:
    output, _ = reader.communicate(timeout=300)
    lines = [line for line in output.splitlines() if line.startswith("IDS ")]
    return reader.returncode, json.loads(lines[0][4:]) if lines else [], output


def test_two_jobs_reading_the_same_local_shards_at_once_do_not_share_state(demo_data):
    def overrides(seed: int) -> list[str]:
        return [f"data.path={demo_data}", "data.batch_size=8", f"data.shuffle_seed={seed}"]

    solo = {seed: finish(start_reader(overrides(seed)))[1] for seed in (1, 2)}
    assert solo[1] != solo[2]
    # Started together: each registers its own shared-memory prefix, so each reads exactly its
    # own order (a shared epoch counter or shard state would show up here).
    readers = {seed: start_reader(overrides(seed)) for seed in (1, 2)}
    for seed, reader in readers.items():
        returncode, ids, output = finish(reader)
        assert returncode == 0, output[-2000:]
        assert ids == solo[seed]


def test_remote_caches_are_per_run_and_survive_a_killed_reader(demo_data, tmp_path):
    cache = tmp_path / "cache"
    overrides = [
        f"data.streams=[{{remote: {demo_data}}}]",  # a path works as streaming's remote
        f"data.cache_dir={cache}",
        f"data.tokenizer={demo_data / 'tokenizer'}",
        "data.batch_size=8",
    ]
    run_a, run_b = (run_cache_key(name, str(tmp_path / name)) for name in ("a", "b"))
    assert run_a != run_b and run_a == run_cache_key("a", str(tmp_path / "a"))
    stream = StreamConfig(remote=str(demo_data))
    cache_a = local_dir(stream, str(cache), run_a)
    assert cache_a.parent == local_dir(stream, str(cache)) and cache_a.name == run_a

    # Two runs on the same remote at the same time: each downloads into its own cache.
    readers = [start_reader(overrides, key) for key in (run_a, run_b)]
    results = [finish(reader) for reader in readers]
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert results[0][1] == results[1][1]  # same data, same order
    for key in (run_a, run_b):
        assert (local_dir(stream, str(cache), key) / "train" / "index.json").is_file()

    # Run a's worker dies after building its loader, before reading (say, out of memory while
    # the engine is built): streaming has its registration but none of its file locks, which
    # would make streaming skip it. The restart reads the same cache again.
    assert finish(start_reader(overrides, run_a, steps=0, die=True))[0] == -9
    returncode, ids, output = finish(start_reader(overrides, run_a))
    assert returncode == 0, output[-2000:]
    assert "released stale streaming registrations" in output
    assert ids == results[0][1]

    # Without a run's own cache: released too, as the registration of a dead splitvlm reader.
    assert finish(start_reader(overrides, "", steps=0, die=True))[0] == -9
    returncode, _, output = finish(start_reader(overrides, ""))
    assert returncode == 0, output[-2000:]
    assert "released stale streaming registrations" in output


def leftovers() -> set[str]:
    """streaming's registrations (shared memory, lock files) and our owner records."""
    shm = {p.name for p in Path("/dev/shm").glob("[0-9][0-9][0-9][0-9][0-9][0-9]_*")}
    locks = {p.name for p in Path(tempfile.gettempdir()).glob("[0-9]*_filelock")}
    return shm | locks


def test_a_closed_reader_leaves_nothing_and_a_killed_ones_registration_goes_next(demo_data):
    overrides = [f"data.path={demo_data}", "data.batch_size=8"]
    before = leftovers()
    # Killed with its process group, as Ray ends a worker: no exit handler runs.
    assert finish(start_reader(overrides, steps=1, die=True))[0] == -9
    left = leftovers() - before
    assert any(name.endswith("_splitvlm_owners") for name in left), left
    assert any(name.endswith("_locals") for name in left), left
    # The next reader releases it; closed at the end, it leaves nothing of its own either,
    # though it is killed the same way.
    returncode, ids, output = finish(start_reader(overrides, steps=1, die=True, close=True))
    assert returncode == -9 and len(ids) == 1
    assert "released stale streaming registrations" in output
    assert leftovers() - before == set()


def test_a_run_key_is_a_directory_name_of_its_own():
    key = run_cache_key("my run/1", "/tmp/runs/x")
    assert "/" not in key and key.startswith("my_run_1-")
    assert key != run_cache_key("my run/1", "/tmp/runs/y")
    assert DataConfig().cache_dir == ""


def test_streaming_registration_waits_for_the_node_lock(demo_data):
    """Two jobs starting together register one after the other, never in the same instant."""
    import fcntl
    import tempfile
    import threading

    from trainer.config import load_config
    from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir
    from trainer.data.stream import StepBatches
    from trainer.data.streaming_compat import lock_name
    from trainer.distributed import WorldInfo

    cfg = load_config(REPO / "yaml/tiny.yaml", [f"data.path={demo_data}", "data.batch_size=8"])
    decoder = SampleDecoder(load_tokenizer(tokenizer_dir(cfg.data)), cfg.model, cfg.data.max_tokens)
    built = []
    with open(Path(tempfile.gettempdir()) / lock_name(0), "a") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX)  # another job is registering
        thread = threading.Thread(
            target=lambda: built.append(StepBatches(cfg.data, decoder, WorldInfo()))
        )
        thread.start()
        thread.join(2.0)
        assert thread.is_alive() and not built
    thread.join(60)  # closing the file released the lock
    assert built and built[0].next_step()[0]


def test_decompressing_a_shard_never_uses_a_name_another_job_writes(demo_data, tmp_path):
    """streaming decompresses through `NAME.tmp`, the same name in every job reading the same
    fresh shards (a race we measured); our stream writes a file of its own and renames it."""
    import shutil

    from trainer.config import load_config
    from trainer.data.decode import SampleDecoder, load_tokenizer, tokenizer_dir
    from trainer.data.stream import StepBatches
    from trainer.distributed import WorldInfo

    shards = tmp_path / "data"
    shutil.copytree(demo_data / "train", shards / "train", ignore=shutil.ignore_patterns("*.mds"))
    assert not list((shards / "train").glob("*.mds"))  # compressed only: fresh shards
    for zipped in (shards / "train").glob("*.mds.zstd"):
        (shards / "train" / (zipped.name.removesuffix(".zstd") + ".tmp")).mkdir()  # in the way
    cfg = load_config(
        REPO / "yaml/tiny.yaml",
        [f"data.path={shards}", f"data.tokenizer={demo_data / 'tokenizer'}", "data.batch_size=8"],
    )
    decoder = SampleDecoder(load_tokenizer(tokenizer_dir(cfg.data)), cfg.model, cfg.data.max_tokens)
    docs, skipped = StepBatches(cfg.data, decoder, WorldInfo()).next_step()
    assert len(docs) == 8 and not skipped
    assert list((shards / "train").glob("*.mds"))
    assert [p.name for p in (shards / "train").glob("*.tmp") if p.is_file()] == []


def test_the_streaming_private_api_we_rely_on_is_there():
    """A mosaicml-streaming upgrade fails here first, naming what moved."""
    import streaming
    from streaming import Stream, StreamingDataset
    from streaming.base import constant

    from trainer.data.streaming_compat import TESTED_VERSIONS

    assert streaming.__version__.startswith(TESTED_VERSIONS), streaming.__version__
    for owner, name in (
        (Stream, "_decompress_shard_part"),
        (StreamingDataset, "_get_work"),
        (streaming.base.shared.prefix, "_each_prefix_int"),
        (constant, "SHM_TO_CLEAN"),
        (constant, "BARRIER_FILELOCK"),
        (constant, "CACHE_FILELOCK"),
    ):
        assert hasattr(owner, name), f"{owner.__name__}.{name}"
