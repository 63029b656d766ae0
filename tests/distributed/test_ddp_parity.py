"""torchrun with 2 ranks (gloo, CPU) follows the same loss curve as 1 process on the same global batch."""

import pytest

from tests.conftest import read_metrics, run_lvmtrain


def losses(run_dir, key="loss"):
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


# NOTE: CLIP on 2 ranks is covered, with every backend, in test_backends.py.
@pytest.mark.parametrize("config, extra", [
    ("configs/debug/vit.yaml", ["optim.label_smoothing=0.1"]),
])
def test_two_ranks_match_one_process(tmp_path, shards, config, extra):
    common = ["train", config, f"data.train={shards['train']}", "data.val=", "train.steps=20", "train.epochs=0",
              "log.every=1", "data.workers=1", "optim.warmup_steps=5", f"log.dir={tmp_path}", *extra]
    run_lvmtrain([*common, "run.name=one", "data.batch_size=32"])
    run_lvmtrain([*common, "run.name=two", "data.batch_size=16"], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-3 * abs(one[step]), (step, one[step], two[step])
    # The model really trained (the comparison is not between two flat lines).
    assert one[20] < one[1] - 0.1
