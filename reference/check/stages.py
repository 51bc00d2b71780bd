"""The runs that `reference.check` compares: one `Stage` per capability a chapter adds (one
process, accumulation and clipping, fp16, two processes, kill and resume, two phases), each a
few seconds of fp32 on the CPU with every flag given explicitly, and what a stage's flags imply
(its options, the checkpoint a resumed run restarts after, the steps that begin an epoch)."""
from dataclasses import dataclass

from .lessons import CHAPTERS

DEFAULT_STEPS = 8


# --- The runs: short, fixed, and each one exercising a chapter's capability ------------------

@dataclass
class Stage:
    """One comparison: your script and the reference, run with the same flags.

    kind: "one" (one process), "accum" (accumulation and clipping on top of a matching "one"),
    "fp16" (loss scaling), "ddp" (two processes), "resume" (your run killed by --crash-at-step
    and resumed with --resume, compared with the reference's uninterrupted run), "reshard" (06:
    killed on nproc processes, resumed on resume_nproc with resume_flags, compared with the
    reference killed and resumed alike)."""
    name: str
    kind: str
    flags: list
    what: str
    nproc: int = 1
    crash_at: int = None
    phases: tuple = ("",)  # "" is DIR/metrics.jsonl, "sft" DIR/sft/metrics.jsonl (04, 05)
    resume_nproc: int = None  # kind "reshard": the resumed run's processes (default nproc)
    resume_flags: tuple = ()  # kind "reshard": flags that replace their values on the resume

    @property
    def slug(self):
        return self.name.replace(" ", "_")

    @property
    def options(self):
        """{flag name: value} of self.flags, e.g. {"grad_accum_steps": "2"}."""
        out, flags = {}, list(self.flags)
        for i, flag in enumerate(flags):
            if flag.startswith("--"):
                value = flags[i + 1] if i + 1 < len(flags) and not \
                    flags[i + 1].startswith("--") else True
                out[flag[2:].replace("-", "_")] = value
        return out

    @property
    def checkpoint(self):
        """The step that the resumed run restarts after (kind "resume")."""
        if self.crash_at is None:
            return None
        every = int(self.options.get("save_every", 1))
        return self.crash_at // every * every

    def resumed(self):
        """(processes, flags) of the run that resumes the killed one: the same, or for kind
        "reshard" another world size and the flags of resume_flags (the same global batch)."""
        flags, changes = list(self.flags), list(self.resume_flags)
        for flag, value in zip(changes[::2], changes[1::2]):
            if flag in flags:
                flags[flags.index(flag) + 1] = value
            else:
                flags += [flag, value]
        return self.resume_nproc or self.nproc, flags + ["--resume"]

    def epoch_starts(self, phase, method):
        """The steps (after step 1) at which a new pass over the training data begins."""
        o = self.options
        n = train_size(int(o["digits"]), int(o["eval_size"]))
        sharded = "save_every" in o  # chapter 03 on: a DistributedSampler, one shard per rank
        per_rank = n // self.nproc if sharded else n
        batches = per_rank // int(o["batch_size"])
        accum = int(o.get("grad_accum_steps", 1))
        mu = int(o.get("num_iterations", 1)) if method == "grpo" else 1
        last = int(o["sft_steps"] if phase == "sft" else o["max_steps"])
        starts, epoch = set(), 1
        while batches and (epoch * batches // accum) * mu + 1 <= last:
            starts.add((epoch * batches // accum) * mu + 1)
            epoch += 1
        return starts


def train_size(digits, eval_size):
    """len(make_addition_splits(digits, eval_size)[0]), without building the problems."""
    return min(10 ** (2 * digits) - eval_size, 200_000)


def stages(chapter, steps=DEFAULT_STEPS):
    """The runs that check compares for chapter `chapter`, each a few seconds at most.

    Every run: seed 0, the CPU, 1-digit sums (64 train problems, 36 held out, answers of one or
    two digits, so rows and micro-batches have unequal lengths), a 1-layer model of width 32,
    a 2-step warmup, every flag given explicitly."""
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter must be one of {', '.join(CHAPTERS)}, got {chapter!r}")
    if steps < 4:
        raise ValueError(f"--steps must be >= 4 (a warmup, its end, an optimizer step after "
                         f"another), got {steps}")
    k, half = str(steps), str(max(1, steps // 2))
    common = ["--seed", "0", "--device", "cpu", "--digits", "1", "--eval-size", "36",
              "--n-layer", "1", "--n-head", "4", "--n-embd", "32", "--weight-decay", "0.1",
              "--warmup-steps", "2"]
    if chapter == "01":
        return [Stage("one process", "one", common + ["--lr", "5e-3", "--max-steps", k,
                      "--batch-size", "8", "--eval-every", half],
                      f"{k} steps of 8 sequences: warmup, cosine decay, AdamW, two evaluations")]
    if chapter == "02":
        base = common + ["--lr", "5e-3", "--max-steps", k, "--eval-every", half]
        return [
            Stage("one micro-batch", "one", base + ["--batch-size", "8", "--grad-accum-steps",
                  "1", "--amp", "off", "--max-grad-norm", "1e9"],
                  f"{k} steps of one micro-batch of 8, no clipping: chapter 01's loop"),
            Stage("accumulation and clipping", "accum", base + ["--batch-size", "6",
                  "--grad-accum-steps", "2", "--amp", "off", "--max-grad-norm", "1.0"],
                  f"{k} steps of 2 micro-batches of 6 (of unequal lengths from step 1), "
                  "clipped to norm 1"),
            Stage("fp16", "fp16", common + ["--lr", "5e-3", "--max-steps", "4", "--eval-every",
                  "4", "--batch-size", "4", "--grad-accum-steps", "2", "--amp", "fp16",
                  "--max-grad-norm", "1.0"],
                  "4 steps under fp16 autocast with a GradScaler, clipped to norm 1")]
    loop = common + ["--batch-size", "8", "--grad-accum-steps", "2", "--amp", "off",
                     "--max-grad-norm", "1.0", "--keep-last", "2"]
    if chapter in ("03", "06"):
        save = max(1, steps // 2 - 1)
        flags = loop + ["--lr", "5e-3", "--max-steps", k, "--eval-every", half,
                        "--save-every", str(save)]
        if chapter == "06":
            return fsdp_stages(flags + ["--mixed-precision", "off"], k, save)
        return [
            Stage("one process", "one", flags, f"{k} steps of 2 micro-batches of 8, a new epoch "
                  f"every 4 steps, a checkpoint every {save}"),
            Stage("two processes", "ddp", flags, "the same on two processes (torchrun), "
                  "an epoch every 2 steps", nproc=2),
            Stage("kill and resume", "resume", flags, f"killed after step {save + 2} by "
                  f"--crash-at-step, resumed with --resume from its step-{save} checkpoint",
                  crash_at=save + 2)]
    if chapter == "04":
        flags = loop + ["--lr", "1e-2", "--eval-every", half, "--save-every", half,
                        "--sft-steps", str(2 * steps), "--sft-target", "0.02",
                        "--max-steps", k, "--beta", "0.1", "--dpo-lr", "2e-3",
                        "--dpo-warmup-steps", "2", "--rpo-alpha", "1.0"]
        return [Stage("both phases", "one", flags, f"SFT until an evaluation reaches 2% exact "
                      f"match (at most {2 * steps} steps), then {k} DPO steps of 2 x 8 pairs "
                      "with RPO", phases=("sft", ""))]
    mu, group = 2, 4
    save = mu * max(1, steps // (2 * mu))
    flags = loop + ["--lr", "1e-2", "--eval-every", "8", "--save-every", str(save),
                    "--sft-steps", "64", "--sft-target", "0.3", "--max-steps", k,
                    "--method", "grpo", "--num-samples-per-prompt", str(group),
                    "--clip-eps", "0.2", "--num-iterations", str(mu), "--temperature", "1.0",
                    "--grpo-lr", "1e-2", "--grpo-warmup-steps", "2", "--grpo-beta", "0.05"]
    what = (f"SFT until 30% exact match (at most 64 steps), then {k} GRPO steps of 2 x 8 "
            f"prompts x {group} samples, each batch of samples used for {mu} steps, KL 0.05")
    return [
        Stage("both phases", "one", flags, what, phases=("sft", "")),
        Stage("kill and resume", "resume", flags, f"killed after GRPO step {save + 1}, resumed "
              f"from its step-{save} checkpoint (the sampler's state)", crash_at=save + 1,
              phases=("sft", "")),
        Stage("two processes", "ddp", flags, "both phases on two processes (torchrun)", nproc=2,
              phases=("sft", ""))]


def fsdp_stages(flags, k, save):
    """Chapter 06: chapter 03's runs under FSDP2 (one process is a 1-rank FSDP run), the kill
    and resume on two processes (DCP shards, every rank's RNG), and a resume of the two-process
    run on one process with 4 micro-batches of 8 instead of 2: the same global batch, a
    position that only a global sample count gets right (a batch is 8 samples there, 16 here)."""
    return [
        Stage("one process", "one", flags, f"{k} steps of 2 micro-batches of 8 on one FSDP "
              f"rank, a new epoch every 4 steps, a sharded checkpoint every {save}"),
        Stage("two processes", "ddp", flags, "the same on two processes (torchrun): each rank "
              "holds half of every parameter, an epoch every 2 steps", nproc=2),
        Stage("kill and resume", "resume", flags, f"two processes, killed after step {save + 2} "
              f"by --crash-at-step, resumed on two from the step-{save} DCP checkpoint",
              nproc=2, crash_at=save + 2),
        Stage("two to one", "reshard", flags, f"two processes killed after step {save + 2}, "
              f"resumed on one with 4 micro-batches of 8 (the same global batch of 32) from the "
              f"step-{save} checkpoint; the reference killed and resumed alike", nproc=2,
              crash_at=save + 2, resume_nproc=1, resume_flags=("--grad-accum-steps", "4"))]

