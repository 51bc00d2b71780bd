"""Plot a run's metrics.jsonl: `python -m reference.plot RUN_DIR [--out FILE]`.

Draws the training loss (with the eval loss), the learning rate and every eval metric that is
a fraction (accuracy, preference accuracy, ...) against the step, and saves RUN_DIR/curves.png."""
import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def plot_run(run_dir, out=None):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist; pass the --out directory of a chapter run")
    train, evals = read_metrics(path, "train"), read_metrics(path, "eval")
    fractions = sorted({k for r in evals for k, v in r.items()
                        if k not in ("step", "split", "loss") and isinstance(v, float)
                        and 0.0 <= v <= 1.0})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train", lw=0.8)
    if evals and "loss" in evals[0]:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    axes[0].set(title="loss", xlabel="step", yscale="log")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    for key in fractions:
        axes[2].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r],
                     "o-", label=key)
    axes[2].set(title="held-out metrics", xlabel="step", ylim=(-0.02, 1.02))
    if fractions:
        axes[2].legend()
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.plot",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    print(f"wrote {plot_run(args.run_dir, args.out)}")


if __name__ == "__main__":
    main()
