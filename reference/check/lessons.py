"""The lessons that `reference.check` names: the chapters and their titles, and for each lesson
its chapter, its title and the functions of tutorial/NN_*/train.py to look at and what they must
do. Purely descriptive: nothing here runs or compares anything."""
from typing import NamedTuple

CHAPTERS = {"01": "01_loop", "02": "02_amp", "03": "03_ddp", "04": "04_dpo", "05": "05_grpo",
            "06": "06_fsdp"}
TITLES = {"01": "the plain training loop", "02": "mixed precision, accumulation and clipping",
          "03": "DDP, checkpoints and exact resume", "04": "DPO against a frozen reference",
          "05": "GRPO: sampling, group advantages, clip and KL",
          "06": "FSDP2, sharded checkpoints and resuming on another world size"}
PARENTS = {"06": "03"}  # a branch (as in reference/chapters/flags.py): 06 is 03 + FSDP2
# lessons of a parent that a branch teaches anew under its own names: its table names those
RETAUGHT = {"06": ("resume_data", "resume_state")}  # -> fsdp_position, fsdp_checkpoint


def lineage(chapter):
    """The chapters whose lessons chapter `chapter` teaches too: every one up to it, or, for a
    branch, its parent's and its own (06: 01, 02, 03 and 06, not the DPO and GRPO of 04-05)."""
    if chapter in PARENTS:
        return lineage(PARENTS[chapter]) + (chapter,)
    return tuple(c for c in sorted(CHAPTERS) if c <= chapter and c not in PARENTS)


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
    "fsdp_shard": Lesson("06", "the FSDP2 sharding", "run(): init_device_mesh over "
                         "args.world_size; fully_shard(block) for every block, in order, then "
                         "fully_shard(model) (the root: embeddings, final norm, head); "
                         "register_fsdp_forward_method(model, \"generate\"); the optimizer made "
                         "after, on the sharded (DTensor) parameters; no DDP"),
    "fsdp_clip": Lesson("06", "the sharded clip's global norm", "clip_grad_norm_(): every rank "
                        "sums the squares of its own gradient shards (p.grad.to_local()), one "
                        "all_reduce adds up the ranks' sums, the norm is its square root (the "
                        "logged grad_norm), and every shard is scaled by clamp(max_norm / (norm + "
                        "1e-6), max=1), the same factor on every rank"),
    "fsdp_checkpoint": Lesson("06", "the sharded (DCP) checkpoint", "checkpoint_state(): "
                              "get_state_dict(model, optimizer), this rank's shards by name, and "
                              "every rank's RNG state; save_checkpoint(): dcp.save by every rank, "
                              "trainer.pt by rank 0; resume(): dcp.load into get_state_dict's "
                              "dicts, then set_state_dict(model, optimizer, ...), the scheduler, "
                              "the scaler, the progress and this rank's RNG"),
    "fsdp_position": Lesson("06", "the global sample position", "forever(): the position is "
                            "sample_in_epoch, the samples that all ranks together took (a batch "
                            "on every rank is world_size x batch_size of them), so a resume "
                            "with another world size or --batch-size skips exactly those; "
                            "resume(): the same global batch, new RNG streams (seed + 1000 x "
                            "step + rank) when the world size changed"),
}
