"""DPO: train the policy to prefer the chosen completion over the rejected one, measured
against a frozen reference model (Rafailov et al., 2023, "Direct Preference Optimization").

Batch: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` `[B, T]`
(labels at the same positions as input_ids, -100 = not part of the completion), optional
`chosen_attention_mask`, `rejected_attention_mask`, and optional precomputed
`ref_chosen_logps`, `ref_rejected_logps` `[B]`. Chosen and rejected may have different widths.

The math is plain functions, so tests and notebooks can call them directly.
"""
import warnings

import torch
import torch.nn.functional as F

from .logprobs import check_batch, forward_logits, sequence_logps
from .runtime import autocast_context
from .trainer import Trainer

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_dpo_options(beta, loss_type, label_smoothing):
    """ValueError naming the first bad DPO option."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the KL penalty to the reference; 0.1 is "
                         f"usual), got beta={beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the probability that a preference "
                         f"label is wrong), got {label_smoothing}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, chosen_tokens=None,
             rejected_tokens=None):
    """Per-pair losses [B] and the implicit rewards beta * log(pi / pi_ref) of each side [B].

    logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)): how
    much more the policy prefers chosen than the reference did. The loss types follow TRL:
      sigmoid: -log sigmoid(beta * logits), the DPO paper's loss. label_smoothing = e makes it
               conservative DPO (cDPO, Mitchell 2023), which assumes each preference label is
               flipped with probability e; current TRL no longer applies label_smoothing to
               its sigmoid loss, so compare like with like
      ipo:     (logits - 1 / (2 * beta))**2 (Azar et al., 2023), which regresses the margin to
               a target instead of pushing it to infinity. As its authors and TRL define it,
               each side's log-probs are averaged over its completion tokens first, so the loss
               does not grow with the completions' length: pass chosen_tokens and
               rejected_tokens [B]
      hinge:   relu(1 - beta * logits), the SLiC margin loss
    The rewards are detached: they are for logging, not for the gradient."""
    check_dpo_options(beta, loss_type, label_smoothing)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' averages each side's log-probs over its completion "
                             "tokens: pass chosen_tokens and rejected_tokens, one count per pair")
        policy_chosen_logps, ref_chosen_logps = (x / chosen_tokens for x in
                                                 (policy_chosen_logps, ref_chosen_logps))
        policy_rejected_logps, ref_rejected_logps = (x / rejected_tokens for x in
                                                     (policy_rejected_logps, ref_rejected_logps))
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid()): stays finite when beta * logits is +-1e4
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's DPO metrics as `name: (sum over pairs, number of pairs)`.

    Sums, not means: the trainer adds them over micro-batches and ranks and divides once, so
    the logged mean does not depend on how the step's pairs were split."""
    n = chosen_rewards.numel()
    chosen_rewards, rejected_rewards = (chosen_rewards.detach().float(),
                                        rejected_rewards.detach().float())
    return {
        "rewards/chosen": (chosen_rewards.sum(), n),
        "rewards/rejected": (rejected_rewards.sum(), n),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), n),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), n),
        "logps/chosen": (policy_chosen_logps.detach().float().sum(), n),
        "logps/rejected": (policy_rejected_logps.detach().float().sum(), n),
    }


def _pad_right(x, T, value):
    return F.pad(x, (0, T - x.shape[1]), value=value)


def concat_pairs(batch, pad_id):
    """Chosen rows then rejected rows as one `[2B, T]` batch: (input_ids, labels, attention_mask).

    One forward pass over both halves instead of two: the weights are read once, and under DDP
    or FSDP there is one forward per backward. The narrower half is right-padded (ids with
    pad_id, labels with -100, mask with 0). A missing mask means every position is a token."""
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids, labels, masks = [], [], []
    for side in ("chosen", "rejected"):
        side_ids = batch[f"{side}_input_ids"]
        mask = batch.get(f"{side}_attention_mask")
        if mask is None:
            mask = torch.ones_like(side_ids)
        ids.append(_pad_right(side_ids, T, pad_id))
        labels.append(_pad_right(batch[f"{side}_labels"], T, -100))
        masks.append(_pad_right(mask, T, 0))
    return torch.cat(ids), torch.cat(labels), torch.cat(masks)


def check_dpo_batch(batch):
    """ValueError for a missing or misshapen key or a row with nothing to score; a warning for
    pairs whose chosen and rejected are the same (their logits are 0: no gradient, loss ln 2).
    Returns the number of pairs."""
    for side in ("chosen", "rejected"):
        keys = (f"{side}_input_ids", f"{side}_labels")
        if f"{side}_attention_mask" in batch:
            keys += (f"{side}_attention_mask",)
        check_batch(batch, keys, "DPO")
    B = batch["chosen_input_ids"].shape[0]
    if batch["rejected_input_ids"].shape[0] != B:
        raise ValueError(f"DPO batch has {B} chosen rows but "
                         f"{batch['rejected_input_ids'].shape[0]} "
                         "rejected rows; each pair needs one of each")
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch and tuple(batch[key].shape) != (B,):
            raise ValueError(f"DPO batch key {key!r} has shape {tuple(batch[key].shape)}; "
                             f"expected [B] = ({B},), one log-prob per pair")
    for side in ("chosen", "rejected"):
        # label 0 is never predicted (nothing comes before it), hence the shift
        empty = ((batch[f"{side}_labels"][:, 1:] != -100).sum(dim=1)
                 == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"DPO batch row {empty[0]} of {side + '_labels'!r} "
                             "is a completion with "
                             "no tokens (every label is -100), so it has no log-prob to compare; "
                             "label the completion tokens, or drop the pair")
    ids, labels, mask = concat_pairs(batch, pad_id=0)
    ids = ids * mask  # padding may differ in value; only real tokens decide whether two rows match
    same = ((ids[:B] == ids[B:]).all(1) & (labels[:B] == labels[B:]).all(1)
            & (mask[:B] == mask[B:]).all(1))
    if same.any():
        warnings.warn(f"{int(same.sum())} of {B} DPO pairs have identical chosen and rejected "
                      "sequences: they add no gradient but still count in the mean; check the "
                      "preference data", stacklevel=2)
    return B


@torch.no_grad()
def preference_accuracy(model, loader, device="cpu", pad_token_id=0):
    """Fraction of pairs for which the model gives the chosen completion a strictly higher
    log-prob than the rejected one: what DPO trains, measured without a reference model. Both
    halves go through one forward pass (concat_pairs), as in training."""
    was_training = model.training
    model.eval()
    wins = total = 0
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            ids, labels, mask = concat_pairs(batch, pad_token_id)
            chosen, rejected = sequence_logps(forward_logits(model, ids, mask), labels).chunk(2)
            wins += int((chosen > rejected).sum())
            total += chosen.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("preference_accuracy got no pairs: the loader is empty")
    return wins / total


# --- DPOTrainer ---------------------------------------------------------------------------
# The trainer (a `Trainer` subclass: `count` = pairs, `compute_loss` = the functions above)
# goes below this line.

def completion_tokens(labels):
    """How many completion tokens each row scores [B] (labels that are not -100, after the
    shift that sequence_logps makes)."""
    return (labels[:, 1:] != -100).sum(dim=1)


def chosen_nll(chosen_logps, chosen_labels):
    """RPO's extra term (Pang et al., 2024; TRL's `rpo_alpha`): each chosen completion's negative
    log-likelihood per token [B]. DPO only asks that chosen beat rejected, and on pairs that
    differ in a token or two it gets there by lowering both; this keeps chosen's likelihood up."""
    return -chosen_logps / completion_tokens(chosen_labels)


class ReferenceLogps:
    """The reference model's log-probs of every pair, computed once and looked up by the pair's
    tokens. Keyed by content, not by position in a loader, so a lookup hits whatever the
    sampler, epoch, rank or resume point that delivered the pair."""

    def __init__(self):
        self.table = {}

    @staticmethod
    def keys(batch):
        """One key per pair: each side's tokens and labels up to its last labelled position. A
        causal model's log-probs depend on nothing after it, so neither padding nor the mask
        changes the key."""
        sides = []
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"]
            positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
            lengths = ((labels != -100) * positions).amax(dim=1).tolist()
            ids, labels = batch[f"{side}_input_ids"].tolist(), labels.tolist()
            sides.append([(tuple(i[:n]), tuple(l[:n]))
                          for i, l, n in zip(ids, labels, lengths)])  # noqa: E741
        return list(zip(*sides))

    def add(self, batch, chosen_logps, rejected_logps):
        for key, c, r in zip(self.keys(batch), chosen_logps.tolist(), rejected_logps.tolist()):
            self.table[key] = (c, r)

    def lookup(self, batch, device):
        try:
            pairs = [self.table[key] for key in self.keys(batch)]
        except KeyError:
            raise ValueError("a DPO pair is not among the reference log-probs precomputed before "
                             "training (from train_loader's and val_loader's datasets); feed only "
                             "those loaders' batches, or pass ref_model with "
                             "precompute_ref_logps=False") from None
        logps = torch.tensor(pairs, dtype=torch.float32, device=device)
        return logps[:, 0], logps[:, 1]


def disable_dropout(model):
    """Dropout off for good, even in train mode (TRL's disable_dropout): with it, the policy's
    log-probs are noisy and differ from the reference's even where the weights are the same."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # TinyGPT's attention dropout
            module.dropout = 0.0
    return model


class DPOTrainer(Trainer):
    """Direct preference optimization of `model` against the frozen `ref_model`.

    Each step's loss is the mean per-pair DPO loss over every pair of the step (micro-batches
    and ranks included), plus `rpo_alpha` times the chosen completion's per-token NLL when
    `rpo_alpha` is set (RPO; TRL's name). The reference log-probs come from the batch
    (`ref_chosen_logps`, `ref_rejected_logps`), from a table computed once before training
    (`precompute_ref_logps=True`, after which the reference model is freed), or from a forward
    pass of `ref_model` without an autograd graph. Dropout is turned off in both models (the
    policy's modules are changed in place, as TRL's disable_dropout does)."""

    def __init__(self, model, ref_model, optimizer, train_loader, val_loader=None, beta=0.1,
                 device="auto", max_epochs=1, loss_type="sigmoid", label_smoothing=0.0,
                 precompute_ref_logps=False, pad_token_id=0, rpo_alpha=None, **trainer_kwargs):
        # check before the Trainer joins a process group or moves anything
        check_dpo_options(beta, loss_type, label_smoothing)
        if rpo_alpha is not None and not rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha must be >= 0 (the weight of the chosen completion's NLL; "
                             f"the RPO paper uses 1.0), or None for plain DPO; got {rpo_alpha}")
        if ref_model is model:
            raise ValueError("ref_model is the policy itself; it must be a frozen copy of the "
                             "starting policy: ref_model=copy.deepcopy(model)")
        if ref_model is None and precompute_ref_logps:
            raise ValueError("precompute_ref_logps=True needs ref_model to compute them with; pass "
                             "ref_model=copy.deepcopy(model) "
                             "(a frozen copy of the starting policy)")
        super().__init__(model, optimizer, train_loader, val_loader=val_loader, device=device,
                         max_epochs=max_epochs, **trainer_kwargs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precompute_ref_logps, self.pad_token_id, self.rpo_alpha = (precompute_ref_logps,
                                                                        pad_token_id, rpo_alpha)
        disable_dropout(self.raw_model)
        if ref_model is not None:
            # frozen: no gradients, no optimizer, no dropout; its forward builds no graph
            ref_model = disable_dropout(ref_model.to(self.device).eval().requires_grad_(False))
        self.ref_model, self.ref_logps = ref_model, None

    def count(self, batch):
        """Pairs: what the DPO loss is averaged over. Checks the batch on the way."""
        return torch.tensor(check_dpo_batch(batch))

    def count_tokens(self, batch):
        """The completion tokens of both halves: what a DPO step trains on."""
        return sum((batch[f"{side}_labels"][:, 1:] != -100).sum()
                   for side in ("chosen", "rejected"))

    def concatenated_forward(self, model, batch):
        """log p(chosen) and log p(rejected) `[B]` each, from one forward pass over both halves."""
        ids, labels, mask = concat_pairs(batch, self.pad_token_id)
        logps = sequence_logps(forward_logits(model, ids, mask), labels)
        B = batch["chosen_input_ids"].shape[0]
        return logps[:B], logps[B:]

    def reference_logps(self, batch):
        given = [key for key in ("ref_chosen_logps", "ref_rejected_logps") if key in batch]
        if len(given) == 1:
            raise ValueError(f"DPO batch has {given[0]!r} but not its other half; precomputed "
                             "reference log-probs come as 'ref_chosen_logps' and "
                             "'ref_rejected_logps'")
        if given:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.ref_logps is not None:
            return self.ref_logps.lookup(batch, self.device)
        if self.ref_model is None:
            raise ValueError("DPO batch has no 'ref_chosen_logps'/'ref_rejected_logps' and the "
                             "trainer has no ref_model to compute them: pass "
                             "ref_model=copy.deepcopy(model) "
                             "(a frozen copy of the starting policy), optionally with "
                             "precompute_ref_logps=True, or add the reference log-probs to the "
                             "batches")
        with torch.no_grad():
            return self.concatenated_forward(self.ref_model, batch)

    def compute_loss(self, model, batch):
        chosen_logps, rejected_logps = self.concatenated_forward(model, batch)
        ref_chosen_logps, ref_rejected_logps = self.reference_logps(batch)
        chosen_tokens, rejected_tokens = (completion_tokens(batch[f"{side}_labels"])
                                          for side in ("chosen", "rejected"))
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
            loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
        metrics = dpo_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        if self.rpo_alpha is not None:
            nll = chosen_nll(chosen_logps, batch["chosen_labels"])
            losses = losses + self.rpo_alpha * nll
            metrics["nll_loss"] = (nll.detach().sum(), nll.numel())
        return losses.sum(), metrics

    def train(self):
        self.prepare()
        return super().train()

    def prepare(self):
        """With precompute_ref_logps, score every pair under the reference once and free it.
        train() calls it; call it first to keep that one-off pass out of a timing."""
        if self.precompute_ref_logps and self.ref_logps is None:
            self.ref_logps = self.compute_reference_logps()
            self.ref_model = None  # its work is done: free its memory for the policy's training

    @torch.no_grad()
    def compute_reference_logps(self):
        """Score every pair of the train (and val) datasets under the reference, once. Every rank
        scores all of them: any rank may meet any pair in a later epoch's shuffle."""
        table = ReferenceLogps()
        for loader in (self.train_loader, self.val_loader):
            for batch in _every_pair(loader):
                batch = self.to_device(batch)
                # as the online reference would run
                with autocast_context(self.device, self.amp_dtype):
                    table.add(batch, *self.concatenated_forward(self.ref_model, batch))
        return table


def _every_pair(loader):
    """The batches of every pair in `loader`'s dataset, in order: a DataLoader's dataset read
    without its sampler, so pairs that its shuffle, shard or drop_last skip this epoch are in too;
    anything else (a list of batches) as it is."""
    if loader is None:
        return []
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, torch.utils.data.DataLoader) and not isinstance(
            dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=loader.batch_size or 1,
                                           collate_fn=loader.collate_fn)
    return loader
