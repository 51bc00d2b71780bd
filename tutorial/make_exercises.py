"""Write each chapter's exercise.py: its train.py with the chapter's lesson taken out as TODOs.

    python tutorial/make_exercises.py           # (re)write every tutorial/NN_*/exercise.py
    python tutorial/make_exercises.py --check   # exit 1 if a committed exercise is out of date

The lesson's places are marked in train.py by comments, so train.py runs as it is. NN is the
chapter whose exercise the marker belongs to; a later chapter keeps an earlier chapter's marker
where it keeps the line (its diff stays the lesson), and its own exercise ignores it:

    def f(...):  # exercise NN            the body of f below its docstring is the TODO NN.f
    statement  # exercise NN: NAME        that statement, all its lines, is the TODO NN.NAME
    # exercise NN: NAME                   the lines between the two marker lines are the TODO
    ...                                   NN.NAME
    # end exercise

Each TODO becomes `raise NotImplementedError("TODO NN.NAME: <what to write>")` at the block's
indentation; the signature, the docstring and the comments around it stay, and so do the flags,
the data and the logging. What to write is HINTS[NN.NAME]; for a block inside a function, the
names it must set for the code after it are added. fill(exercise, solution, NN) puts the solution's
blocks back: fill(make_exercise(train.py), train.py) == train.py, which the tests check.
"""
import argparse
import ast
import glob
import io
import os
import re
import sys
import textwrap
import tokenize
from typing import NamedTuple

TUTORIAL = os.path.dirname(os.path.abspath(__file__))
START = re.compile(r"#\s*exercise\s+(\d\d)(?::\s*([A-Za-z_]\w*))?\s*$")
END = re.compile(r"#\s*end exercise\s*$")
WIDTH = 100

HINTS = {
    # 01: the plain loop
    "01.configure_optimizer": "AdamW(betas=(0.9, 0.95)) over two groups, in this order: "
    "weight_decay on the parameters of 2 or more dimensions that are not embeddings, 0.0 on the "
    "rest",
    "01.lr_multiplier": "(step + 1) / warmup_steps while step < warmup_steps, then a cosine from "
    "1 down to min_ratio at max_steps",
    "01.sft_loss_sum": "logits[:, :-1] predict labels[:, 1:]: the cross-entropy in float32, "
    "summed over the targets that are not -100, and how many there are",
    "01.count_targets": "the target tokens after the shift, (labels[:, 1:] != -100).sum(), are "
    "both the loss's count and the tokens",
    # 02: mixed precision, accumulation, clipping
    "02.autocast": "torch.autocast(device.type, dtype=dtype) when dtype is not None, else a "
    "context that does nothing (nullcontext())",
    "02.counts": "the step's [loss count, tokens]: count_fn(batch) of every micro-batch, "
    "stacked and summed, before any forward",
    "02.normalize": "backward this micro-batch's summed loss divided by the whole step's loss "
    "count, counts[0], through scaler.scale() (fp16's loss scaling)",
    "02.clip": "scaler.unscale_(optimizer) first, then torch.nn.utils.clip_grad_norm_ to "
    "args.max_grad_norm: its return value, the norm before clipping, is the logged grad_norm",
    # 03: DDP, checkpoints, exact resume
    "03.setup_distributed": "without torchrun (no RANK in os.environ): (0, 1, device); else "
    "RANK, WORLD_SIZE and LOCAL_RANK from os.environ, cuda:LOCAL_RANK on CUDA, and "
    "dist.init_process_group (nccl on CUDA, gloo on the CPU)",
    "03.forever": "before every pass loader.sampler.set_epoch(position['epoch']); skip the "
    "position['batch_in_epoch'] batches already taken; keep position up to date",
    "03.sharded_loader": "DistributedSampler(dataset, num_replicas=args.world_size, "
    "rank=args.rank, shuffle=True, seed=args.seed, drop_last=True) in a DataLoader of "
    "args.batch_size with its own torch.Generator().manual_seed(args.seed)",
    "03.save_checkpoint": "torch.save(state) into folder/.tmp_step_XXXXXX/state.pt and its "
    "SHA-256 into state.pt.sha256 (write_atomic), then rename the folder to step_XXXXXX and "
    "delete all but the newest keep_last",
    "03.load_latest": "newest first, the first checkpoint whose state.pt matches its .sha256, "
    "loads with torch.load(weights_only=True) and has every key; warn and skip a bad one",
    "03.checkpoint_state": "the model's, optimizer's, scheduler's and scaler's state_dict(), "
    "the progress, args.world_size, and every rank's rng_state() (dist.all_gather_object)",
    "03.resume": "load_latest(); refuse another world size; load the model, optimizer, "
    "scheduler and scaler, copy the progress, set_rng_state(this rank's); return the step",
    "03.factor": "backward the micro-batch's summed loss times args.world_size / the step's "
    "global count, through scaler.scale(): DDP averages the gradients over the ranks",
    "03.ddp": "the model wrapped in DDP when there are 2 or more processes (it broadcasts rank "
    "0's weights and all-reduces the gradients); one process trains the model itself",
    # 04: DPO
    "04.sequence_logps": "log_softmax of logits[:, :-1] in float32, gathered at labels[:, 1:] "
    "and summed per row over the targets that are not -100",
    "04.concatenated_logps": "ONE forward over the chosen rows then the rejected rows, the "
    "narrower side right-padded to the other's width (pad_id, mask 0, label -100); "
    "sequence_logps of it, split in two",
    "04.dpo_loss": "-logsigmoid(beta * ((chosen - rejected) - (ref_chosen - ref_rejected))) "
    "summed over the pairs, the reference under no_grad; + rpo_alpha * the chosen NLL per "
    "target token; TRL's metrics as (sum, pairs)",
    "04.count_pairs": "(the number of pairs, the target tokens of both completions)",
    "04.ref_model": "the reference, a frozen copy of the SFT model: deepcopy, eval(), no "
    "gradients",
    # 05: GRPO
    "05.eos_mask": "which rows sampled an end token (ended), and keep: True up to and "
    "including a row's first end token, everywhere in a row that never ended",
    "05.completion_logps": "log_softmax of logits[:, :-1] / temperature in float32, gathered "
    "at input_ids[:, 1:]; and the entropy of that distribution at every position",
    "05.group_advantages": "rewards.view(-1, G): (r - the group's mean) / (the group's "
    "unbiased std + 1e-4), exactly 0 for a group of equal rewards, flattened back",
    "05.grpo_loss": "per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + grpo_beta "
    "* k3, ratio = exp(logps - old), masked; averaged over each completion's tokens, summed; "
    "TRL's metrics",
    "05.count_completions": "(the number of completions, the tokens they train: "
    "completion_mask.sum())",
    # 06: FSDP2 and DCP
    "06.fsdp": "init_device_mesh over args.world_size; fully_shard every block (after "
    "activation_checkpointing(block) with --activation-checkpointing), then the model, with "
    "--mixed-precision's MixedPrecisionPolicy; register_fsdp_forward_method(model, 'generate')",
    "06.forever": "as chapter 03's, but the position is a global sample count: skip "
    "position['sample_in_epoch'] // samples_per_batch batches, count samples_per_batch each",
    "06.checkpoint_state": "as chapter 03's, but the model and optimizer states are this "
    "rank's shards, from get_state_dict(model, optimizer); and the global batch",
    "06.save_checkpoint": "every rank dcp.save()s the model and optimizer shards into "
    "folder/.tmp_step_XXXXXX; rank 0 adds trainer.pt (the rest) and sha256.json, renames the "
    "folder into place and keeps the newest args.keep_last",
    "06.resume": "load_latest(); refuse another global batch; get_state_dict, check_fits, "
    "dcp.load in place, set_state_dict; the scheduler, scaler, progress and (same world size) "
    "RNG states; return the step",
    "06.clip_grad_norm_": "the global norm: every rank sums the squares of its gradient "
    "shards (p.grad.to_local()), all_reduce, sqrt; scale every shard by min(1, max_norm / "
    "(norm + 1e-6)); return the norm",
}


class Block(NamedTuple):
    """The TODO NN.NAME: lines first..last (1-based, inclusive) of train.py, at `indent`."""
    name: str
    first: int
    last: int
    indent: int
    function: str  # the function the block is in (its own name for a function's body)
    sets: tuple  # names the block assigns that the rest of its function reads


def comments(text):
    """(line, column, comment, alone on its line) of every comment."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            line, col = tok.start
            out.append((line, col, tok.string, not tok.line[:col].strip()))
    return out


def functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def enclosing(tree, first, last):
    """The innermost function whose body holds lines first..last, or None."""
    inside = [f for f in functions(tree) if f.lineno < first and last <= f.end_lineno]
    return max(inside, key=lambda f: f.lineno, default=None)


def names_set(tree, function, first, last):
    """Names that lines first..last assign and the rest of `function` reads (not the names of
    the block's comprehensions, lambdas or inner functions: those are their own scopes)."""
    if function is None:
        return ()
    scopes = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda,
              ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    stored, read = set(), set()

    def visit(node, own_scope):
        if isinstance(node, ast.Name):
            inside = first <= node.lineno <= last
            if inside and own_scope and isinstance(node.ctx, ast.Store):
                stored.add(node.id)
            elif not inside and isinstance(node.ctx, ast.Load):
                read.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child, own_scope and not isinstance(node, scopes))

    for statement in function.body:
        visit(statement, True)
    return tuple(sorted(stored & read))


def find_blocks(text, chapter, path="train.py"):
    """Chapter `chapter`'s TODO blocks in `text` (a train.py), in file order."""
    tree = ast.parse(text)
    lines = text.splitlines()
    starts = {}  # line -> the outermost statement that starts on it
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and (node.lineno not in starts
                                           or node.col_offset < starts[node.lineno].col_offset):
            starts[node.lineno] = node
    blocks, open_block = [], None

    def fail(line, why):
        raise ValueError(f"{path}:{line}: {why}")

    for line, col, comment, alone in comments(text):
        start, end = START.match(comment), END.match(comment)
        if end:
            if not alone or open_block is None:
                fail(line, "`# end exercise` must be a line of its own that closes a "
                     "`# exercise NN: NAME` line")
            nn, name, first, indent = open_block
            open_block = None
            if nn != chapter:
                continue
            if not any(first < n < line for n in starts):
                fail(first, "an empty exercise block")
            function = enclosing(tree, first + 1, line - 1)
            blocks.append(Block(name, first + 1, line - 1, indent,
                                function.name if function else "",
                                names_set(tree, function, first + 1, line - 1)))
            continue
        if not start:
            if re.match(r"#\s*(end\s+)?exercise\b", comment):
                fail(line, f"{comment!r} is not a marker: `# exercise NN`, `# exercise NN: NAME` "
                     "or `# end exercise`")
            continue
        nn, name = start.group(1), start.group(2)
        if alone:
            if name is None:
                fail(line, "a marker line of its own needs a name: `# exercise NN: NAME`")
            if open_block is not None:
                fail(line, "exercise blocks do not nest")
            open_block = (nn, name, line, col)
            continue
        if open_block is not None and open_block[0] == chapter == nn:
            fail(line, "exercise blocks do not nest")
        node = starts.get(line)
        if node is None:
            fail(line, "a trailing `# exercise` marker goes on the first line of a statement")
        if nn != chapter:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str)
            if has_doc and len(body) == 1:
                fail(line, f"{node.name}() has nothing below its docstring")
            first = body[0].end_lineno + 1 if has_doc else body[0].lineno
            while not has_doc and first - 1 > node.lineno and \
                    lines[first - 2].strip().startswith("#"):
                first -= 1  # the comments that open the body go too
            indent = body[1 if has_doc else 0].col_offset
            blocks.append(Block(name or node.name, first, node.end_lineno, indent, node.name, ()))
        else:
            if name is None:
                fail(line, "a marker on a statement needs a name: `# exercise NN: NAME`")
            function = enclosing(tree, node.lineno, node.end_lineno)
            blocks.append(Block(name, node.lineno, node.end_lineno, node.col_offset,
                                function.name if function else "",
                                names_set(tree, function, node.lineno, node.end_lineno)))
    if open_block is not None:
        fail(open_block[2], "`# exercise NN: NAME` without its `# end exercise`")
    seen = set()
    for b in blocks:
        if b.name in seen:
            raise ValueError(f"{path}: two exercise blocks named {chapter}.{b.name}")
        seen.add(b.name)
    return blocks


def wrap(text, width):
    """text in lines of at most width characters, broken at spaces outside brackets where they
    allow it; the lines joined with single spaces give text back."""
    words, depth = [""], 0
    for c in text:
        if c == " " and depth == 0:
            words.append("")
            continue
        depth += (c in "([{") - (c in ")]}")
        words[-1] += c
    words = [part for word in words for part in (word.split(" ") if len(word) > width else [word])]
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def todo(chapter, block):
    """The statement that stands in for `block`: a NotImplementedError that names it."""
    key = f"{chapter}.{block.name}"
    if key not in HINTS:
        raise ValueError(f"no hint for TODO {key}: add one to HINTS in tutorial/make_exercises.py")
    message = f"TODO {key}: {HINTS[key]}"
    if block.sets:
        message += f" (it sets {', '.join(block.sets)})"
    if '"' in message or "\\" in message:
        raise ValueError(f"the hint for {key} may not hold a double quote or a backslash")
    pad = " " * block.indent
    one = f'{pad}raise NotImplementedError("{message}")'
    if len(one) <= WIDTH:
        return [one]
    parts = wrap(message, WIDTH - block.indent - 7)
    return [f"{pad}raise NotImplementedError("] + [f'{pad}    "{p} "' for p in parts[:-1]] + \
        [f'{pad}    "{parts[-1]}")']


def chapter_folder(chapter):
    folders = glob.glob(os.path.join(TUTORIAL, f"{chapter}_*", "train.py"))
    if len(folders) != 1:
        raise ValueError(f"no single tutorial/{chapter}_*/train.py")
    return os.path.basename(os.path.dirname(folders[0]))


def header(chapter, folder, blocks):
    here = f"tutorial/{folder}"
    text = (
        f"Chapter {chapter}'s exercise: {here}/train.py with the places of the chapter's lesson "
        "left as TODOs. Each TODO is a `raise NotImplementedError(\"TODO "
        f"{chapter}.<name>: <what to write>\")`; the docstrings and comments around it say what "
        "it must do. As it is, the script runs until it reaches the first one and stops there. "
        "Replace each with your code, then check yours against the reference, which names the "
        "lesson behind the first difference:\n\n"
        f"    python -m reference.check {chapter} {here}/exercise.py\n\n"
        "The TODOs, in the order of the file:\n")
    width = max(len(b.name) for b in blocks) + 5
    for b in blocks:
        where = f"the body of {b.function}()" if b.function == b.name else f"in {b.function}()"
        text += f"    {f'{chapter}.{b.name}':<{width}} {where}\n"
    text += (
        f"\nThe solution is {here}/train.py. This file is written by `python "
        "tutorial/make_exercises.py` from the `# exercise` markers in train.py, and writing it "
        "again overwrites your work: fill in a copy if you want to keep this one.\n"
        "The TODOs leave names unset and imports unused, until you write them:")
    out = []
    for paragraph in text.split("\n"):
        if paragraph.startswith("    ") or not paragraph:
            out.append(f"# {paragraph}".rstrip())
        else:
            out += ["# " + line for line in textwrap.wrap(paragraph, WIDTH - 2,
                                                           break_long_words=False,
                                                           break_on_hyphens=False)]
    return out + ["# ruff: noqa: F401, F821, F841"]


def make_exercise(text, chapter, folder=None, path="train.py"):
    """The exercise.py of chapter `chapter`, from the text of its train.py."""
    folder = folder or chapter_folder(chapter)
    blocks = find_blocks(text, chapter, path)
    if not blocks:
        raise ValueError(f"{path} has no `# exercise {chapter}` marker: no lesson to take out")
    lines = text.splitlines()
    for block in reversed(blocks):
        lines[block.first - 1:block.last] = todo(chapter, block)
    out = "\n".join(header(chapter, folder, blocks) + lines) + "\n"
    ast.parse(out)  # a marker in the wrong place makes a file that does not parse
    too_long = [n for n, line in enumerate(out.splitlines(), 1) if len(line) > WIDTH]
    if too_long:
        raise ValueError(f"the exercise of {path} would have lines longer than {WIDTH} "
                         f"characters ({too_long}): shorten a hint")
    return out


def todos(text):
    """{TODO name: (first line, last line)} of the `raise NotImplementedError("TODO ...")`
    statements in an exercise."""
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "NotImplementedError" and node.exc.args and \
                isinstance(node.exc.args[0], ast.Constant):
            found = re.match(r"TODO (\d\d\.\w+):", str(node.exc.args[0].value))
            if found:
                out[found.group(1)] = (node.lineno, node.end_lineno)
    return out


def fill(exercise, solution, chapter):
    """The exercise with every TODO replaced by the solution's block, and the header removed."""
    lines = exercise.splitlines()
    solved = solution.splitlines()
    blocks = {f"{chapter}.{b.name}": b for b in find_blocks(solution, chapter)}
    for name, (first, last) in sorted(todos(exercise).items(), key=lambda x: -x[1][0]):
        b = blocks[name]
        lines[first - 1:last] = solved[b.first - 1:b.last]
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def chapters():
    """{chapter: folder} of every tutorial/NN_*/train.py."""
    found = sorted(glob.glob(os.path.join(TUTORIAL, "[0-9][0-9]_*", "train.py")))
    return {os.path.basename(os.path.dirname(p))[:2]: os.path.basename(os.path.dirname(p))
            for p in found}


def generate(root=TUTORIAL):
    """{path of exercise.py: its text} for every chapter under root."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "[0-9][0-9]_*", "train.py"))):
        folder = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            text = f.read()
        out[os.path.join(os.path.dirname(path), "exercise.py")] = make_exercise(
            text, folder[:2], folder, os.path.relpath(path, os.path.dirname(root)))
    return out


def stale(root=TUTORIAL):
    """The exercise.py files under root that are missing or differ from what generate() makes."""
    out = []
    for path, text in generate(root).items():
        try:
            with open(path) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            out.append(path)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a committed exercise.py is out of date")
    p.add_argument("--root", default=TUTORIAL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = os.path.abspath(args.root)
    shown = os.path.dirname(root)
    try:
        if args.check:
            bad = stale(root)
            for path in bad:
                print(f"{os.path.relpath(path, shown)} is out of date with its train.py: run "
                      "python tutorial/make_exercises.py", file=sys.stderr)
            return 1 if bad else 0
        for path, text in generate(root).items():
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(path, shown)} ({len(todos(text))} TODOs)")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
