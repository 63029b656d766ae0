"""SigLIP with FLIP patch dropout, killed and resumed: bit-exact (fp32, DDP, 2 ranks).

The ring loss's exchanges, the learnable bias and the patch-dropout draws (from the RNG each
checkpoint saves per rank) must all come back exactly after a kill -9."""

import torch

from lvmtrain.export import load_weights
from tests.conftest import read_metrics, run_lvmtrain
from tests.system.test_data_resume import kill_one_rank_after

STEPS = 16


def siglip_args(tmp_path, shards, name):
    return ["train", "configs/debug/siglip.yaml", f"data.train={shards['train']}", "data.val=",
            "data.batch_size=16", "data.workers=1", "model.patch_dropout=0.5", f"train.steps={STEPS}",
            "train.epochs=0", "checkpoint.every=8", "log.every=1", f"log.dir={tmp_path}", f"run.name={name}"]


def test_siglip_with_patch_dropout_resumes_bit_exact_after_kill_9(tmp_path, shards):
    run_lvmtrain(siglip_args(tmp_path, shards, "straight"), nproc=2)
    kill_one_rank_after(tmp_path, shards, "killed", 8, siglip_args(tmp_path, shards, "killed"))
    resumed = run_lvmtrain(siglip_args(tmp_path, shards, "killed"), nproc=2)
    assert "resumed from" in resumed.stdout
    ref = {m["step"]: (m["loss"], m["logit_bias"]) for m in read_metrics(tmp_path / "straight") if "loss" in m}
    got = {m["step"]: (m["loss"], m["logit_bias"]) for m in read_metrics(tmp_path / "killed") if "loss" in m}
    assert {s: got[s] for s in ref if s > 8} == {s: ref[s] for s in ref if s > 8}
    assert ref[STEPS][1] != ref[1][1]  # the bias learns
    ref_w = load_weights(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}")[1]
    got_w = load_weights(tmp_path / "killed" / "checkpoints" / f"step_{STEPS:08d}")[1]
    assert "logit_bias" in ref_w and all(torch.equal(got_w[n], ref_w[n]) for n in ref_w)
