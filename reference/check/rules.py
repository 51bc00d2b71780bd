"""The entries of `reference.check`'s diagnosis tables: `Facts`, what an entry reads about a
first difference; `Rule`, one entry (when, in words and as a test, -> the lesson); and `RULES`,
the entries of every chapter in the order they are tried: the records' shape, then the stages
that add a capability (resume, two processes, fp16), the methods' phases (DPO, GRPO), and last
the loop of chapter 01, by key and step; and `CRASHES`, the entries for a run that crashed, by
what its stderr shows."""
import math
from typing import NamedTuple

from .lessons import LESSONS, lineage

SAMPLING_KEYS = ("tokens", "num_tokens", "completions/mean_length", "completions/clipped_ratio")
REWARD_KEYS = ("reward", "rewards/correctness_reward/mean", "rewards/correctness_reward/std")
GROUP_KEYS = ("reward_std", "frac_reward_zero_std")
DPO_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class Facts:
    """What the table reads about a first difference: where it is, which keys differ in that
    record, the values on both sides, and what the stage's flags imply (epoch starts, the
    resumed steps, GRPO's reuse steps)."""

    def __init__(self, chapter, stage, phase, report, mine, ref):
        d = report.first
        self.chapter, self.stage, self.phase, self.d = chapter, stage, phase, d
        self.method = "sft" if phase == "sft" else {"04": "dpo", "05": "grpo"}.get(chapter, "sft")
        self.split, self.step, self.key, self.kind = d.split, d.step, d.key, d.kind
        self.keys = {x.key for x in report.differences
                     if (x.split, x.step) == (d.split, d.step) and x.key is not None}
        self.a = mine.get((d.split, d.step)) or {}
        self.b = ref.get((d.split, d.step)) or {}
        o = stage.options
        self.accum = int(o.get("grad_accum_steps", 1))
        self.world = stage.nproc
        self.amp = o.get("amp", "off")
        self.max_grad_norm = float(o.get("max_grad_norm", math.inf))
        self.mu = int(o.get("num_iterations", 1)) if self.method == "grpo" else 1
        self.epoch_starts = stage.epoch_starts(phase, self.method)
        resumed = stage.crash_at is not None and phase == ""
        self.checkpoint = stage.checkpoint if resumed else None

    def differ(self, *keys):
        return any(k in self.keys for k in keys)

    def same(self, *keys):
        return all(k not in self.keys and k in self.a and k in self.b for k in keys)

    def ratio(self, key):
        a, b = self.a.get(key), self.b.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            return a / b
        return None

    @property
    def first_resumed(self):
        return None if self.checkpoint is None else self.checkpoint + 1

    @property
    def reuse(self):
        """GRPO: this step trains on the completions of the step before (no new samples)."""
        return self.mu > 1 and (self.step - 1) % self.mu != 0


class Rule(NamedTuple):
    """One entry of a table: `when` (in words) -> `lesson`, tried in order."""
    scope: str  # the phase's method it applies to: "any", "sft", "dpo" or "grpo"
    when: str
    lesson: str
    test: object  # Facts -> bool
    also: tuple = ()  # other lessons that fit the same evidence, less often
    kinds: tuple = ()  # the stage kinds it needs (none: any stage)


def near(x, target, rel):
    return x is not None and abs(x - target) <= rel * abs(target)


def count_only(f):
    """The loss's sum is the same and only its divisor differs: loss * loss_count agrees."""
    if not all(k in r for r in (f.a, f.b) for k in ("loss", "loss_count")):
        return False
    sa, sb = f.a["loss"] * f.a["loss_count"], f.b["loss"] * f.b["loss_count"]
    return abs(sa - sb) <= 1e-5 * abs(sb)


def dpo_term(r):
    """The DPO part of a logged DPO loss: the loss less --rpo-alpha (1.0 in check) x nll_loss."""
    return r["loss"] - r.get("nll_loss", 0.0)


RULES = [
    # the record itself
    Rule("any", "a key is missing from a record", "schema", lambda f: f.kind == "missing_key"),
    Rule("any", "steps missing or extra after a resume", "resume_log",
         lambda f: f.kind != "value" and f.checkpoint is not None, kinds=("resume", "reshard")),
    Rule("any", "the SFT phase of a two-phase chapter has other steps", "two_phase",
         lambda f: f.kind != "value" and f.phase == "sft"),
    Rule("any", "train steps or eval records missing or extra", "loop",
         lambda f: f.kind != "value"),
    # a resumed run (the uninterrupted one matched)
    Rule("any", "resume: a step before the checkpoint differs", "resume_log",
         lambda f: f.checkpoint is not None and f.step <= f.checkpoint,
         kinds=("resume", "reshard")),
    # chapter 06's resumes (two processes; then one): the DCP shards and the global position
    Rule("any", "resume: tokens of the first resumed step (or of a later epoch start)",
         "fsdp_position", lambda f: f.checkpoint is not None and f.differ("tokens", "loss_count")
         and (f.step == f.first_resumed or f.step in f.epoch_starts), ("fsdp_checkpoint",),
         kinds=("resume", "reshard")),
    Rule("any", "resume on one process (the two-process resume matched): tokens of a later "
         "step", "fsdp_position", lambda f: f.checkpoint is not None
         and f.differ("tokens", "loss_count"), kinds=("reshard",)),
    Rule("any", "resume: the loss of the first resumed step, tokens equal (the weights read "
         "back)", "fsdp_checkpoint", lambda f: f.step == f.first_resumed and f.split == "train"
         and f.key == "loss", ("fsdp_position",), kinds=("resume", "reshard")),
    Rule("any", "resume: lr, an eval record or a later step (the first resumed one matched)",
         "fsdp_checkpoint", lambda f: f.checkpoint is not None, ("fsdp_position",),
         kinds=("resume", "reshard")),
    Rule("grpo", "resume: the samples of the first resumed step differ", "grpo_rng",
         lambda f: f.step == f.first_resumed and f.differ(*SAMPLING_KEYS, *REWARD_KEYS),
         kinds=("resume",)),
    Rule("any", "resume: tokens of the first resumed step (or of a later epoch start)",
         "resume_data", lambda f: f.checkpoint is not None and f.differ("tokens", "loss_count")
         and (f.step == f.first_resumed or f.step in f.epoch_starts), ("resume_state",),
         kinds=("resume",)),
    Rule("any", "resume: the loss of the first resumed step, lr equal (another batch)",
         "resume_data", lambda f: f.step == f.first_resumed and f.split == "train"
         and f.key == "loss", ("resume_state",), kinds=("resume",)),
    Rule("any", "resume: lr, an eval record or a later step (the first resumed one matched)",
         "resume_state", lambda f: f.checkpoint is not None, ("resume_data",),
         kinds=("resume",)),
    # two processes (one process matched)
    Rule("grpo", "two processes: the samples differ", "grpo_rng",
         lambda f: f.step == 1 and f.differ(*SAMPLING_KEYS, *REWARD_KEYS), ("ddp_sampler",),
         kinds=("ddp",)),
    Rule("any", "two processes, FSDP: grad_norm at step 1, the loss equal and the ratio not "
         "world_size or 1/world_size (a rank's own norm, not the global one)", "fsdp_clip",
         lambda f: f.step == 1 and f.key == "grad_norm" and f.same("loss") and not any(
             near(f.ratio("grad_norm"), r, 1e-3) for r in (f.world, 1 / f.world)), ("ddp_sum",),
         kinds=("ddp",)),
    Rule("any", "two processes, FSDP: a later train step, not an epoch's first, step 1 equal "
         "(the ranks scaled or updated their shards apart)", "fsdp_clip",
         lambda f: f.step > 1 and f.split == "train" and f.step not in f.epoch_starts,
         ("fsdp_shard", "ddp_sum"), kinds=("ddp",)),
    Rule("any", "two processes: the first step of a later epoch", "ddp_sampler",
         lambda f: f.step in f.epoch_starts, kinds=("ddp",)),
    Rule("any", "two processes: tokens about 1/world_size or world_size times the reference's",
         "ddp_sum", lambda f: f.differ("tokens", "loss_count") and (
             0.3 < (f.ratio("tokens") or f.ratio("loss_count") or 1) < 0.7
             or 1.5 < (f.ratio("tokens") or f.ratio("loss_count") or 1) < 3), kinds=("ddp",)),
    Rule("any", "two processes: other tokens at step 1 (other data on the ranks)", "ddp_sampler",
         lambda f: f.differ("tokens", "loss_count"), ("ddp_sum",), kinds=("ddp",)),
    Rule("any", "two processes: the loss about 1/world_size or world_size times the "
         "reference's (not summed over the ranks)", "ddp_sum",
         lambda f: f.key == "loss" and (0.3 < f.ratio("loss") < 0.7 or 1.5 < f.ratio("loss") < 3),
         kinds=("ddp",)),
    Rule("any", "two processes: the loss, tokens equal (the ranks read other data)",
         "ddp_sampler", lambda f: f.key == "loss", ("ddp_sum",), kinds=("ddp",)),
    Rule("any", "two processes: grad_norm (loss equal) or a metric", "ddp_sum",
         lambda f: True, ("ddp_sampler",), kinds=("ddp",)),
    # fp16 (fp32 matched)
    Rule("any", "fp16: grad_norm at step 1 many times the reference's (the loss scale)",
         "clipping", lambda f: f.step == 1 and f.key == "grad_norm"
         and (f.ratio("grad_norm") or 0) > 100, kinds=("fp16",)),
    Rule("any", "fp16: another difference", "amp", lambda f: True, ("clipping",),
         kinds=("fp16",)),
    # DPO (chapter 04's phase 2)
    Rule("dpo", "the phase's lr at step 1", "two_phase", lambda f: f.step == 1 and f.key == "lr"),
    Rule("dpo", "tokens or loss_count at step 1", "dpo_count",
         lambda f: f.step == 1 and f.differ("tokens", "loss_count")),
    Rule("dpo", "rewards/* at step 1 (the reference's are 0), or later ones while the "
         "log-probs agree", "dpo_reference",
         lambda f: f.differ(*DPO_REWARDS) and (f.step == 1 or f.same("logps/chosen",
                                                                      "logps/rejected"))),
    Rule("dpo", "logps/chosen or logps/rejected at step 1", "dpo_logps",
         lambda f: f.step == 1 and f.differ("logps/chosen", "logps/rejected")),
    Rule("dpo", "the first loss less the NLL term is not ln 2", "dpo_reference",
         lambda f: f.step == 1 and "loss" in f.keys and "nll_loss" not in f.keys and
         abs(dpo_term(f.b) - math.log(2)) < 1e-6 < abs(dpo_term(f.a) - math.log(2)),
         ("dpo_loss",)),
    Rule("dpo", "loss, nll_loss or grad_norm at step 1 (log-probs and rewards equal)",
         "dpo_loss", lambda f: f.step == 1 and f.split == "train", ("dpo_reference",)),
    Rule("dpo", "a later step (step 1 matched)", "dpo_loss",
         lambda f: f.split == "train", ("two_phase", "dpo_reference")),
    Rule("dpo", "an eval record's pref_accuracy or loss", "dpo_eval",
         lambda f: f.differ("pref_accuracy", "loss")),
    # GRPO (chapter 05's phase 2)
    Rule("grpo", "the phase's lr at step 1", "two_phase", lambda f: f.step == 1 and f.key == "lr"),
    Rule("grpo", "the completions (tokens, lengths) of a sampling step", "grpo_sampling",
         lambda f: f.split == "train" and not f.reuse and f.differ(*SAMPLING_KEYS)
         and f.step == 1, ("grpo_rng",)),
    Rule("grpo", "the rewards of a sampling step (completions equal)", "grpo_reward",
         lambda f: f.step == 1 and f.differ(*REWARD_KEYS)),
    Rule("grpo", "the groups' statistics (reward_std, frac_reward_zero_std)", "grpo_advantages",
         lambda f: f.step == 1 and f.differ(*GROUP_KEYS)),
    Rule("grpo", "loss_count", "grpo_count", lambda f: f.differ("loss_count")),
    Rule("grpo", "kl at step 1 (the policy is the reference there: it must be 0)", "grpo_kl",
         lambda f: f.step == 1 and f.differ("kl")),
    Rule("grpo", "the loss at step 1 is minus the reference's", "grpo_advantages",
         lambda f: f.step == 1 and f.key == "loss" and f.b["loss"] != 0
         and near(f.ratio("loss"), -1.0, 1e-6)),
    Rule("grpo", "the loss at step 1 is far from 0 (ratio 1: it is minus the mean advantage)",
         "grpo_loss", lambda f: f.step == 1 and f.key == "loss"
         and abs(f.b["loss"]) < 1e-5 < abs(f.a["loss"]) / 10),
    Rule("grpo", "entropy at step 1 (log-probs of the sampling distribution)", "grpo_loss",
         lambda f: f.step == 1 and f.differ("entropy")),
    Rule("grpo", "loss or grad_norm at step 1 (samples and rewards equal)", "grpo_advantages",
         lambda f: f.step == 1 and f.split == "train", ("grpo_loss",)),
    Rule("grpo", "a later sampling step's samples (the steps before matched)", "grpo_rng",
         lambda f: not f.reuse and f.differ(*SAMPLING_KEYS, *REWARD_KEYS), ("grpo_sampling",)),
    Rule("grpo", "a reuse step's samples or rewards (it must train on the same completions)",
         "grpo_clip", lambda f: f.reuse and f.differ(*SAMPLING_KEYS, *REWARD_KEYS, *GROUP_KEYS)),
    Rule("grpo", "kl or entropy after a step whose loss and grad_norm matched: that update "
         "went another way (a sign)", "grpo_advantages",
         lambda f: f.split == "train" and f.differ("kl", "entropy"), ("grpo_kl", "two_phase")),
    Rule("grpo", "a reuse step's clip_ratio (pi_old)", "grpo_clip",
         lambda f: f.reuse and f.differ("clip_ratio/low_mean", "clip_ratio/high_mean",
                                        "clip_ratio/region_mean")),
    Rule("grpo", "a reuse step's loss (kl equal): the clipped objective", "grpo_clip",
         lambda f: f.reuse and f.key == "loss", ("grpo_loss",)),
    Rule("grpo", "a reuse step's grad_norm with loss and kl equal: the KL's gradient", "grpo_kl",
         lambda f: f.reuse and f.key == "grad_norm", ("grpo_clip",)),
    Rule("grpo", "another train step", "grpo_loss", lambda f: f.split == "train",
         ("grpo_clip", "two_phase")),
    # clipping and accumulation (a DPO or GRPO phase has its own entries above)
    Rule("sft", "grad_norm at step 1 at most --max-grad-norm where the reference's is above it",
         "clipping", lambda f: f.step == 1 and f.key == "grad_norm" and f.same("loss")
         and f.a["grad_norm"] <= f.max_grad_norm * (1 + 1e-6) < f.b["grad_norm"]),
    Rule("sft", "with accumulation: grad_norm at step 1 differs, loss equal", "accumulation",
         lambda f: f.accum > 1 and f.step == 1 and f.key == "grad_norm" and f.same("loss")),
    Rule("sft", "accumulation stage (one micro-batch matched): the loss at step 1",
         "accumulation", lambda f: f.step == 1 and f.key == "loss", kinds=("accum",)),
    Rule("sft", "accumulation stage (step 1 matched): a later step differs", "clipping",
         lambda f: f.step > 1 and f.split == "train", ("accumulation", "optimizer"),
         kinds=("accum",)),
    # the loop of chapter 01 (and of every SFT phase), by key and step
    Rule("sft", "tokens at step 1, the loss's sum equal (only the divisor differs)", "targets",
         lambda f: f.step == 1 and f.differ("tokens", "loss_count")
         and (f.same("loss") or count_only(f))),
    Rule("sft", "tokens at step 1 (another batch)", "data",
         lambda f: f.step == 1 and f.differ("tokens", "loss_count"), ("targets",)),
    Rule("any", "lr at step 1", "schedule", lambda f: f.step == 1 and f.key == "lr"),
    Rule("sft", "loss at step 1 and mean_token_accuracy too (the model's predictions differ)",
         "init", lambda f: f.step == 1 and f.key == "loss" and f.differ("mean_token_accuracy"),
         ("loss", "data")),
    Rule("sft", "loss at step 1 (tokens, lr and predictions equal)", "loss",
         lambda f: f.step == 1 and f.key == "loss", ("init",)),
    Rule("any", "grad_norm at step 1 with an equal loss", "grad_norm",
         lambda f: f.step == 1 and f.key == "grad_norm"),
    Rule("sft", "another metric at step 1 (loss equal)", "metrics",
         lambda f: f.step == 1 and f.split == "train"),
    Rule("any", "tokens at the first step of a later epoch (chapter 03 on: set_epoch)",
         "ddp_sampler", lambda f: f.chapter >= "03" and f.step in f.epoch_starts
         and f.differ("tokens", "loss_count"), ("data",)),
    Rule("any", "tokens at a later step", "data", lambda f: f.differ("tokens", "loss_count")),
    Rule("any", "lr at a later step", "schedule", lambda f: f.key == "lr"),
    Rule("sft", "one FSDP process: loss or grad_norm at a later step, step 1 and tokens equal "
         "(the clip's scale)", "fsdp_clip", lambda f: f.step > 1 and f.split == "train"
         and f.key in ("loss", "grad_norm"), ("optimizer", "fsdp_shard"), kinds=("one",)),
    Rule("any", "loss equal at step 1 but not at a later step", "optimizer",
         lambda f: f.split == "train"),
    Rule("any", "an eval record (the train records up to it matched)", "eval",
         lambda f: f.split == "eval"),
]


class Crash(NamedTuple):
    """An entry for a crashed run: `text` in a rank's stderr -> `lesson`."""
    text: str
    when: str
    lesson: str


CRASHES = [
    Crash("has no attribute 'to_local'", "a gradient that is no DTensor shard: a module left "
          "out of fully_shard, the root maybe", "fsdp_shard"),
    Crash("torch/distributed/checkpoint/", "a crash inside DCP: dcp.save, dcp.load, "
          "get_state_dict or set_state_dict", "fsdp_checkpoint"),
    Crash("torch/distributed/fsdp/", "a crash inside FSDP: fully_shard, or a sharded module's "
          "forward or backward", "fsdp_shard"),
]
PEER_GONE = ("Connection reset by peer", "Connection closed by peer")  # another rank crashed


def crash_entry(chapter, stderrs):
    """The first entry of CRASHES, of a lesson that chapter `chapter` teaches, that a rank's
    stderr shows; a rank that only saw another one go is not read, unless all did. None when
    none fits."""
    texts = [t.replace("\\", "/") for t in stderrs if t]
    texts = [t for t in texts if not any(p in t for p in PEER_GONE)] or texts
    for crash in CRASHES:
        if LESSONS[crash.lesson].chapter in lineage(chapter) and any(crash.text in t
                                                                     for t in texts):
            return crash
    return None

