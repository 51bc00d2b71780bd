"""Does your trainer match the reference? Run it, run the reference, compare, name the lesson.

    python -m reference.check NN PATH [--steps K] [--work DIR] [--spawn]

PATH is a script that takes chapter NN's flags (tutorial/NN_*/train.py, an exercise.py, your
own). check runs it for a few short, fixed runs ("stages") that exercise every capability the
chapter adds, runs `python -m reference NN` with the same flags, and compares each pair of
metrics logs strictly (`reference.compare`, tolerance 0). Every run is fp32 on the CPU with one
thread (but for chapter 02's short fp16 stage: loss scaling is that chapter's lesson).

It prints "matches the reference bit for bit" and exits 0, or the first difference with a
diagnosis and exits 1: the diagnosis is the entry of the chapter's table (`--table`) that the
difference fits (which key differs first, at which step, in which stage, and how), and it names
the lesson that is probably wrong and the function of the chapter's file to look at. A crash, a
missing output file or a wrong schema exits 2 and says what is missing.

The runs are kept in --work (default runs/check_NN): DIR/yours/<stage>/ and
DIR/reference/<stage>/, so the comparison can be rerun by hand with the command it prints.
Each run is forked from one process that imported torch once (Linux), which makes a run take
a fraction of a second instead of seconds; --spawn starts every run as its own
`python PATH ...` (and `torchrun` for two processes) instead.

From Python: `check(chapter, path)` returns a `Result` (status 0, 1 or 2, the stage and
`reference.compare` Report of the first difference, its `Diagnosis`, the printed text);
`stages(chapter)` the runs; `diagnose(...)` the table lookup; `TABLES` the tables."""
import argparse
import atexit
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple

from .compare import REQUIRED, LogError, describe, diff_files, format_report, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = {"01": "01_loop", "02": "02_amp", "03": "03_ddp", "04": "04_dpo", "05": "05_grpo"}
TITLES = {"01": "the plain training loop", "02": "mixed precision, accumulation and clipping",
          "03": "DDP, checkpoints and exact resume", "04": "DPO against a frozen reference",
          "05": "GRPO: sampling, group advantages, clip and KL"}
SUMMARY_KEYS = ("eval_accuracy", "final_loss", "steps", "train_seconds")
DEFAULT_STEPS = 8


# --- The lessons: what a diagnosis names ----------------------------------------------------

class Lesson(NamedTuple):
    chapter: str
    title: str
    where: str  # the functions of tutorial/NN_*/train.py to look at, and what they must do


LESSONS = {
    "flags": Lesson("01", "the command-line flags", "get_args(): every flag of the chapter, with "
                    "the names and types of `python -m reference NN --help`"),
    "schema": Lesson("01", "the metrics schema", "train(): every train record has step, loss, "
                     "lr, grad_norm, tokens, loss_count and the method's metrics; eval records "
                     "have \"split\": \"eval\"; summary.json has eval_accuracy, final_loss, steps "
                     "and train_seconds"),
    "loop": Lesson("01", "the loop's steps and records", "train(): one train record per "
                   "optimizer step, numbered 1 to --max-steps, and an eval record every "
                   "--eval-every steps and at the last step"),
    "data": Lesson("01", "the data each step sees", "main(): make_addition_splits(digits, "
                   "eval_size, seed=seed), then a DataLoader with shuffle=True, drop_last=True "
                   "and its own torch.Generator().manual_seed(seed) (from chapter 03: "
                   "sharded_loader())"),
    "init": Lesson("01", "the initial weights", "main(): torch.manual_seed(seed) first, and no "
                   "other random draw before TinyGPT(cfg)"),
    "targets": Lesson("01", "which tokens are counted", "count_targets(): the target tokens "
                      "after the shift, (labels[:, 1:] != -100).sum(), are both the loss's "
                      "divisor (loss_count) and `tokens`"),
    "loss": Lesson("01", "the label shift or the masking", "sft_loss_sum(): logits[:, :-1] "
                   "predict labels[:, 1:], -100 is ignored, the cross-entropy is summed in "
                   "float32 and divided once by the step's count"),
    "schedule": Lesson("01", "the learning-rate schedule's step offset", "lr_multiplier(): "
                       "(step + 1) / warmup_steps during warmup, then cosine decay to 10%; "
                       "train() logs the lr the step used (get_last_lr() before "
                       "scheduler.step())"),
    "optimizer": Lesson("01", "the optimizer step or zero_grad", "configure_optimizer(): "
                        "AdamW(betas=(0.9, 0.95)) with weight decay on the weight matrices only "
                        "(not biases, LayerNorm gains, embeddings); train(): zero_grad once per "
                        "step, backward, optimizer.step(), scheduler.step()"),
    "grad_norm": Lesson("01", "the logged gradient norm", "train(): the total 2-norm of all the "
                        "parameters' gradients after backward, before the optimizer step"),
    "metrics": Lesson("01", "a method metric", "sft_loss(): mean_token_accuracy is the target "
                      "tokens predicted right over the step's target tokens (sums, divided once)"),
    "eval": Lesson("01", "the evaluation", "evaluate(): model.eval() and no_grad, one sum of the "
                   "held-out losses divided by their count, model.train() after; exact_match() "
                   "for the accuracy"),
    "accumulation": Lesson("02", "the normalization over micro-batches", "train(): every "
                           "micro-batch's summed loss is divided by the whole step's count "
                           "(summed over the micro-batches before the first forward), not a "
                           "mean of per-micro-batch means; zero_grad once per step"),
    "clipping": Lesson("02", "gradient clipping and unscaling", "train(): scaler.unscale_("
                       "optimizer) first, then clip_grad_norm_(parameters, --max-grad-norm), "
                       "whose return value (the norm before clipping) is the logged grad_norm"),
    "amp": Lesson("02", "mixed precision", "autocast(): the forward under torch.autocast; a "
                  "GradScaler only for fp16; the loss and log-softmax in float32"),
    "ddp_sampler": Lesson("03", "the DistributedSampler or set_epoch", "sharded_loader(): "
                          "DistributedSampler(num_replicas=world_size, rank=rank, shuffle=True, "
                          "seed=seed, drop_last=True); forever(): sampler.set_epoch(epoch) before "
                          "every pass over the data"),
    "ddp_sum": Lesson("03", "the world-size factor or the global counts", "train(): the step's "
                      "counts all-reduced over the ranks; each rank's loss times world_size / "
                      "the global count (DDP averages gradients over ranks); the logged loss and "
                      "metrics summed over the ranks"),
    "resume_data": Lesson("03", "the data position on resume", "checkpoint_state(), resume(), "
                          "forever(): the epoch and the batches taken in it are saved and "
                          "restored, and the resumed pass skips exactly those"),
    "resume_state": Lesson("03", "the state restored on resume", "resume(): the model, the "
                           "optimizer (AdamW's moments), the scheduler, the GradScaler and every "
                           "RNG state are loaded from the checkpoint"),
    "resume_log": Lesson("03", "the log after a resume", "train(): a resumed run keeps the "
                         "records up to its checkpoint and goes on from the next step; steps "
                         "keep their numbers"),
    "crash": Lesson("03", "the checkpoints or --crash-at-step", "train(): a checkpoint every "
                    "--save-every steps and at the last; after step --crash-at-step (and its "
                    "checkpoint) the last rank SIGKILLs itself, on the first attempt only"),
    "two_phase": Lesson("04", "the two phases", "main(): SFT in DIR/sft stops at the first "
                        "evaluation reaching --sft-target (at most --sft-steps); phase 2 gets a "
                        "fresh AdamW (--dpo-lr, --grpo-lr) and its own warmup (--dpo-warmup-"
                        "steps, --grpo-warmup-steps) and cosine over --max-steps"),
    "dpo_logps": Lesson("04", "the sequence log-probs", "sequence_logps(): the log-probs of the "
                        "completion's target tokens (shifted, -100 masked, float32), summed per "
                        "row, not averaged; concatenated_logps(): chosen rows, then rejected"),
    "dpo_reference": Lesson("04", "the reference model", "dpo_phase(): the reference is a frozen "
                            "copy of the model at the start of DPO (deepcopy, eval(), no grad), "
                            "so the first loss is ln 2 and the first rewards are 0"),
    "dpo_loss": Lesson("04", "the DPO loss", "dpo_loss(): -logsigmoid(beta * ((chosen - "
                       "rejected) - (ref_chosen - ref_rejected))), plus --rpo-alpha times the "
                       "chosen answer's NLL per target token"),
    "dpo_count": Lesson("04", "what DPO counts", "count_pairs(): the loss is averaged over "
                        "pairs (loss_count); tokens are both completions' target tokens"),
    "dpo_eval": Lesson("04", "the preference evaluation", "preference_accuracy(): the share of "
                       "held-out pairs whose chosen log-prob beats the rejected one; the eval "
                       "loss is the DPO loss over pairs"),
    "grpo_sampling": Lesson("05", "the sampling", "sample_and_score(): each prompt repeated G "
                            "times as one contiguous group (repeat_interleave), sampled with "
                            "args.generator at --temperature, the first end token kept and "
                            "everything after it masked"),
    "grpo_reward": Lesson("05", "the reward", "correctness_reward(): 1.0 where the completion's "
                          "text is exactly the sum, else 0.0"),
    "grpo_advantages": Lesson("05", "the group advantages", "group_advantages(): rewards.view(-1, "
                              "G), (r - group mean) / (group std + 1e-4), the unbiased std, 0 for "
                              "a group of equal rewards, and the sign: better than the group is "
                              "positive"),
    "grpo_loss": Lesson("05", "the GRPO objective", "grpo_loss(): per token -min(ratio * A, "
                        "clip(ratio) * A) (+ beta * KL), averaged over each completion's own "
                        "tokens, summed over completions; completion_logps(): logits / "
                        "temperature, float32"),
    "grpo_kl": Lesson("05", "the KL term", "grpo_loss(): k3 = exp(d) - d - 1 with d = ref_logps "
                      "- logps, the policy's log-probs with their gradient; roll_out(): "
                      "ref_logps from the frozen copy of the SFT model"),
    "grpo_clip": Lesson("05", "the clip and pi_old", "train() and roll_out(): each batch of "
                        "completions is trained on for --num-iterations steps, with old_logps "
                        "from the policy that sampled it; grpo_loss(): the ratio pi / pi_old "
                        "clamped to 1 +- --clip-eps inside the min"),
    "grpo_rng": Lesson("05", "the sampling stream", "grpo_phase(): a torch.Generator seeded with "
                       "--seed + rank, so ranks draw differently; checkpoint_state() and "
                       "resume(): its state saved and restored with the checkpoint"),
    "grpo_count": Lesson("05", "what GRPO counts", "count_completions(): the loss is averaged "
                         "over completions (loss_count); tokens are the completions' trained "
                         "tokens"),
}


# --- The runs: short, fixed, and each one exercising a chapter's capability ------------------

@dataclass
class Stage:
    """One comparison: your script and the reference, run with the same flags.

    kind: "one" (one process), "accum" (accumulation and clipping on top of a matching "one"),
    "fp16" (loss scaling), "ddp" (two processes), "resume" (your run killed by --crash-at-step
    and resumed with --resume, compared with the reference's uninterrupted run)."""
    name: str
    kind: str
    flags: list
    what: str
    nproc: int = 1
    crash_at: int = None
    phases: tuple = ("",)  # "" is DIR/metrics.jsonl, "sft" DIR/sft/metrics.jsonl (04, 05)

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
    if chapter == "03":
        save = max(1, steps // 2 - 1)
        flags = loop + ["--lr", "5e-3", "--max-steps", k, "--eval-every", half,
                        "--save-every", str(save)]
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


# --- Running a script: forked from a warm process, or spawned -------------------------------

def run_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as --device cpu says; no CUDA init either
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(job, env):
    """In a forked child: become `python SCRIPT ARGS` (or `python -m MODULE ARGS`) and exit."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = list(job["argv"])
        import runpy
        if job.get("script"):
            sys.path[0] = os.path.dirname(os.path.abspath(job["script"]))
            runpy.run_path(job["script"], run_name="__main__")
        else:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the learner's script may raise anything
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve():
    """The warm process: import torch and the bench once, then fork one child per run.

    Reads one JSON request a line ({"jobs": [...], "env": {...}, "timeout": s}), forks every
    job, waits (a rank that fails leaves the others 3 seconds, as torchrun would not wait
    forever either) and answers {"codes": [...], "timed_out": bool}. Nothing here runs a torch
    op, so the children start with no thread pool to inherit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the runs; the parent stops us
    import torch
    import torch._dynamo  # noqa: F401 - torch.optim imports it on first use: seconds, per run
    import torch.distributed  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    import tqdm  # noqa: F401
    import reference.chapters  # noqa: F401
    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pids = []
        for job in request["jobs"]:
            pid = os.fork()
            if pid == 0:
                _child(job, {**request["env"], **job.get("env", {})})
            pids.append(pid)
        codes, deadline, grace, timed_out = {}, time.time() + request["timeout"], None, False
        while len(codes) < len(pids):
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                        if codes[pid] != 0 and grace is None:
                            grace = time.time() + 3
            now = time.time()
            if now > deadline or (grace is not None and now > grace):
                timed_out = timed_out or now > deadline
                for pid in pids:
                    if pid not in codes:
                        os.kill(pid, signal.SIGKILL)
                        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            time.sleep(0.005)
        print(json.dumps({"codes": [codes[p] for p in pids], "timed_out": timed_out}),
              flush=True)


class ForkServer:
    """One warm `serve()` process, started on first use and stopped by `close()`."""

    def __init__(self):
        self.proc = None
        self.log = None

    def start(self):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="check_server_", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from reference.check import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=ROOT, env=run_env())
        if not self.proc.stdout.readline():
            self.log.seek(0)
            raise RuntimeError(f"the check's runner process failed to start:\n{self.log.read()}")

    def run(self, jobs, env, timeout):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"jobs": jobs, "env": env, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            self.log.seek(0)
            raise RuntimeError(f"the check's runner process died:\n{self.log.read()[-3000:]}")
        answer = json.loads(answer)
        return answer["codes"], answer["timed_out"]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


_SERVER = ForkServer()
atexit.register(_SERVER.close)


def close():
    """Stop the warm runner process (it starts again on the next check)."""
    _SERVER.close()


class Launch(NamedTuple):
    """What one attempt ran: the command a person would type, its exit codes and its logs."""
    command: str
    codes: list
    timed_out: bool
    logs: list  # [(stdout path, stderr path)] per rank


def can_fork():
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def launch(target, argv, out_dir, nproc, timeout, spawn, tag):
    """Run `target` (a script path, or "reference NN") with argv on nproc processes; the logs
    go next to out_dir as <out_dir>.<tag>.rank<r>.{out,err}."""
    is_ref = target.startswith("reference ")
    chapter = target.split()[1] if is_ref else None
    logs = [(f"{out_dir}.{tag}.rank{r}.out", f"{out_dir}.{tag}.rank{r}.err") for r in range(nproc)]
    head = ["-m", "reference", chapter] if is_ref else [target]
    shown = " ".join(([f"torchrun --standalone --nproc_per_node={nproc}"] if nproc > 1
                      else ["python"]) + head + [quote(a) for a in argv])
    env = run_env()
    if spawn or not can_fork():
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={nproc}"] if nproc > 1 else []) + head + argv
        with open(logs[0][0], "w") as out, open(logs[0][1], "w") as err:
            # its own session: a timeout kills torchrun's workers too, not only torchrun
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                code, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code, timed_out = -signal.SIGKILL, True
        for out, err in logs[1:]:
            open(out, "w").close()
            open(err, "w").close()
        return Launch(shown, [code], timed_out, logs[:1])
    jobs = []
    for rank in range(nproc):
        job = {"argv": (["-m reference"] + head[2:] if is_ref else [target]) + argv,
               "stdout": logs[rank][0], "stderr": logs[rank][1],
               "env": {"RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else {}}
        job["module" if is_ref else "script"] = "reference" if is_ref else target
        jobs.append(job)
    if nproc > 1:
        env.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), GROUP_RANK="0", TORCHELASTIC_RESTART_COUNT="0")
    codes, timed_out = _SERVER.run(jobs, env, timeout)
    return Launch(shown, codes, timed_out, logs)


def quote(arg):
    return arg if arg and all(c.isalnum() or c in "-_./=+:," for c in arg) else repr(arg)


# --- Checking a run's output -----------------------------------------------------------------

class Problem(Exception):
    """Your run cannot be compared: it crashed, or wrote no or wrong output (exit status 2)."""

    def __init__(self, message, lesson=None, stderr=""):
        super().__init__(message)
        self.lesson = lesson
        self.stderr = stderr


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def crash_message(launch, what, chapter):
    """A Problem that says how `launch` failed, with the end of its stderr."""
    errs = [(r, tail(err)) for r, (_, err) in enumerate(launch.logs)]
    stderr = "\n".join(f"--- rank {r} stderr (last lines) ---\n{t}" if len(errs) > 1 else t
                       for r, t in errs if t)
    if launch.timed_out:
        return Problem(f"{what} did not finish in time (a hang? with two processes, a collective "
                       "that one rank never reaches)", stderr=stderr)
    bad = [c for c in launch.codes if c != 0]
    code = bad[0] if bad else launch.codes[0]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    if "unrecognized arguments" in stderr or "invalid choice" in stderr or \
            "expected one argument" in stderr:
        return Problem(f"{what} {how}: it does not take chapter {chapter}'s flags (see "
                       f"`python -m reference {chapter} --help` for the list)", "flags", stderr)
    return Problem(f"{what} {how}", None, stderr)


def check_outputs(out, stage, ref_out):
    """Problems of a finished run's folder: missing files, an unreadable log, keys that the
    reference logs and yours does not. Returns the keys yours logs and the reference does not
    (not compared)."""
    extra = set()
    for phase in stage.phases:
        path = os.path.join(out, phase, "metrics.jsonl")
        if not os.path.exists(path):
            raise Problem(f"your run wrote no {os.path.relpath(path, out)} in {out}: every run "
                          "writes DIR/metrics.jsonl" + (" and DIR/sft/metrics.jsonl for the SFT "
                                                        "phase" if "sft" in stage.phases else ""),
                          "schema")
        try:
            mine = load(path)
        except LogError as e:
            raise Problem(f"your metrics log cannot be read: {e}", "schema") from None
        ref = load(os.path.join(ref_out, phase, "metrics.jsonl"))
        for split in ("train", "eval"):
            have = set().union(*[r for r in mine if r.get("split", "train") == split] or [set()])
            want = set().union(*[r for r in ref if r.get("split", "train") == split] or [set()])
            missing = sorted(want - have - {"split"})
            if split == "train":
                missing = sorted(set(missing) | {k for k in REQUIRED if k not in have})
            if missing and (have or split == "train"):
                where = f"{phase}/metrics.jsonl" if phase else "metrics.jsonl"
                raise Problem(f"wrong schema: the {split} records of your {where} lack "
                              f"{', '.join(repr(k) for k in missing)} (the reference logs them)",
                              "schema")
            extra |= have - want - {"step", "split"}
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        raise Problem(f"your run wrote no summary.json in {out}: a run ends by writing "
                      f"DIR/summary.json with at least {', '.join(SUMMARY_KEYS)}", "schema")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise Problem(f"your summary.json cannot be read: {e}", "schema") from None
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise Problem(f"wrong schema: your summary.json lacks {', '.join(missing)}", "schema")
    return extra


# --- The diagnosis tables ---------------------------------------------------------------------

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
        self.method = "sft" if phase == "sft" or chapter < "04" else (
            "dpo" if chapter == "04" else "grpo")
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
        resumed = stage.kind == "resume" and phase == ""
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
         lambda f: f.kind != "value" and f.checkpoint is not None, kinds=("resume",)),
    Rule("any", "the SFT phase of a two-phase chapter has other steps", "two_phase",
         lambda f: f.kind != "value" and f.phase == "sft"),
    Rule("any", "train steps or eval records missing or extra", "loop",
         lambda f: f.kind != "value"),
    # a resumed run (the uninterrupted one matched)
    Rule("any", "resume: a step before the checkpoint differs", "resume_log",
         lambda f: f.checkpoint is not None and f.step <= f.checkpoint, kinds=("resume",)),
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
    Rule("any", "loss equal at step 1 but not at a later step", "optimizer",
         lambda f: f.split == "train"),
    Rule("any", "an eval record (the train records up to it matched)", "eval",
         lambda f: f.split == "eval"),
]


class Diagnosis(NamedTuple):
    lesson: str  # a key of LESSONS, or "" when no entry fits
    title: str
    chapter: str
    where: str
    when: str  # the table entry that matched
    also: tuple  # other lessons that fit the same evidence


def scopes(chapter):
    return ("any", "sft") + (("dpo",) if chapter == "04" else ()) + \
        (("grpo",) if chapter == "05" else ())


def table(chapter):
    """Chapter `chapter`'s diagnosis table: the rules that can name one of its lessons in one
    of its stages, in the order they are tried."""
    kinds = {s.kind for s in stages(chapter)}
    return [r for r in RULES if r.scope in scopes(chapter)
            and LESSONS[r.lesson].chapter <= chapter
            and all(LESSONS[x].chapter <= chapter for x in r.also)
            and (not r.kinds or kinds & set(r.kinds))]


TABLES = {nn: table(nn) for nn in CHAPTERS}


def diagnose(chapter, stage, phase, report, mine, ref):
    """The Diagnosis of `report`'s first difference: the first entry of chapter `chapter`'s
    table that fits. mine and ref are {(split, step): record} of the two logs."""
    f = Facts(chapter, stage, phase, report, mine, ref)
    for rule in TABLES[chapter]:
        if rule.scope not in ("any", f.method) or (rule.kinds and stage.kind not in rule.kinds):
            continue
        try:
            fits = rule.test(f)
        except (KeyError, TypeError, ZeroDivisionError):
            fits = False
        if fits:
            lesson = LESSONS[rule.lesson]
            return Diagnosis(rule.lesson, lesson.title, lesson.chapter, lesson.where, rule.when,
                             rule.also)
    return Diagnosis("", "no entry of the table fits", chapter, "", "", ())


def by_step(records):
    return {(r.get("split", "train"), r["step"]): r for r in records}


# --- check -----------------------------------------------------------------------------------

@dataclass
class Result:
    """status 0: matches bit for bit; 1: a difference (stage, phase, report, diagnosis); 2: the
    run could not be compared (problem, and maybe a diagnosis)."""
    chapter: str
    path: str
    status: int
    verdict: str
    stage: object = None
    phase: str = ""
    report: object = None
    diagnosis: object = None
    problem: str = ""
    text: str = ""
    passed: list = field(default_factory=list)  # the stages that matched


_REFERENCE_RUNS = {}  # (chapter, nproc, flags, spawn) -> the folder of a finished reference run


def reference_run(chapter, stage, work, timeout, spawn, say):
    """The reference's uninterrupted run of `stage`'s flags, run once per process."""
    key = (chapter, stage.nproc, tuple(stage.flags), spawn)
    done = _REFERENCE_RUNS.get(key)
    if done and all(os.path.exists(os.path.join(done, p, "metrics.jsonl")) for p in stage.phases):
        return done
    out = os.path.join(work, "reference", "two_processes" if stage.nproc > 1 else stage.slug)
    remove(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    say(f"  the reference: python -m reference {chapter} ... ({stage.nproc} process"
        f"{'es' if stage.nproc > 1 else ''})")
    run = launch(f"reference {chapter}", stage.flags + ["--out", out], out, stage.nproc, timeout,
                 spawn, "run")
    if any(run.codes) or run.timed_out:
        p = crash_message(run, f"the reference run ({run.command})", chapter)
        raise RuntimeError(f"{p} - a bug in `reference`, not in your script\n{p.stderr}")
    _REFERENCE_RUNS[key] = out
    return out


def remove(path):
    shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(os.path.dirname(path)) if os.path.isdir(os.path.dirname(path)) else []:
        if name.startswith(os.path.basename(path) + "."):
            os.remove(os.path.join(os.path.dirname(path), name))


def your_run(path, chapter, stage, work, timeout, spawn, say):
    """Your script's run(s) of `stage`: one attempt, or a killed one and a resumed one."""
    out = os.path.join(work, "yours", stage.slug)
    remove(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    argv = stage.flags + ["--out", out]
    commands = []
    if stage.crash_at is not None:
        first = launch(path, argv + ["--crash-at-step", str(stage.crash_at)], out, stage.nproc,
                       timeout, spawn, "crash")
        commands.append(first.command)
        if first.codes[-1] != -signal.SIGKILL:
            if first.codes[-1] == 0 and not first.timed_out:
                raise Problem(f"your run with --crash-at-step {stage.crash_at} finished instead "
                              f"of killing itself after step {stage.crash_at} "
                              f"({first.command})", "crash")
            raise crash_message(first, f"your run with --crash-at-step {stage.crash_at} "
                                f"({first.command})", chapter)
        if not os.path.isdir(os.path.join(out, "checkpoints")):
            raise Problem(f"your killed run left no {out}/checkpoints/ to resume from (with "
                          f"--save-every {stage.options['save_every']} it saves at step "
                          f"{stage.checkpoint})", "crash")
        argv = argv + ["--resume"]
    run = launch(path, argv, out, stage.nproc, timeout, spawn, "run")
    commands.append(run.command)
    if any(run.codes) or run.timed_out:
        raise crash_message(run, f"your script ({run.command})", chapter)
    return out, commands


def check(chapter, path, steps=DEFAULT_STEPS, work=None, spawn=False, timeout=300, echo=None,
          only=None):
    """Run `path` and the reference through chapter `chapter`'s stages and compare them.
    Returns a Result; echo (e.g. print) receives the report line by line as it is made.
    only: names of the stages to run (default all), e.g. ["two processes"]."""
    lines = []

    def say(line=""):
        lines.append(line)
        if echo is not None:
            echo(line)

    chapter = f"{int(chapter):02d}" if str(chapter).isdigit() else str(chapter)
    plan = stages(chapter, steps)
    if only:
        unknown = sorted(set(only) - {s.name for s in plan})
        if unknown:
            raise ValueError(f"chapter {chapter} has no stage {unknown}; its stages: "
                             f"{', '.join(repr(s.name) for s in plan)}")
        plan = [s for s in plan if s.name in only]
    shown_path = os.path.relpath(os.path.abspath(path), ROOT) if \
        os.path.abspath(path).startswith(ROOT + os.sep) else os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no script at {path}")
    path = os.path.abspath(path)
    work = os.path.abspath(work or os.path.join(ROOT, "runs", f"check_{chapter}"))
    os.makedirs(work, exist_ok=True)
    say(f"check: {shown_path} against chapter {chapter} ({TITLES[chapter]})")
    say(f"runs in {work}: fp32, 1 thread, the CPU; "
        + ("each run its own process" if spawn or not can_fork()
           else "each run forked from one process that imported torch once"))
    result = Result(chapter, shown_path, 0, "")

    def finish(status, verdict):
        result.status, result.verdict = status, verdict
        say(f"verdict: {verdict}")
        result.text = "\n".join(lines)
        return result

    for n, stage in enumerate(plan, 1):
        say(f"stage {n}/{len(plan)}, {stage.name}: {stage.what}")
        start = time.perf_counter()
        try:
            ref_out = reference_run(chapter, stage, work, timeout, spawn, say)
            say(f"  yours: {stage.name}")
            out, commands = your_run(path, chapter, stage, work, timeout, spawn, say)
            extra = check_outputs(out, stage, ref_out)
        except Problem as p:
            result.stage, result.problem = stage, str(p)
            say(f"  PROBLEM: {p}")
            if p.stderr:
                say(p.stderr)
            if p.lesson:
                lesson = LESSONS[p.lesson]
                result.diagnosis = Diagnosis(p.lesson, lesson.title, lesson.chapter,
                                             lesson.where, "the run's output", ())
                say(f"  look at (chapter {lesson.chapter}, {lesson.title}): {lesson.where}")
            return finish(2, f"{shown_path} could not be compared with the reference (stage "
                             f"{stage.name!r}): {p}")
        if extra:
            say(f"  not compared (the reference does not log them): {sorted(extra)}")
        for phase in stage.phases:
            a = os.path.join(out, phase, "metrics.jsonl")
            b = os.path.join(ref_out, phase, "metrics.jsonl")
            report = diff_files(a, b, ignore=sorted(extra))
            name = {"sft": "the SFT phase", "": "the second phase" if len(stage.phases) > 1
                    else "the run"}[phase]
            if report.identical:
                c = report.counts["A"]
                say(f"  {name}: {c.get('train', 0)} train steps and {c.get('eval', 0)} eval "
                    f"records match bit for bit ({time.perf_counter() - start:.1f} s)")
                continue
            mine, ref = by_step(load(a)), by_step(load(b))
            d = diagnose(chapter, stage, phase, report, mine, ref)
            result.stage, result.phase, result.report, result.diagnosis = stage, phase, report, d
            say(f"  {name}: DIFFERS")
            say("")
            say(format_report(report).replace(a, "yours").replace(b, "reference"))
            say("")
            how = compared(report.first)
            if d.lesson:
                say(f"diagnosis: {d.title} (chapter {d.chapter}), probably")
                say(f"  the table's entry: {d.when} (stage {stage.name!r}"
                    + (f", {name}" if len(stage.phases) > 1 else "") + ")")
                if how:
                    say(f"  how: {how}")
                others = sorted({x.key for x in report.differences if x.key not in (
                    None, report.first.key) and (x.split, x.step) == (report.first.split,
                                                                       report.first.step)})
                if others:
                    say(f"  also differing in that record: {', '.join(others)}")
                say(f"  look at: {d.where}")
                if d.also:
                    say("  less likely: " + "; ".join(LESSONS[x].title for x in d.also))
            else:
                say("diagnosis: no entry of the table fits; compare the first records by hand")
            say("rerun the comparison:")
            say(f"  python -m reference.compare {a} {b} --max-step {report.first.step}")
            say("rerun your run" + (" (killed, then resumed):" if len(commands) > 1 else ":"))
            for command in commands:
                say(f"  {command}")
            return finish(1, f"{shown_path} differs from the reference: {d.title or 'see above'}"
                             f" (stage {stage.name!r}, {describe(report.first, ('yours', 'ref'))})")
        result.passed.append(stage)
    return finish(0, f"{shown_path} matches the reference bit for bit ({len(plan)} stage"
                     f"{'s' if len(plan) > 1 else ''})")


def compared(d):
    """How a value differs, in numbers: the ratio of yours to the reference's."""
    if d.kind != "value" or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in (d.a, d.b)):
        return ""
    if d.b == 0:
        return f"yours is {d.a!r} where the reference's is 0"
    return (f"yours / the reference's = {d.a / d.b:.6g} (yours - the reference's = "
            f"{d.a - d.b:.3g})")


def format_table(chapter):
    """Chapter `chapter`'s diagnosis table in words."""
    out = [f"Chapter {chapter} ({TITLES[chapter]}): the first entry that fits the first "
           "difference names the lesson."]
    for rule in TABLES[chapter]:
        lesson = LESSONS[rule.lesson]
        scope = {"any": "", "sft": "[SFT] ", "dpo": "[DPO] ", "grpo": "[GRPO] "}[rule.scope]
        also = f" (or: {'; '.join(LESSONS[x].title for x in rule.also)})" if rule.also else ""
        out.append(f"- {scope}{rule.when} -> {lesson.title} ({lesson.chapter}){also}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("chapter", choices=list(CHAPTERS), help="the chapter whose flags PATH takes")
    p.add_argument("path", nargs="?", help="your script, e.g. tutorial/03_ddp/exercise.py")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps of each run (of phase 2 in 04/05), default "
                        f"{DEFAULT_STEPS}, at least 4")
    p.add_argument("--work", default=None, help="folder for the runs (default runs/check_NN)")
    p.add_argument("--spawn", action="store_true",
                   help="start every run as its own process (python PATH, torchrun) instead of "
                        "forking it from a warm one")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run (default 300)")
    p.add_argument("--stage", action="append", default=None, metavar="NAME",
                   help="run only this stage (repeatable), e.g. --stage 'two processes'")
    p.add_argument("--table", action="store_true", help="print the chapter's diagnosis table")
    args = p.parse_args(argv)
    if args.table:
        print(format_table(args.chapter))
        return 0
    if args.path is None:
        p.error("PATH is required (your script), e.g. tutorial/01_loop/train.py")
    if args.steps < 4:
        p.error("--steps must be >= 4")
    try:
        result = check(args.chapter, args.path, args.steps, args.work, args.spawn, args.timeout,
                       echo=print, only=args.stage)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close()
    return result.status


if __name__ == "__main__":
    sys.exit(main())
