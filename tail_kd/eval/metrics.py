"""Token-level evaluation metrics, accumulated chunk by chunk (no [positions, V] array for the set).

Notation: a position t of the held-out data has a target token y_t (the next token; positions
whose label is -100 are skipped), the student's next-token distribution q_t = softmax(z_t) and,
when a teacher is given, the teacher's p_t. N is the number of scored positions, V the vocabulary
size scored (the real tokens shared by both models; padded embedding rows are excluded, as in the
training loss), M the number of calibration bins (15 by default, as in Guo et al. 2017).

Metrics (each a mean over the N positions unless said otherwise):

    ce              -log q_t(y_t)                                  cross-entropy, nats per token
    perplexity      exp(ce)
    top1_accuracy   [argmax_v q_t(v) = y_t]
    kl_to_teacher   KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))     (teacher only)
    top1_agreement  [argmax q_t = argmax p_t]                                    (teacher only)
    ece             top-1 expected calibration error (Guo et al., "On Calibration of Modern Neural
                    Networks", ICML 2017, Eq. 3; the binned estimator of Naeini et al., AAAI 2015):
                    confidences c_t = max_v q_t(v), outcomes [argmax q_t = y_t];
                    ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|
    full_ece        Full-ECE (Liu et al., "Full-ECE: A Metric For Token-level Calibration on Large
                    Language Models", arXiv:2406.11345, 2024): every vocabulary probability q_t(v)
                    at every position is one prediction, with outcome [v = y_t]. With B*_m the set
                    of all (t, v) whose q_t(v) falls in bin m,
                    Full-ECE = sum_m |B*_m| / N * |A*_m - C*_m|,
                    A*_m = (1/|B*_m|) sum_{(t,v) in B*_m} [v = y_t]  (how often v is the next token)
                    C*_m = (1/|B*_m|) sum_{(t,v) in B*_m} q_t(v)      (mean predicted probability)
                    The weight divides by N, the number of positions, as in Liu et al. (not by
                    N * V, the number of predictions): Full-ECE = (1/N) sum_m |sum_{B*_m}
                    ([v = y_t] - q_t(v))| lies in [0, 2], each position bringing one unit of
                    outcome and one of probability. Dividing by N * V instead would give the same
                    ranking of models, V times smaller.

Bins are equal-width, B_m = ((m-1)/M, m/M] for m = 1..M (Guo et al.), with probability 0 in the
first bin. Both calibration errors are computed from per-bin sums (count, summed probability,
summed outcome), which add up across chunks and ranks; `CalibrationBins` also gives the
reliability diagram (per-bin mean probability against empirical frequency).

Everything here is plain torch (no transformers, no DeepSpeed): `TokenMetrics.update` takes logits
for a chunk of positions; `score_hidden_states` makes those logits chunk by chunk from final
hidden states and an lm_head, the way the training loss does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tail_kd.losses import IGNORE_INDEX, kl_sum

__all__ = [
    "NUM_BINS",
    "TOKEN_METRICS",
    "bin_index",
    "CalibrationBins",
    "TokenMetrics",
    "score_hidden_states",
]

NUM_BINS = 15


def bin_index(prob: Tensor, num_bins: int = NUM_BINS) -> Tensor:
    """The 0-based bin of each probability: bin m-1 holds ((m-1)/M, m/M]; 0 goes to bin 0."""
    index = torch.ceil(prob.double() * num_bins).long() - 1
    return index.clamp_(0, num_bins - 1)


@dataclass
class CalibrationBins:
    """Per-bin sums for a binned calibration error: count, summed probability, summed outcome.

    `normalizer` is N, the number of positions (the weight of bin m is count_m / N).
    """

    num_bins: int = NUM_BINS
    counts: Tensor = field(init=False)
    prob_sums: Tensor = field(init=False)
    hit_sums: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_bins, dtype=torch.float64)
        self.prob_sums = torch.zeros(self.num_bins, dtype=torch.float64)
        self.hit_sums = torch.zeros(self.num_bins, dtype=torch.float64)

    def add(
        self, probs: Tensor, hits: Tensor | None = None, hit_probs: Tensor | None = None
    ) -> None:
        """Add predictions `probs` (any shape) whose outcomes are `hits` (0/1, same shape), or, for
        one-hot outcomes, give `hit_probs`: the probabilities of the predictions that came true."""
        probs = probs.detach().reshape(-1)
        index = bin_index(probs, self.num_bins)
        self.counts += torch.bincount(index, minlength=self.num_bins).double().cpu()
        self.prob_sums += torch.bincount(index, probs.double(), minlength=self.num_bins).cpu()
        if hits is not None:
            hits = hits.detach().reshape(-1).double()
            self.hit_sums += torch.bincount(index, hits, minlength=self.num_bins).cpu()
        if hit_probs is not None:
            hit_index = bin_index(hit_probs.detach().reshape(-1), self.num_bins)
            self.hit_sums += torch.bincount(hit_index, minlength=self.num_bins).double().cpu()

    def error(self, normalizer: float) -> float:
        """sum_m |B_m| / normalizer * |acc_m - conf_m| = sum_m |hits_m - probs_m| / normalizer."""
        if normalizer <= 0:
            return math.nan
        return float((self.hit_sums - self.prob_sums).abs().sum() / normalizer)

    def diagram(self) -> dict[str, list[float | None]]:
        """The reliability diagram: per bin its edges, count, mean probability and frequency."""
        edges = [m / self.num_bins for m in range(self.num_bins + 1)]
        mean_prob, frequency = [], []
        for count, probs, hits in zip(self.counts, self.prob_sums, self.hit_sums, strict=True):
            mean_prob.append(float(probs / count) if count > 0 else None)
            frequency.append(float(hits / count) if count > 0 else None)
        return {
            "edges": edges,
            "count": [float(c) for c in self.counts],
            "mean_prob": mean_prob,
            "frequency": frequency,
        }

    def state(self) -> Tensor:
        return torch.cat([self.counts, self.prob_sums, self.hit_sums])

    def load_state(self, state: Tensor) -> None:
        self.counts, self.prob_sums, self.hit_sums = state.double().cpu().view(3, -1).clone()


# The names `TokenMetrics.result()` gives a value, in the order reports print them.
TOKEN_METRICS = (
    "ce",
    "perplexity",
    "top1_accuracy",
    "ece",
    "full_ece",
    "kl_to_teacher",
    "top1_agreement",
)


class TokenMetrics:
    """Accumulates the metrics of the module docstring over chunks of positions.

    `update(student_logits, targets, teacher_logits)` per chunk, `result()` at the end. The whole
    state is one float64 vector (`state()` / `load_state()`), so that ranks can sum their states
    with one all-reduce before `result()`.
    """

    _SCALARS = ("positions", "nll", "correct", "kl", "agree", "teacher_positions")

    def __init__(self, num_bins: int = NUM_BINS):
        self.num_bins = num_bins
        self.sums = dict.fromkeys(self._SCALARS, 0.0)
        self.top1 = CalibrationBins(num_bins)
        self.full = CalibrationBins(num_bins)

    @torch.no_grad()
    def update(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> None:
        """Score positions: `student_logits` [n, V] (real tokens only), `targets` [n] token ids
        (positions with -100 are skipped), `teacher_logits` [n, V] or None."""
        keep = targets != IGNORE_INDEX
        if not bool(keep.all()):
            student_logits, targets = student_logits[keep], targets[keep]
            teacher_logits = None if teacher_logits is None else teacher_logits[keep]
        if targets.numel() == 0:
            return
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
        rows = torch.arange(targets.numel(), device=targets.device)
        log_q_target = log_q[rows, targets]
        confidence, prediction = log_q.max(dim=-1)
        correct = prediction == targets
        self.sums["positions"] += targets.numel()
        self.sums["nll"] -= float(log_q_target.double().sum())
        self.sums["correct"] += float(correct.sum())
        self.top1.add(confidence.exp(), hits=correct)
        self.full.add(log_q.exp(), hit_probs=log_q_target.exp())
        if teacher_logits is not None:
            log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
            self.sums["kl"] += float(kl_sum(log_p, log_q).double().sum())
            self.sums["agree"] += float((log_p.argmax(dim=-1) == prediction).sum())
            self.sums["teacher_positions"] += targets.numel()

    def state(self) -> Tensor:
        scalars = torch.tensor([self.sums[name] for name in self._SCALARS], dtype=torch.float64)
        return torch.cat([scalars, self.top1.state(), self.full.state()])

    def load_state(self, state: Tensor) -> None:
        state = state.double().cpu()
        n = len(self._SCALARS)
        self.sums = {
            name: float(value) for name, value in zip(self._SCALARS, state[:n], strict=True)
        }
        width = 3 * self.num_bins
        self.top1.load_state(state[n : n + width])
        self.full.load_state(state[n + width :])

    def result(self) -> dict[str, float]:
        """The metrics as plain floats (NaN where undefined: no positions, no teacher)."""
        n = self.sums["positions"]
        n_t = self.sums["teacher_positions"]
        ce = self.sums["nll"] / n if n else math.nan
        return {
            "positions": n,
            "ce": ce,
            "perplexity": math.exp(ce) if math.isfinite(ce) else math.nan,
            "top1_accuracy": self.sums["correct"] / n if n else math.nan,
            "ece": self.top1.error(n),
            "full_ece": self.full.error(n),
            "kl_to_teacher": self.sums["kl"] / n_t if n_t else math.nan,
            "top1_agreement": self.sums["agree"] / n_t if n_t else math.nan,
        }

    def diagrams(self) -> dict[str, dict[str, list[float | None]]]:
        """Reliability diagrams of both calibration errors."""
        return {"ece": self.top1.diagram(), "full_ece": self.full.diagram()}


Head = Callable[[Tensor], Tensor]  # final hidden states [n, H] -> logits [n, V_rows]


@torch.no_grad()
def score_hidden_states(
    metrics: TokenMetrics,
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    *,
    vocab_size: int | None = None,
    chunk_size: int = 256,
) -> None:
    """Add a batch to `metrics`, making logits for at most `chunk_size` positions at a time.

    `student_hidden` (and `teacher_hidden`) are final hidden states [B, T, H] of the same inputs;
    `labels` [B, T] follow the Hugging Face convention (aligned with the inputs, -100 = no
    target), so position t is scored on labels[t + 1], as in training. Heads map hidden states to
    logits; columns from `vocab_size` on (padded embedding rows) are dropped before the softmax.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    s_hidden = student_hidden[:, :-1][valid]
    t_hidden = None if teacher_hidden is None else teacher_hidden[:, :-1][valid]
    targets = targets[valid]
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        s_logits = student_head(s_hidden[start:stop])[:, :vocab_size]
        t_logits = None
        if t_hidden is not None:
            t_logits = teacher_head(t_hidden[start:stop])[:, :vocab_size]
        metrics.update(s_logits, targets[start:stop], t_logits)
