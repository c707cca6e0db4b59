"""A small held-out check during training (train.py --eval-every K): rerank the first-stage top `depth` of the first
`n_queries` queries of every dataset of a suite and report each dataset's main metric, macro-averaged over datasets
as eval.py and MRB average. It is a learning curve to watch, not a model selector: with the synthetic world's suite
as the slice, the final numbers of eval.py come from a superset of the same queries.

Scores are the trained model's own (p(yes), or z_yes for a model trained with the contrastive score), in the
training dtype, with the model switched to eval mode for the check and back to train mode after it.
"""
import torch

from .data import load_suite
from .metrics import evaluate
from .model import Qwen25VL
from .processor import Processor
from .scoring import Reranker


class Validation:
    def __init__(self, suite_dir: str, n_queries: int, depth: int, score_type: str = "sft", max_length=None):
        """Reads the suite now, so that a bad folder stops training before its first step (errors name the file)."""
        if n_queries < 1 or depth < 1:
            raise ValueError(f"validation needs n_queries >= 1 and depth >= 1, got {n_queries} and {depth}")
        self.datasets = load_suite(suite_dir)
        self.slices = {ds.name: sorted(ds.queries)[:n_queries] for ds in self.datasets}
        self.depth, self.score_type, self.max_length = depth, score_type, max_length
        self.n_queries = sum(len(q) for q in self.slices.values())

    @torch.no_grad()
    def __call__(self, model: Qwen25VL, processor: Processor) -> dict:
        """{"val_<main metric>": macro mean over datasets, "val_queries": n}; leaves the model in train mode."""
        reranker = Reranker(model, processor, max_length=self.max_length, score_type=self.score_type)  # eval mode
        try:
            per_dataset = {}
            for ds in self.datasets:
                run = {}
                for qid in self.slices[ds.name]:
                    docs = ds.candidates(qid)[:self.depth]
                    scores = reranker.score(ds.queries[qid].as_input(), [ds.corpus[d].as_input() for d in docs],
                                            ds.instruction) if docs else []
                    run[qid] = dict(zip(docs, scores))
                qrels = {qid: ds.qrels.get(qid, {}) for qid in run}
                per_dataset[ds.name] = (ds.main_metric, evaluate(qrels, run, [ds.main_metric])[ds.main_metric])
        finally:
            model.train()
        metrics = {m for m, _ in per_dataset.values()}
        name = metrics.pop() if len(metrics) == 1 else "main_metric"  # a suite mixing metrics logs "val_main_metric"
        return {f"val_{name}": sum(v for _, v in per_dataset.values()) / len(per_dataset),
                "val_queries": self.n_queries}
