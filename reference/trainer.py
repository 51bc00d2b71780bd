"""Trainer: the loop every method shares.

It owns what chapters 01-03 teach: the optimizer step and schedule, evaluation and
metrics.jsonl (01); autocast, gradient accumulation with global token normalization and
clipping (02); DDP, checkpoints and exact resume (03); with parallelism="fsdp", FSDP2 and sharded
checkpoints instead (06, in fsdp.py). A method (SFT, DPO, GRPO) subclasses it and supplies only
`compute_loss` and `count` - its loss and what the loss is averaged over.
"""
import difflib
import math
import os
import time
import warnings
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint as ckpt
from . import fsdp, rundir
from .distributed import all_gather_object, all_reduce_sum, barrier, init_distributed
from .runtime import autocast_context, make_grad_scaler, resolve_amp_dtype, resolve_device
from .metrics import MetricsLog
from .validate import check_reliability_options, check_token_ids, is_inside, vocab_size_of


class Trainer:
    """Subclasses implement `count(batch)` and `compute_loss(model, batch)`.

    `compute_loss` returns `(loss_sum, metrics)`: the loss summed over the units `count` counts
    (target tokens for SFT, pairs for DPO), and a dict of `name: (sum, n)` metrics. The trainer
    divides by the count over every micro-batch and rank, so the step's loss is the same mean
    however the batch is split.

    parallelism: "ddp" (default) replicates the model on every rank that torchrun started;
    "fsdp" shards it (FSDP2) and checkpoints with DCP, also in one process (a 1-rank group of
    its own; reference.distributed.teardown() ends it). FSDP-only options: mixed_precision
    ("bf16" weights in forward and backward, in place of autocast) and activation_checkpointing
    (each block's activations recomputed in backward)."""

    def __init__(self, model, optimizer, train_loader, val_loader=None, device="auto",
                 max_epochs=1, max_steps=None, grad_accum_steps=1, use_amp=False, amp_dtype=None,
                 max_grad_norm=1.0, scheduler=None, eval_every=None, eval_fn=None, out_dir=None,
                 checkpoint_dir=None, save_every=None, keep_last=None, resume_from=None,
                 progress=True, stop_fn=None, step_callback=None, parallelism="ddp",
                 mixed_precision=None, activation_checkpointing=False):
        if grad_accum_steps is None or int(grad_accum_steps) < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0 (or None to turn clipping off), "
                             f"got {max_grad_norm}")
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1 (or None to never save), got {save_every}")
        if len(train_loader) == 0:
            raise ValueError("train_loader yields no batches: the dataset is empty, or smaller "
                             "than the batch size with drop_last=True")
        check_reliability_options(val_loader, out_dir, checkpoint_dir, save_every, keep_last,
                                  resume_from)
        fsdp.check_options(parallelism, mixed_precision, activation_checkpointing, use_amp,
                           amp_dtype)
        self.fsdp = parallelism == "fsdp"
        self.device = resolve_device(device)
        self.dist = (fsdp.init_process_group if self.fsdp else init_distributed)(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.grad_accum_steps = int(grad_accum_steps)
        if max_steps is None:
            if not max_epochs or max_epochs < 1:
                raise ValueError("max_epochs must be >= 1 when max_steps is not given; "
                                 "pass max_epochs=1 or set max_steps")
            max_steps = max_epochs * max(1, len(train_loader) // self.grad_accum_steps)
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.raw_model = model.to(self.device)
        self.vocab_size = vocab_size_of(self.raw_model)
        self.model = self.raw_model
        if self.fsdp:  # sharded in place: self.model is self.raw_model
            fsdp.shard(self.raw_model, optimizer, self.dist.world_size, mixed_precision,
                       activation_checkpointing)
        elif self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.raw_model, device_ids=ids)
        if self.dist.enabled:
            sampler = getattr(train_loader, "sampler", None)
            if not isinstance(sampler, torch.utils.data.DistributedSampler):
                warnings.warn(f"training under {parallelism.upper()}, but train_loader has no "
                              "DistributedSampler: every rank will see the same batches. Build "
                              "the loader with sampler=DistributedSampler(dataset)", stacklevel=2)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.amp_dtype = resolve_amp_dtype(self.device, use_amp, "off"  # auto: FSDP's bf16
                                           if mixed_precision == "bf16" else amp_dtype)
        self.scaler = make_grad_scaler(self.device, self.amp_dtype)
        self.max_grad_norm = max_grad_norm
        self.eval_every, self.eval_fn = eval_every, eval_fn
        self.out_dir = out_dir
        self.checkpoint_dir = checkpoint_dir or (
            os.path.join(out_dir, "checkpoints") if out_dir else None)
        self.save_every, self.keep_last, self.resume_from = save_every, keep_last, resume_from
        self.progress = progress
        # stop_fn(eval_record) -> True ends the run early, at that evaluation (saved as such);
        # step_callback(trainer) runs at the end of every step (the chapters' --crash-at-step)
        self.stop_fn, self.step_callback, self.stopped = stop_fn, step_callback, False
        self.step = self.epoch = self.batch_in_epoch = self.skipped_steps = 0
        self.skips_in_a_row = self.nonfinite_losses_in_a_row = 0  # the finiteness guard's counts
        self._pending_rng = None
        self._epoch_generator_state = None  # the shuffling generator's state when this epoch began
        self.history = []

    # --- what a method supplies -------------------------------------------------------------
    def count(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, batch):
        raise NotImplementedError

    def count_tokens(self, batch) -> torch.Tensor:
        """The tokens a batch trains, logged as `tokens`; by default what `count` counts."""
        return self.count(batch)

    # --- the loop -------------------------------------------------------------------------
    def train(self):
        """Train to max_steps; returns the records logged. The writing process (rank 0) holds
        the output folders for the whole run: one run per folder (see reference.rundir)."""
        folders = self.run_folders() if self.dist.is_main else []
        with rundir.locked(*folders):
            if self.dist.is_main:  # under the lock: no live run is writing them
                rundir.remove_stale_temporaries(self.out_dir, self.checkpoint_dir)
            return self.train_loop()

    def run_folders(self):
        """The folders this run writes: out_dir, and checkpoint_dir when it lies outside it."""
        folders = [self.out_dir] if self.out_dir else []
        inside = self.out_dir and is_inside(self.checkpoint_dir or self.out_dir, self.out_dir)
        if self.checkpoint_dir and not inside:
            folders.append(self.checkpoint_dir)
        return folders

    def train_loop(self):
        resumed = self.maybe_resume()
        if resumed is not None and (self.step >= self.max_steps or self.stopped):
            if self.dist.is_main:  # a finished run, resumed: its log and checkpoints stand as is
                print(f"the run is already finished: its checkpoint is at step {self.step} of "
                      f"max_steps={self.max_steps}{' (stopped early)' * self.stopped}; nothing "
                      "left to train")
            self.train_seconds = 0.0
            return self.history
        log = MetricsLog(self.out_dir, self.dist.is_main, truncate_after=resumed)
        batches = self.micro_batches()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train",
                   disable=None if (self.progress and self.dist.is_main) else True)
        start = time.perf_counter()
        try:
            while self.step < self.max_steps and not self.stopped:
                # FSDP: a rollout (GRPO) may run different numbers of forwards on each rank
                with fsdp.gathered(self.raw_model) if self.fsdp else nullcontext():
                    micro = self.step_batches(batches)
                record = self.training_step(micro)
                self.record(log, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                last = self.step == self.max_steps
                if self.eval_every and (self.step % self.eval_every == 0 or last):
                    eval_record = self.evaluate()
                    self.record(log, eval_record)
                    self.stopped = bool(self.stop_fn is not None and self.stop_fn(eval_record))
                if self.save_every and (self.step % self.save_every == 0 or last or self.stopped):
                    self.save_checkpoint()
                if self.step_callback is not None:
                    self.step_callback(self)
        finally:
            bar.close()
            log.close()
        self.train_seconds = time.perf_counter() - start
        return self.history

    def micro_batches(self):
        """Micro-batches in order, across epochs; resumes at `batch_in_epoch` of `epoch`."""
        while True:
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            generator = getattr(self.train_loader, "generator", None)
            if generator is not None:  # a shuffling loader: remember where this epoch's order began
                if self.batch_in_epoch == 0 or self._epoch_generator_state is None:
                    self._epoch_generator_state = generator.get_state()
                generator.set_state(self._epoch_generator_state)
            epoch_iter = iter(self.train_loader)
            if self._pending_rng is not None:
                # a DataLoader draws its worker seed from the global RNG when iteration starts;
                # the checkpoint's RNG states were taken after that draw, so restore them after it
                ckpt.set_rng_state(self._pending_rng)
                self._pending_rng = None
            for i, batch in enumerate(epoch_iter):
                if i < self.batch_in_epoch:
                    continue  # already trained on before the checkpoint we resumed from
                self.batch_in_epoch = i + 1
                yield self.to_device(batch)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def step_batches(self, batches):
        """The micro-batches of the next optimizer step. GRPO overrides this: it generates
        completions here, and reuses one generation for num_iterations steps."""
        return [next(batches) for _ in range(self.grad_accum_steps)]

    def to_device(self, batch):
        check_token_ids(batch, self.vocab_size)  # on the loader's CPU tensors: no device sync
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def training_step(self, micro):
        """One optimizer step over `grad_accum_steps` micro-batches."""
        # the step's [loss count, tokens], summed over ranks while the first forward runs
        counts = sum(torch.stack([torch.as_tensor(self.count(b)), torch.as_tensor(
            self.count_tokens(b))]).to(self.device, torch.float32) for b in micro)
        counting = all_reduce_sum(counts, async_op=True)
        loss_sum, sums = torch.zeros((), device=self.device), {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            # DDP all-reduces once, on the last micro-batch; FSDP reduce-scatters every one (an
            # unsharded gradient would otherwise be held on every rank in between)
            sync = nullcontext() if (last or not self.dist.enabled or self.fsdp) \
                else self.model.no_sync()
            with sync:
                with autocast_context(self.device, self.amp_dtype):
                    part, metrics = self.compute_loss(self.model, batch)
                if i == 0:  # the global counts are needed from the first backward on
                    if counting is not None:
                        counting.wait()
                    if counts[0].item() == 0:
                        raise ValueError(f"step {self.step + 1}: no target tokens in the batch "
                                         "(every label is -100?); check the collator's labels")
                    # DDP averages gradients over ranks: world_size / count undoes that mean
                    scale = self.dist.world_size / counts[0]
                self.scaler.scale(part * scale).backward()
            loss_sum += part.detach().float()
            for name, (s, n) in metrics.items():
                total = sums.setdefault(name, torch.zeros(2, device=self.device))
                total += torch.stack([
                    torch.as_tensor(s, dtype=torch.float32, device=self.device).detach(),
                    torch.as_tensor(n, dtype=torch.float32, device=self.device)])
        # everything logged, summed over ranks in one all-reduce while the gradients are clipped
        logged = torch.cat([loss_sum.reshape(1), *sums.values()])
        logging = all_reduce_sum(logged, async_op=True)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.fsdp:  # each rank holds a shard of every gradient: the norm is a global sum
            grad_norm = fsdp.clip_grad_norm_(params, self.max_grad_norm)
        elif self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if logging is not None:
            logging.wait()
        count, tokens = counts[0], counts[1]
        loss = logged[0] / count
        self.check_finite(loss, grad_norm)  # before the step: nothing non-finite is applied
        lr = self.optimizer.param_groups[0]["lr"]
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # inf/NaN gradients: the scaler skipped this step
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": int(tokens.item()), "loss_count": int(count.item())}
        if self.scaler.is_enabled():  # only fp16's GradScaler ever skips a step
            record["skipped_steps"] = self.skipped_steps
        for name, (s, n) in zip(sums, logged[1:].view(-1, 2).tolist()):
            record[name] = s / n if n else 0.0
        return record

    max_nonfinite_steps = 10  # fp16: this many skipped steps (or NaN losses) in a row end a run

    def check_finite(self, loss, grad_norm):
        """The finiteness guard, called before every optimizer step. In fp32 and bf16 a
        non-finite loss or gradient norm stops the run before the step is taken, so no
        checkpoint ever holds it. With fp16's GradScaler an inf/NaN gradient is routine (the
        scaler skips that step and lowers its scale); a run that never recovers is not."""
        loss_ok, grad_ok = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        step, fixes = self.step + 1, ("lower the learning rate (lr, --lr), turn on or tighten "
                                      "gradient clipping (max_grad_norm, --max-grad-norm), and "
                                      "check the data for bad values")
        if not self.scaler.is_enabled():
            if not loss_ok:
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: {fixes}. The step "
                                         "was not taken; the checkpoints on disk are finite")
            if not grad_ok:
                raise FloatingPointError(
                    f"gradient norm is {grad_norm.item()} at step {step} although the loss, "
                    f"{loss.item():.6g}, is finite: {fixes}. The step was not taken; the "
                    "checkpoints on disk are finite")
            return
        self.skips_in_a_row = 0 if grad_ok else self.skips_in_a_row + 1
        self.nonfinite_losses_in_a_row = 0 if loss_ok else self.nonfinite_losses_in_a_row + 1
        k = self.max_nonfinite_steps
        if self.skips_in_a_row >= k or self.nonfinite_losses_in_a_row >= k:
            what = ("had inf/NaN gradients, so the GradScaler skipped every one"
                    if self.skips_in_a_row >= k else "had a non-finite loss")
            raise FloatingPointError(
                f"the last {k} steps (to step {step}) all {what}, down to a loss scale of "
                f"{self.scaler.get_scale():g}: fp16 training is not recovering. To fix it, "
                f"{fixes}, or train in bf16 or fp32 (amp_dtype='bf16', or --amp bf16 or off)")

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over val_loader (every rank evaluates all of it), plus `eval_fn(model)`."""
        record = {"step": self.step, "split": "eval"}
        model = self.raw_model
        was_training = model.training
        model.eval()
        if self.val_loader is not None:
            loss_sum, count = 0.0, 0.0
            for batch in self.val_loader:
                batch = self.to_device(batch)
                with autocast_context(self.device, self.amp_dtype):
                    part, _ = self.compute_loss(model, batch)
                loss_sum, count = loss_sum + part.item(), count + self.count(batch).item()
            if count == 0:
                raise ValueError("the evaluation has nothing to average its loss over: val_loader "
                                 "gave no batches, or every label is -100 (no target tokens). "
                                 "Check the evaluation set, or pass val_loader=None")
            record["loss"] = loss_sum / count
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"eval loss is {record['loss']} at step {self.step}: the weights or the "
                    "evaluation data hold inf/NaN values. Lower the learning rate (lr, --lr), "
                    "turn on gradient clipping (max_grad_norm), and check the evaluation data")
        if self.eval_fn is not None:
            record.update(self.eval_fn(model))
        model.train(was_training)
        return record

    def record(self, log, record):
        self.history.append(record)
        log.write(record)

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "skipped_steps": self.skipped_steps,
                "epoch_generator_state": self._epoch_generator_state,
                "world_size": self.dist.world_size, "stopped": self.stopped,
                "nonfinite_in_a_row": [self.skips_in_a_row, self.nonfinite_losses_in_a_row]}

    # what a resume needs from a checkpoint: one that lacks any is passed over, with a warning
    checkpoint_keys = ("model", "optimizer", "scheduler", "scaler", "step", "epoch",
                       "batch_in_epoch", "skipped_steps", "epoch_generator_state", "world_size",
                       "rng")

    def save_checkpoint(self):
        """Rank 0 writes; every rank's RNG state goes in, so each rank resumes its own stream.
        FSDP: every rank writes its shards (fsdp.save_checkpoint)."""
        self.check_state_finite()  # on every rank: the weights are the same on each
        rngs = all_gather_object(ckpt.rng_state())
        if self.fsdp:
            state = {k: v for k, v in self.state_dict().items() if k not in fsdp.SHARDED}
            fsdp.save_checkpoint(self.checkpoint_dir, self.step, self.raw_model, self.optimizer,
                                 dict(state, rng=rngs), self.keep_last,
                                 getattr(self.train_loader, "batch_size", None),
                                 self.grad_accum_steps)
            return
        if self.dist.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            ckpt.save_checkpoint(self.checkpoint_dir, self.step, state, self.keep_last)
        barrier()

    def check_state_finite(self):
        """Nothing non-finite goes into a checkpoint: every resume from it would fail again."""
        tensors = [(f"model weight {name!r}", t) for name, t in self.raw_model.state_dict().items()]
        tensors += [("the optimizer state", t) for per_param in self.optimizer.state.values()
                    for t in per_param.values() if torch.is_tensor(t)]
        bad = fsdp.nonfinite(tensors) if self.fsdp else sorted(
            {what for what, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()})
        if bad:
            newest = (ckpt.list_checkpoints(self.checkpoint_dir) or ["none"])[-1]
            more = " and more" if len(bad) > 3 else ""
            raise FloatingPointError(
                f"after step {self.step}, {', '.join(bad[:3])}{more} hold inf/NaN values, so the "
                f"checkpoint was not written (the newest on disk, {newest}, is finite). Lower "
                "the learning rate (lr, --lr), turn on gradient clipping (max_grad_norm, "
                "--max-grad-norm), and check the data")

    def load_state_dict(self, state, source="checkpoint"):
        if self.fsdp:  # the shards, read in place; DCP reshards, so the world size may change
            state = fsdp.load_shards(self.raw_model, self.optimizer, state,
                                     self.dist.world_size, self.dist.rank,
                                     getattr(self.train_loader, "batch_size", None),
                                     self.grad_accum_steps, source)
        else:
            if state["world_size"] != self.dist.world_size:
                raise ValueError(
                    f"{source} was written by {state['world_size']} process(es) but this run has "
                    f"{self.dist.world_size}. Exact resume needs the same world size, because the "
                    "DistributedSampler shards and the per-rank RNG streams depend on it. Resume "
                    f"with --nproc_per_node={state['world_size']}, or start fresh without "
                    "--resume.")
            try:
                self.raw_model.load_state_dict(state["model"])
            except RuntimeError as err:
                raise ValueError(f"{source} does not fit this model (a different model size?): "
                                 f"{err}") from None
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.skipped_steps = state["batch_in_epoch"], state["skipped_steps"]
        if state["epoch_generator_state"] is not None:
            self._epoch_generator_state = state["epoch_generator_state"]
        self.stopped = state.get("stopped", False)
        in_a_row = state.get("nonfinite_in_a_row", (0, 0))  # absent from older checkpoints
        self.skips_in_a_row, self.nonfinite_losses_in_a_row = in_a_row
        self._pending_rng = state["rng"][self.dist.rank]  # applied when the data resumes

    def maybe_resume(self):
        """Load `resume_from` ("latest", a path, or None). Returns the step resumed at, or None."""
        if self.resume_from is None:
            if self.dist.is_main and self.save_every and ckpt.list_checkpoints(self.checkpoint_dir):
                raise ValueError(f"{self.checkpoint_dir} already holds checkpoints of an earlier "
                                 "run, which keep_last pruning and a later resume would mix with "
                                 "this one's; pass resume_from='latest' to continue that run, or "
                                 "use an empty checkpoint_dir")
            return None
        store = fsdp if self.fsdp else ckpt  # the same two functions, for DCP checkpoints
        if self.resume_from == "latest":
            path, state = store.load_latest(self.checkpoint_dir, required_keys=self.checkpoint_keys)
            if state is None:
                if self.dist.is_main:
                    print(f"no checkpoint in {self.checkpoint_dir}; starting fresh")
                return None
        else:
            path = self.resume_from
            if not os.path.exists(path):
                typo = difflib.get_close_matches(str(path), ["latest"], n=1, cutoff=0.6)
                hint = f" Did you mean resume_from={typo[0]!r}?" if typo else ""
                raise ValueError(
                    f"resume_from={path!r} is not a checkpoint: no such file or folder.{hint} "
                    f"Pass 'latest' for the newest usable checkpoint in {self.checkpoint_dir} "
                    "(--resume), or the path of a step_XXXXXX folder or its state.pt")
            state = store.load_state(path, required_keys=self.checkpoint_keys)
        self.load_state_dict(state, source=f"checkpoint {path}")
        rundir.fault_point("resume")  # crash tests: killed right after a resume starts
        barrier()  # every rank has read its checkpoint before rank 0 removes any
        if self.dist.is_main:
            for newer in ckpt.remove_checkpoints_after(self.checkpoint_dir, self.step):
                print(f"removed {newer}: it is newer than the step this run resumes from")
            print(f"resumed from {path} at step {self.step}")
        return self.step
