"""The scores of the evaluator, as functions of tensors: against brute force, and unchanged by
how the candidates are split (what makes a sharded evaluation decide as one process)."""

import torch

from lvmtrain.evaluation.scores import (class_counts, classification_scores, knn_vote, linear_probe, merge_topk,
                                        recall_hits)


def test_top1_top5_and_mean_per_class_recall():
    torch.manual_seed(0)
    logits, labels = torch.randn(300, 7), torch.randint(0, 7, (300,))
    labels[:50] = 0  # unbalanced: mean per-class recall differs from top-1
    logits[:50, 0] += 5
    counts = class_counts(logits[:120], labels[:120], 7) + class_counts(logits[120:], labels[120:], 7)
    got = classification_scores(counts)
    assert got["top1"] == (logits.argmax(1) == labels).double().mean().item()
    top5 = logits.topk(5, dim=1).indices
    assert got["top5"] == (top5 == labels[:, None]).any(1).double().mean().item()
    recalls = [(logits[labels == c].argmax(1) == c).double().mean().item() for c in range(7) if (labels == c).any()]
    assert abs(got["mean_per_class_recall"] - sum(recalls) / len(recalls)) < 1e-12
    assert got["mean_per_class_recall"] != got["top1"] and got["samples"] == 300


def test_topk_merge_is_the_same_however_the_candidates_are_split():
    torch.manual_seed(0)
    sims = torch.randn(16, 90).round(decimals=1)  # many equal values: ties ordered by index
    index = torch.randperm(90)[None].expand(16, -1).contiguous()
    labels = index % 4
    whole = merge_topk(sims, index, 10, labels)
    for cut in (1, 30, 61):
        parts = [merge_topk(sims[:, s], index[:, s], 10, labels[:, s]) for s in (slice(0, cut), slice(cut, None))]
        merged = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 10,
                            torch.cat([p[2] for p in parts], 1))
        for a, b in zip(whole, merged):
            assert torch.equal(a, b)
    brute = sorted(range(90), key=lambda j: (-sims[0, j].item(), index[0, j].item()))[:10]
    assert whole[1][0].tolist() == [index[0, j].item() for j in brute]


def test_knn_vote_weights_by_similarity():
    sims = torch.tensor([[0.9, 0.5, 0.5]])
    labels = torch.tensor([[1, 0, 0]])
    votes = knn_vote(sims, labels, 3, temperature=0.1)
    assert votes.argmax().item() == 1  # exp(9) > 2 exp(5)
    assert torch.allclose(votes, torch.tensor([[2 * torch.e ** 5, torch.e ** 9, 0.0]]))


def test_recall_hits_match_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(40, 8), torch.randn(25, 8)
    relevant = torch.rand(40, 25) < 0.1
    scores = q @ k.T
    got = recall_hits(scores, relevant, (1, 5, 10))
    for i, kk in enumerate((1, 5, 10)):
        top = scores.topk(kk, dim=1).indices
        assert got[i].item() == sum(relevant[r, top[r]].any().item() for r in range(40))


def test_linear_probe_separates_separable_features_and_picks_the_weight_decay_by_held_out_data():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    labels = torch.randint(0, 4, (400,))
    features = centres[labels] + torch.randn(400, 16)
    logits, wd = linear_probe(features[:300], labels[:300], features[300:], 4, weight_decays=[1e-4, 100.0], steps=50)
    assert (logits.argmax(1) == labels[300:]).double().mean() > 0.95 and wd == 1e-4
    again, _ = linear_probe(features[:300], labels[:300], features[300:], 4, weight_decays=[1e-4, 100.0], steps=50)
    assert torch.equal(logits, again)  # deterministic: every rank fits the same probe


def test_eval_set_arguments_split_only_before_known_keys_and_bad_ones_are_named():
    import pytest

    from lvmtrain.config.loader import load_config
    from lvmtrain.config.schema import ConfigError
    from lvmtrain.evaluation.standalone import parse_set

    got = parse_set("zs=zeroshot:a-{0,1}.tar,class_names=[a, b],templates=['a {}.', 'b {}'],k=3")
    assert got == {"name": "zs", "kind": "zeroshot", "data": "a-{0,1}.tar", "class_names": ["a", "b"],
                   "templates": ["a {}.", "b {}"], "k": 3}
    with pytest.raises(ConfigError, match=r"--set zs: templates='\[a \{\}\]' is not valid YAML .*quote"):
        parse_set("zs=zeroshot:x.tar,templates=[a {}]")
    with pytest.raises(ConfigError, match="NAME=KIND:SHARDS"):
        parse_set("zeroshot:x.tar")
    base = ("saved", {"model": {"name": "clip_debug"}, "data": {"train": "x.tar"}, "train": {"steps": 1}})
    with pytest.raises(ConfigError, match=r"eval.sets\[0\].kind' must be one of zeroshot, retrieval"):
        load_config(None, [], base=(base[0], {**base[1], "eval": {"sets": [parse_set("a=knnn:x.tar")]}}))
    with pytest.raises(ConfigError, match=r"eval.sets\[0\].train: knn needs labelled training shards"):
        load_config(None, [], base=(base[0], {**base[1], "eval": {"sets": [parse_set("a=knn:x.tar")]}}))
    with pytest.raises(ConfigError, match=r"eval.sets\[0\].kind: classify scores a classifier's own head"):
        load_config(None, [], base=(base[0], {**base[1], "eval": {"sets": [parse_set("a=classify:x.tar")]}}))
