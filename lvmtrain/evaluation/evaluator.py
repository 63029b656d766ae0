"""The evaluator: every set of a run scored by every rank for its share (`eval.sets`).

Each rank embeds its batches (the same batches on any world size: `EvalBatches`); what a score
needs from the whole set is brought together once: summed counts (zeroshot, classify), the
queries gathered and the memory bank searched where it lies (knn), the features gathered
(retrieval, linear). A sharded evaluation decides exactly as one process. Every forward is a
collective under sharding backends: every rank runs the same ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.data.loader import build_eval_loader
from lvmtrain.data.shards import DataError
from lvmtrain.distributed.dims import Dims, all_reduce_max, all_reduce_sum
from lvmtrain.evaluation.features import Embedded, embed, gather_rows, knn_search
from lvmtrain.evaluation.labels import zero_shot_weights
from lvmtrain.evaluation.scores import class_counts, classification_scores, knn_vote, linear_probe, recall_hits
from lvmtrain.evaluation.sets import LEGACY, EvalSet

RECALL_AT = (1, 5, 10)


class Evaluator:
    """Scores `sets` (resolved `EvalSet`s) with loaders built once (cfg: DataConfig)."""

    def __init__(self, sets: list[EvalSet], data_cfg, dims: Dims, *, image_size: int, batch_size: int,
                 tokenizer: Callable | None = None):
        self.sets, self.dims, self.tokenizer = sets, dims, tokenizer

        def loader(shards, fields=("label",)):
            return build_eval_loader(shards, data_cfg, dims, image_size=image_size, batch_size=batch_size,
                                     fields=fields)

        self.loaders = [(loader(s.data, ("captions",) if s.kind == "retrieval" else ("label",)),
                         loader(s.train) if s.train is not None else None) for s in sets]

    def __call__(self, model: nn.Module, *, normalize: Callable[[Tensor], Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> dict[str, float]:
        """{"eval/NAME/SCORE": value} of every set (collective)."""
        was_training = model.training
        model.eval()
        out = {}
        try:
            for s, (data, train) in zip(self.sets, self.loaders):
                run = _Run(s, model, self.dims, normalize, autocast, self.tokenizer)
                scores = getattr(run, s.kind)(data, train)
                out.update({f"eval/{s.name}/{k}": v for k, v in scores.items()})
        finally:
            model.train(was_training)
        return out


class _Run:
    """One set's scoring by one model."""

    def __init__(self, s: EvalSet, model: nn.Module, dims: Dims, normalize, autocast, tokenizer):
        self.s, self.model, self.dims, self.device, self.tokenizer = s, model, dims, dims.device, tokenizer
        self.embed = lambda loader, encode, **kw: embed(loader, encode, dims.device, normalize=normalize,
                                                        autocast=autocast, **kw)
        self.autocast = autocast

    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    def classify(self, data, _) -> dict:
        got = self.embed(data, self.model)
        classes = int(all_reduce_max(torch.tensor([max((f.shape[-1] for f in got.features), default=0)],
                                                  device=self.device)))
        return self._counted(got, classes, "model.num_classes")

    @torch.no_grad()
    def zeroshot(self, data, _) -> dict:
        classifier = zero_shot_weights(self.model, self.tokenizer, self.s.class_names, self.s.templates, self.device,
                                       autocast=self.autocast)
        got = self.embed(data, lambda images: self.image_features(images) @ classifier)
        key = "eval.class_names" if self.s.name == LEGACY else f"the class names of set '{self.s.name}'"
        return self._counted(got, len(self.s.class_names), key)

    def _counted(self, got: Embedded, classes: int, key: str) -> dict:
        """Top-1, top-5 and mean per-class recall from each batch's logits, counts summed over ranks."""
        _check_labels(self.s, got, classes, key, self.device)
        counts = torch.zeros(classes, 3, dtype=torch.float64, device=self.device)
        for logits, labels in zip(got.features, got.labels):
            counts += class_counts(logits, labels.to(self.device), classes)
        return {**classification_scores(all_reduce_sum(counts)), **self._skipped(got)}

    def knn(self, data, train) -> dict:
        bank = self.embed(train, self.image_features)
        got = self.embed(data, self.image_features)
        classes = self._classes(bank, got)
        queries, _ = gather_rows(got.cat("features", self.device), got.cat("index", self.device))
        labels, _ = gather_rows(got.cat("labels", self.device), got.cat("index", self.device))
        sims, _, neighbour_labels = knn_search(queries, bank, self.s.k)
        votes = knn_vote(sims, neighbour_labels, classes, self.s.temperature)
        scores = classification_scores(class_counts(votes, labels, classes))
        bank_size = all_reduce_sum(torch.tensor([float(sum(len(i) for i in bank.index))], device=self.device))
        return {**scores, "bank": int(bank_size), **self._skipped(got)}

    def linear(self, data, train) -> dict:
        fit = self.embed(train, lambda images: self.model.encode_image(images))
        got = self.embed(data, lambda images: self.model.encode_image(images))
        classes = self._classes(fit, got)
        rows = {}
        for name, part in (("train", fit), ("test", got)):
            index = part.cat("index", self.device)
            rows[name] = (gather_rows(part.cat("features", self.device), index)[0],
                          gather_rows(part.cat("labels", self.device), index)[0])
        # NOTE: every rank fits the same probe on the same gathered features: no rank waits
        logits, wd = linear_probe(*rows["train"], rows["test"][0], classes, weight_decays=self.s.probe_weight_decay,
                                  steps=self.s.probe_steps)
        scores = classification_scores(class_counts(logits, rows["test"][1], classes))
        return {**scores, "weight_decay": wd, **self._skipped(got)}

    def _classes(self, *parts: Embedded) -> int:
        """The class names' count when given, else the largest label seen + 1 (over ranks)."""
        largest = max((int(t.max()) for p in parts for t in p.labels if t.numel()), default=-1)
        seen = int(all_reduce_max(torch.tensor([largest], device=self.device))) + 1
        if self.s.class_names:
            for part in parts:
                _check_labels(self.s, part, len(self.s.class_names), f"the class names of set '{self.s.name}'",
                              self.device)
            return len(self.s.class_names)
        return seen

    @torch.no_grad()
    def retrieval(self, data, _) -> dict:
        texts: list[tuple[Tensor, Tensor]] = []  # (features, owner image position * 2^20 + caption number)

        def captions(batch, _features):
            lines = [[c.strip() for c in text.splitlines() if c.strip()] for text in batch.captions]
            flat = [c for caption in lines for c in caption]
            owner = torch.tensor([int(i) * (1 << 20) + j for i, caption in zip(batch.index, lines)
                                  for j in range(len(caption))], dtype=torch.int64)
            with self.autocast():
                features = self.model.encode_text(self.tokenizer(flat).to(self.device)).float()
            texts.append((F.normalize(features, dim=-1), owner))

        got = self.embed(data, self.image_features, on_batch=captions)
        images, image_index = gather_rows(got.cat("features", self.device), got.cat("index", self.device))
        text_rows = torch.cat([t for t, _ in texts]) if texts else torch.empty(0, images.shape[-1], device=self.device)
        owner = torch.cat([o for _, o in texts]) if texts else torch.empty(0, dtype=torch.int64)
        text_rows, owner = gather_rows(text_rows, owner.to(self.device))
        owner_row = torch.searchsorted(image_index, owner >> 20)  # the row of each caption's image
        hits = torch.zeros(2, len(RECALL_AT), dtype=torch.float64)
        chunk = 1024
        for c, lo in enumerate(range(0, max(len(images), len(text_rows)), chunk)):
            if c % self.dims.world != self.dims.rank:  # NOTE: fixed chunks of queries dealt over the ranks; counts summed
                continue
            if lo < len(text_rows):
                t = text_rows[lo:lo + chunk]
                relevant = owner_row[lo:lo + chunk, None] == torch.arange(len(images), device=self.device)[None]
                hits[1] += recall_hits(t @ images.T, relevant, RECALL_AT)
            if lo < len(images):
                rows = torch.arange(lo, min(lo + chunk, len(images)), device=self.device)
                hits[0] += recall_hits(images[lo:lo + chunk] @ text_rows.T, rows[:, None] == owner_row[None], RECALL_AT)
        hits = all_reduce_sum(hits.to(self.device)).cpu()
        out = {f"i2t_R@{k}": float(hits[0, i]) / max(len(images), 1) for i, k in enumerate(RECALL_AT)}
        out.update({f"t2i_R@{k}": float(hits[1, i]) / max(len(text_rows), 1) for i, k in enumerate(RECALL_AT)})
        return {**out, "images": len(images), "captions": len(text_rows), **self._skipped(got)}

    def _skipped(self, got: Embedded) -> dict:
        skipped = int(all_reduce_sum(torch.tensor([float(got.skipped)], device=self.device)))
        return {"skipped": skipped} if skipped else {}


def _check_labels(s: EvalSet, got: Embedded, classes: int, key: str, device: torch.device) -> None:
    """DataError on every rank when any rank's share has a label outside 0..classes-1 (a miss
    forever, and a poor score that looks merely poor), naming an example."""
    outside, largest, example, samples = 0, -1, "", 0
    for labels, keys, shards in zip(got.labels, got.keys, got.shards):
        samples += labels.numel()
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            j = int(bad.nonzero()[0])
            outside += int(bad.sum())
            largest = max(largest, int(labels.max()))
            example = example or f"label {int(labels[j])} of sample '{keys[j]}' in {shards[j]}"
    counts = all_reduce_sum(torch.tensor([float(outside), float(samples)], dtype=torch.float64, device=device))
    if counts[0] == 0:
        return
    largest = int(all_reduce_max(torch.tensor([largest], device=device)))
    source = "data.val" if s.name == LEGACY else f"evaluation set '{s.name}'"
    raise DataError(f"evaluation: {int(counts[0])} of {int(counts[1])} samples of {source} have a label outside "
                    f"0..{classes - 1} (largest label {largest}{'; e.g. ' + example if example else ''}), but there "
                    f"are {classes} classes ({key}); top-1 would count them as misses: give {key} one entry per "
                    f"label, in label order, or point {source} at shards of these classes")
